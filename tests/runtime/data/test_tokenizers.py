"""Byte-level and locally trained BPE tokenizers."""

import pytest

from runtime.data import BPETokenizer, ByteTokenizer, DataError

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 20


def test_byte_tokenizer_ids_are_utf8_bytes_plus_eod():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod_id) == (257, 256)
    assert tok.encode("hé") == [104, 195, 169]  # 'h', then U+00E9 as UTF-8 0xC3 0xA9
    assert tok.encode_array("hé").tolist() == [104, 195, 169]
    assert tok.decode([104, 195, 169, 256, 105]) == "héi"  # end-of-document is dropped


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([TEXT[: len(TEXT) // 2], TEXT[len(TEXT) // 2:]], vocab_size=300)


def test_bpe_trains_byte_level_with_an_eod_special(bpe):
    assert 257 < bpe.vocab_size <= 300
    assert bpe.eod_id == 0  # the one special token comes first
    sample = "Ünïcödé and 😀, to be\r\n\tor not"
    assert bpe.decode(bpe.encode(sample)) == sample  # byte-level: lossless on unseen characters
    assert len(bpe.encode("to be, or not to be")) < len("to be, or not to be")  # merges learned


def test_text_spelling_the_special_token_is_not_a_document_boundary(bpe):
    ids = bpe.encode("a<|endoftext|>b")
    assert bpe.eod_id not in ids and bpe.decode(ids) == "a<|endoftext|>b"


def test_bpe_save_load_round_trip_and_training_is_deterministic(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    loaded = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.encode(TEXT) == bpe.encode(TEXT) and loaded.eod_id == bpe.eod_id
    again = BPETokenizer.train([TEXT[: len(TEXT) // 2], TEXT[len(TEXT) // 2:]], vocab_size=300)
    again.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == (tmp_path / "tokenizer.json").read_text()


def test_a_tokenizer_without_an_eod_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "wl.json"))
    with pytest.raises(DataError, match="wl.json: the tokenizer has no end-of-document token"):
        BPETokenizer.load(tmp_path / "wl.json")


def test_bad_tokenizer_files_are_named(tmp_path):
    with pytest.raises(DataError, match="data.tokenizer.path: .*nope.json does not exist"):
        BPETokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json is not a readable tokenizer.json"):
        BPETokenizer.load(tmp_path / "bad.json")


def test_bpe_needs_room_for_merges():
    with pytest.raises(DataError, match="data.tokenizer.vocab_size: 257 leaves no room for merges"):
        BPETokenizer.train([TEXT], vocab_size=257)
