"""prepare(spec): split, tokenize, write, cache; and the errors a user can meet on the way."""

import json
from pathlib import Path

import numpy as np
import pytest

import runtime.data.pipeline as prepare_mod
from runtime.data import DataError, IndexedDataset, prepare, write_indexed_dataset
from runtime.data.cache import cache_root
from spec.schema import Source, Tokenizer

from data_helpers import data_spec, write_folder


def plays_in_order(folder: Path) -> list[bytes]:
    """The folder's .txt documents in the documented order (relative path, '.' < '/')."""
    files = sorted((p for p in folder.rglob("*.txt")), key=lambda p: p.relative_to(folder).as_posix())
    return [p.read_bytes() for p in files]


def test_folder_with_byte_tokenizer(tmp_path, plays):
    pd = prepare(data_spec(tmp_path, plays), progress=False)
    docs = plays_in_order(plays)
    assert len(docs) == 8
    held = pd.manifest["sources"][0]["valid_docs"]
    assert len(held) == 2  # max(1, round(0.25 * 8))
    assert (pd.train.num_docs, pd.valid.num_docs) == (6, 2)
    # each stream is its documents in order, each followed by end-of-document 256 (uint16 on disk)
    for split, keep in ((pd.train, lambda i: i not in held), (pd.valid, lambda i: i in held)):
        expected = [t for i, d in enumerate(docs) if keep(i) for t in [*d, 256]]
        assert split.parts[0].tokens.dtype == np.uint16
        assert split.parts[0].tokens.tolist() == expected
    assert pd.tokenizer.vocab_size == 257 and pd.folder.parent == tmp_path / "cache" / "data"
    assert json.loads((pd.folder / "manifest.json").read_text())["dtype"] == "uint16"


def test_rerun_reuses_the_cache_and_weights_do_not_invalidate_it(tmp_path, plays, monkeypatch):
    first = prepare(data_spec(tmp_path, plays), progress=False)
    monkeypatch.setattr(prepare_mod, "_build", lambda *a: pytest.fail("rebuilt a cached dataset"))
    again = prepare(data_spec(tmp_path, (plays, 5.0)), progress=False)
    assert again.folder == first.folder and again.train.weights == (1.0,)


def test_changed_source_gets_a_new_folder(tmp_path, plays):
    first = prepare(data_spec(tmp_path, plays), progress=False)
    with open(plays / "play0.txt", "a") as fh:
        fh.write(" Enter a messenger.")
    assert prepare(data_spec(tmp_path, plays), progress=False).folder != first.folder


def test_a_crash_while_writing_leaves_no_cache_folder(tmp_path, plays, monkeypatch):
    calls = []
    real_add = prepare_mod.IndexedDatasetWriter.add

    def failing_add(self, doc):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_add(self, doc)

    monkeypatch.setattr(prepare_mod.IndexedDatasetWriter, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        prepare(data_spec(tmp_path, plays), progress=False)
    assert list((tmp_path / "cache" / "data").iterdir()) == []
    monkeypatch.undo()
    assert prepare(data_spec(tmp_path, plays), progress=False).train.num_docs == 6


def test_blend_of_folder_and_jsonl(tmp_path, plays):
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"document {i} " * 10}) + "\n" for i in range(4)))
    pd = prepare(data_spec(tmp_path, (plays, 1.0), (jsonl, 3.0)), progress=False)
    assert len(pd.train.parts) == len(pd.valid.parts) == 2
    assert pd.train.weights == pd.valid.weights == (0.25, 0.75)
    assert [s["docs"] for s in pd.manifest["sources"]] == [{"train": 6, "valid": 2}, {"train": 3, "valid": 1}]


def test_bpe_is_trained_saved_beside_the_data_and_reloadable(tmp_path, plays):
    bpe = Tokenizer(kind="bpe", vocab_size=300)
    pd = prepare(data_spec(tmp_path, plays, tokenizer=bpe, vocab_size=300), progress=False)
    assert (pd.folder / "tokenizer.json").is_file() and 257 < pd.tokenizer.vocab_size <= 300
    text = plays_in_order(plays)[0].decode()
    assert pd.tokenizer.decode(pd.tokenizer.encode(text)) == text
    eod = pd.tokenizer.eod_id
    assert int(pd.train.parts[0].tokens[-1]) == eod and pd.manifest["tokenizer"]["eod_id"] == eod
    given = Tokenizer(kind="bpe", path=str(pd.folder / "tokenizer.json"))
    reused = prepare(data_spec(tmp_path, plays, tokenizer=given, vocab_size=300), progress=False)
    assert reused.folder != pd.folder
    assert reused.train.parts[0].tokens.tolist() == pd.train.parts[0].tokens.tolist()


@pytest.mark.parametrize("tokenizer, vocab, match", [
    (Tokenizer(), 256, r"model.vocab_size: 256 is smaller than the 257 ids of the byte tokenizer .*"
                       r"set model.vocab_size to at least 257"),
    (Tokenizer(kind="bpe", vocab_size=4096), 2048, "model.vocab_size: 2048 is smaller than the 4096 ids of the BPE"),
])
def test_model_vocab_must_cover_the_tokenizer(tmp_path, plays, tokenizer, vocab, match):
    with pytest.raises(DataError, match=match):
        prepare(data_spec(tmp_path, plays, tokenizer=tokenizer, vocab_size=vocab), progress=False)


@pytest.mark.parametrize("tokenizer, match", [
    (Tokenizer(kind="bpe"), "set exactly one of vocab_size"),
    (Tokenizer(kind="bpe", vocab_size=300, path="t.json"), "set exactly one of vocab_size"),
    (Tokenizer(kind="byte", vocab_size=300), "apply to kind: bpe only"),
])
def test_tokenizer_settings_are_checked(tmp_path, plays, tokenizer, match):
    with pytest.raises(DataError, match=match):
        prepare(data_spec(tmp_path, plays, tokenizer=tokenizer, vocab_size=300), progress=False)


def test_megatron_source_is_copied_with_one_eod_per_document(tmp_path):
    docs = [[*b"hello", 256], list(b"world"), list(b"third act"), [*b"fourth", 256]]
    write_indexed_dataset(tmp_path / "m_text_document", [np.array(d) for d in docs], np.uint16)
    pd = prepare(data_spec(tmp_path, tmp_path / "m_text_document", valid_fraction=0.25), progress=False)
    assert (pd.train.num_docs, pd.valid.num_docs) == (3, 1)
    copied = []
    for split in (pd.train, pd.valid):
        part = split.parts[0]
        copied += [part[i].tolist() for i in range(len(part))]
    assert sorted(copied) == sorted([[*b"hello", 256], [*b"world", 256], [*b"third act", 256], [*b"fourth", 256]])


def test_megatron_source_from_another_tokenizer_is_refused(tmp_path):
    write_indexed_dataset(tmp_path / "gpt2", [np.array([50256, 1]), np.array([2, 50256])], np.uint16)
    with pytest.raises(DataError, match=r"token id 50256 at token 0 is outside the vocabulary of 257 ids \(the largest id in the data is"):
        prepare(data_spec(tmp_path, tmp_path / "gpt2", valid_fraction=0.5), progress=False)
    with pytest.raises(DataError, match="already tokenized; give the tokenizer that made it as data.tokenizer.path"):
        prepare(data_spec(tmp_path, tmp_path / "gpt2", tokenizer=Tokenizer(kind="bpe", vocab_size=300),
                          vocab_size=300), progress=False)


def test_too_few_documents(tmp_path):
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match=r"data.sources\[0\] \(.*one.txt\): only 1 document; split: documents holds "
                                        r"out whole documents, so it needs at least 2: use split: tail"):
        prepare(data_spec(tmp_path, Source(path=str(tmp_path / "one.txt"), split="documents")), progress=False)
    folder = write_folder(tmp_path / "blank", {"a.txt": "", "b.txt": ""})
    with pytest.raises(DataError, match=r"empty corpus: no non-empty documents"):
        prepare(data_spec(tmp_path, folder), progress=False)


def test_valid_fraction_zero_still_holds_out_one_document(tmp_path, plays):
    pd = prepare(data_spec(tmp_path, plays, valid_fraction=0.0), progress=False)
    assert (pd.train.num_docs, pd.valid.num_docs) == (7, 1)


def test_empty_documents_are_skipped(tmp_path):
    folder = write_folder(tmp_path / "f", {"a.txt": "", "b.txt": "bee", "c.txt": "sea"})
    pd = prepare(data_spec(tmp_path, folder, valid_fraction=0.5), progress=False)
    assert pd.train.num_docs + pd.valid.num_docs == 2


@pytest.mark.parametrize("fraction, match", [
    (-0.1, r"data.valid_fraction: -0.1 must be in \[0, 1\)"),
    (1.0, r"data.valid_fraction: 1.0 must be in \[0, 1\)"),
    (0.95, r"data.valid_fraction: 0.95 of the 8 documents of .* leaves none for training"),
])
def test_valid_fraction_is_checked(tmp_path, plays, fraction, match):
    with pytest.raises(DataError, match=match):
        prepare(data_spec(tmp_path, plays, valid_fraction=fraction), progress=False)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("GRAPEFX_CACHE", raising=False)
    assert cache_root() == tmp_path / "xdg" / "grapefx"
    monkeypatch.setenv("GRAPEFX_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "spec")) == tmp_path / "spec"
    monkeypatch.delenv("GRAPEFX_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "grapefx"


def test_prepared_data_is_rechecked_on_open(tmp_path, plays):
    pd = prepare(data_spec(tmp_path, plays), progress=False)
    with open(pd.folder / "valid-0.bin", "ab") as fh:
        fh.write(b"\x00\x00")
    with pytest.raises(DataError, match="valid-0.bin: size mismatch"):
        prepare(data_spec(tmp_path, plays), progress=False)
    assert isinstance(pd.train.parts[0], IndexedDataset)
