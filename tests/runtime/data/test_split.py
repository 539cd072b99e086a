"""data.sources[i].split: one text file works (its tail is held out), and the cutting rules."""

import numpy as np
import pytest

from runtime.cli import main
from runtime.data import DataError, prepare, write_indexed_dataset
from runtime.data.split import cut, plan
from spec.errors import GrapefxError
from spec.schema import Source
from spec import spec_from_dict

from data_helpers import data_spec


def test_a_single_text_file_holds_out_its_tail(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(100))         # 100 characters, no blank line
    (tmp_path / "input.txt").write_text(text)
    pd = prepare(data_spec(tmp_path, tmp_path / "input.txt", valid_fraction=0.25), progress=False)
    # the last round(0.25 * 100) = 25 characters are validation; each side ends with end-of-document 256
    assert pd.train.parts[0].tokens.tolist() == [*text[:75].encode(), 256]
    assert pd.valid.parts[0].tokens.tolist() == [*text[75:].encode(), 256]
    entry = pd.manifest["sources"][0]
    assert entry["split"] == "tail"
    assert entry["valid"] == "validation = the last 25% of the text in order: 25 of 100 characters (split: tail)"


def test_the_data_summary_says_which_rule_was_used(tmp_path, capsys):
    (tmp_path / "input.txt").write_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n" * 40)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"data: {{sources: [{{path: {tmp_path / 'input.txt'}}}], cache_dir: {tmp_path / 'c'}, "
                    "seq_len: 64, valid_fraction: 0.1}\nattention: {local: {window: 32}}\n")
    assert main(["data", "prepare", str(spec)]) == 0
    out, err = capsys.readouterr()
    assert "validation = the last 10% of the text in order: 216 of 2,160 characters (split: tail)" in err
    assert f"split:     {tmp_path / 'input.txt'}: validation = the last 10% of the text in order" in out


def test_cutting_rules():
    assert cut("a\n\nb\n  \t\n\n c\n\n\nd\n", "paragraphs") == ["a", "b", " c", "d\n"]   # indentation kept
    assert cut("x<|endoftext|>y<|endoftext|>", "separator", separator="<|endoftext|>") == ["x", "y"]
    assert cut("abcdefg", "chunks", chunk_chars=3) == ["abc", "def", "g"]


def test_paragraphs_are_held_out_whole(tmp_path):
    (tmp_path / "input.txt").write_text("\n\n".join(f"paragraph {i}" for i in range(8)))
    spec = data_spec(tmp_path, Source(path=str(tmp_path / "input.txt"), split="paragraphs"), valid_fraction=0.25)
    pd = prepare(spec, progress=False)
    entry = pd.manifest["sources"][0]
    assert entry["docs"] == {"train": 6, "valid": 2} and len(entry["valid_docs"]) == 2   # round(0.25 * 8)
    assert entry["valid"] == "validation = 2 of 8 paragraphs (cut at blank lines), held out whole (split: paragraphs)"
    valid = bytes(t for t in pd.valid.parts[0].tokens.tolist() if t != 256).decode()
    assert valid == "".join(f"paragraph {i}" for i in entry["valid_docs"])


def test_tail_cuts_the_document_it_falls_in():
    docs = ["abc", "defg", "hij"]                                           # 10 characters in order
    assert list(plan("tail", [3, 4, 3], 0.3, "s", "characters").assign(docs)) == [
        ("abc", False), ("defg", False), ("hij", True)]                     # last 3
    assert list(plan("tail", [3, 4, 3], 0.4, "s", "characters").assign(docs)) == [
        ("abc", False), ("def", False), ("g", True), ("hij", True)]         # last 4


def test_tail_of_a_megatron_source_counts_tokens(tmp_path):
    write_indexed_dataset(tmp_path / "ids", [np.arange(1, 21)], np.uint16)   # one document of 20 ids
    pd = prepare(data_spec(tmp_path, tmp_path / "ids", valid_fraction=0.25), progress=False)
    assert pd.train.parts[0].tokens.tolist() == [*range(1, 16), 256]
    assert pd.valid.parts[0].tokens.tolist() == [*range(16, 21), 256]
    assert "5 of 20 tokens" in pd.manifest["sources"][0]["valid"]


def test_split_errors_name_the_key_and_the_fix(tmp_path):
    write_indexed_dataset(tmp_path / "ids", [np.arange(1, 21), np.arange(1, 5)], np.uint16)
    with pytest.raises(DataError, match=r"data.sources\[0\].split: paragraphs cuts text, but .* holds token ids; "
                                        "use documents, tail or auto"):
        prepare(data_spec(tmp_path, Source(path=str(tmp_path / "ids"), split="paragraphs")), progress=False)
    (tmp_path / "t.txt").write_text("abcd")
    with pytest.raises(DataError, match=r"data.valid_fraction: 0.9 of the 4 characters of data.sources\[0\] .* leaves "
                                        "none for training; lower it"):
        prepare(data_spec(tmp_path, tmp_path / "t.txt", valid_fraction=0.9), progress=False)


@pytest.mark.parametrize("source, message", [
    ({"path": "x.txt", "split": "separator"}, "data.sources.0.separator: split: separator needs the text between "
                                              "documents"),
    ({"path": "x.txt", "split": "chunks"}, "data.sources.0.chunk_chars: split: chunks needs chunk_chars >= 1 "
                                           "(got None)"),
    ({"path": "x.txt", "chunk_chars": 10}, "data.sources.0.chunk_chars: chunk_chars applies to split: chunks only "
                                           "(this source has split: auto)"),
    ({"path": "x.txt", "split": "lines"}, "data.sources.0.split"),
])
def test_split_settings_are_validated(source, message):
    with pytest.raises(GrapefxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec_from_dict({"data": {"sources": [source]}})
