"""What a source path names, and the errors for bad local corpora."""

import numpy as np
import pytest

from runtime.data import DataError, write_indexed_dataset
from runtime.data.sources import iter_texts, resolve_source

from data_helpers import write_folder


def texts(tmp_path, name):
    return list(iter_texts(resolve_source(0, str(name)), tmp_path / "cache", progress=False))


def test_folder_is_every_txt_below_it_sorted_by_relative_path(tmp_path):
    root = write_folder(tmp_path / "f", {"b.txt": "B", "a/z.txt": "AZ", "a.txt": "A", "c.md": "no"})
    assert resolve_source(0, str(root)).kind == "folder"
    assert texts(tmp_path, root) == ["A", "AZ", "B"]  # "a.txt" < "a/z.txt" ('.' < '/') < "b.txt"


def test_text_file_is_one_document_read_exactly(tmp_path):
    (tmp_path / "t.txt").write_bytes("line one\r\nline two\n".encode())
    assert texts(tmp_path, tmp_path / "t.txt") == ["line one\r\nline two\n"]


def test_jsonl_is_one_document_per_line_skipping_blank_lines(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    assert resolve_source(0, str(tmp_path / "d.jsonl")).kind == "jsonl"
    assert texts(tmp_path, tmp_path / "d.jsonl") == ["one", "two"]


@pytest.mark.parametrize("lines, match", [
    ('{"text": "ok"}\n\n{"text": "broken"\n', r"d.jsonl:3: invalid JSON \(Expecting ',' delimiter at column 18\)"),
    ('{"text": "ok"}\n{"body": "x"}\n', r'd.jsonl:2: no "text" field'),
    ('["text"]\n', r'd.jsonl:1: no "text" field'),
    ('{"text": 5}\n', r'd.jsonl:1: "text" is int, expected a string'),
])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, match):
    (tmp_path / "d.jsonl").write_text(lines)
    with pytest.raises(DataError, match=match):
        texts(tmp_path, tmp_path / "d.jsonl")


def test_non_utf8_text_is_refused_with_the_offset(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 text \(byte 3 is b'\\xe9'\)"):
        texts(tmp_path, tmp_path / "latin1.txt")


def test_megatron_prefix_named_with_or_without_extension(tmp_path):
    write_indexed_dataset(tmp_path / "corpus_text_document", [np.arange(5)], np.uint16)
    for name in ("corpus_text_document", "corpus_text_document.bin", "corpus_text_document.idx"):
        src = resolve_source(0, str(tmp_path / name))
        assert src.kind == "megatron" and src.path == tmp_path / "corpus_text_document"


def test_megatron_prefix_missing_one_file(tmp_path):
    write_indexed_dataset(tmp_path / "p", [np.arange(5)], np.uint16)
    (tmp_path / "p.bin").unlink()
    with pytest.raises(DataError, match=r"p.bin: missing file"):
        resolve_source(0, str(tmp_path / "p"))


def test_missing_path_empty_folder_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match=r"data.sources\[2\].path: .*nowhere not found \(expected a text file"):
        resolve_source(2, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data.sources\[0\].path: empty corpus: the folder .* holds no .txt files"):
        resolve_source(0, str(tmp_path / "empty"))
    with pytest.raises(DataError, match="unknown built-in corpus 'builtin:tiny'; available: builtin:shakespeare"):
        resolve_source(0, "builtin:tiny")
