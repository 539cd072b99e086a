"""data.tokenizer.kind: pretokenized (Megatron ids, vocabulary from model.vocab_size), and a given tokenizer.json."""

import numpy as np
import pytest

from runtime.data import DataError, prepare, write_indexed_dataset
from runtime.data.tokenizer import PretokenizedTokenizer
from spec import spec_from_dict
from spec.errors import GrapefxError
from spec.schema import Tokenizer

from data_helpers import data_spec


def test_ids_are_copied_as_stored_and_checked_against_model_vocab_size(tmp_path):
    docs = [np.array([5, 999, 7]), np.array([1, 2]), np.array([3, 4, 0]), np.array([8])]
    write_indexed_dataset(tmp_path / "ids", docs, np.int32)
    spec = data_spec(tmp_path, tmp_path / "ids", vocab_size=1000, tokenizer=Tokenizer(kind="pretokenized"))
    pd = prepare(spec, progress=False)
    assert pd.tokenizer.kind == "pretokenized" and pd.tokenizer.vocab_size == 1000 and pd.tokenizer.eod_id is None
    got = sorted(pd.train.parts[0][i].tolist() for i in range(len(pd.train.parts[0]))) + \
        [pd.valid.parts[0][i].tolist() for i in range(len(pd.valid.parts[0]))]
    assert sorted(got) == sorted(d.tolist() for d in docs)           # nothing appended without an eod_id
    assert pd.manifest["tokenizer"] == {"kind": "pretokenized", "vocab_size": 1000, "eod_id": None, "file": None}


def test_an_eod_id_is_appended_where_a_document_lacks_it(tmp_path):
    write_indexed_dataset(tmp_path / "ids", [np.array([5, 9, 0]), np.array([1, 2])], np.int32)
    spec = data_spec(tmp_path, tmp_path / "ids", vocab_size=10, valid_fraction=0.5,
                     tokenizer=Tokenizer(kind="pretokenized", eod_id=0))
    pd = prepare(spec, progress=False)
    got = [p[i].tolist() for s in (pd.train, pd.valid) for p in s.parts for i in range(len(p))]
    assert sorted(got) == [[1, 2, 0], [5, 9, 0]]


def test_an_id_past_the_vocabulary_names_the_largest_id_and_the_fix(tmp_path):
    write_indexed_dataset(tmp_path / "ids", [np.array([5, 9, 1500]), np.array([1700, 2])], np.int32)
    spec = data_spec(tmp_path, tmp_path / "ids", vocab_size=1000, tokenizer=Tokenizer(kind="pretokenized"))
    with pytest.raises(DataError, match=r"ids.bin: token id 1500 at token 2 is outside the vocabulary of 1000 ids "
                                        r"\(the largest id in the data is 1700\); set model.vocab_size to at least "
                                        r"1701 \(the data's largest id \+ 1\)"):
        prepare(spec, progress=False)


def test_text_sources_and_text_prompts_are_refused(tmp_path, plays):
    spec = data_spec(tmp_path, plays, vocab_size=1000, tokenizer=Tokenizer(kind="pretokenized"))
    with pytest.raises(DataError, match=r"data.sources\[0\].path: .* is text, but data.tokenizer.kind is pretokenized"):
        prepare(spec, progress=False)
    with pytest.raises(DataError, match="no tokenizer to turn text into ids; give the tokenizer.json that made the data"):
        PretokenizedTokenizer(1000, None).encode("hello")


@pytest.mark.parametrize("tok, message", [
    ({"kind": "pretokenized", "vocab_size": 50000}, "data.tokenizer.vocab_size: pretokenized data takes its "
                                                    "vocabulary from model.vocab_size"),
    ({"kind": "pretokenized", "path": "t.json"}, "data.tokenizer.path: a tokenizer.json makes the data kind: bpe"),
    ({"kind": "pretokenized", "eod_id": 257}, "data.tokenizer.eod_id: 257 is not an id of the 257-id vocabulary"),
    ({"kind": "byte", "eod_id": 3}, "data.tokenizer.eod_id: eod_id applies to kind: pretokenized only"),
])
def test_pretokenized_settings_are_validated(tok, message):
    with pytest.raises(GrapefxError, match=message):
        spec_from_dict({"data": {"tokenizer": tok}})


def test_an_existing_tokenizer_json_is_used_as_given(tmp_path, plays):
    """A tokenizer.json made elsewhere (as a Hugging Face model ships it): its own ids and its </s> end-of-document."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    words = sorted({w for p in plays.rglob("*.txt") for w in p.read_text().replace(",", " ").replace(".", " ").split()})
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    spec = data_spec(tmp_path, plays, vocab_size=len(vocab) + 1,
                     tokenizer=Tokenizer(kind="bpe", path=str(tmp_path / "tokenizer.json")))
    pd = prepare(spec, progress=False)
    assert pd.tokenizer.vocab_size == len(vocab) and pd.tokenizer.eod_id == 1
    stream = pd.train.parts[0].tokens.tolist() + pd.valid.parts[0].tokens.tolist()
    assert stream.count(1) == 8                                                  # one </s> per play
    assert pd.tokenizer.encode("to be or not") == [vocab["to"], vocab["be"], vocab["or"], vocab["not"]]
