"""The exported tokenizer files give grapefx's ids through AutoTokenizer; no tokenizer, no files."""

import pytest
from hf_testing import ROOT, model_with_state, write_export

from runtime.data import BPETokenizer, ByteTokenizer
from spec import load_spec

transformers = pytest.importorskip("transformers")

TEXT = "ROMEO: But soft!\nWhat light through yonder window breaks?  é, 日本, <|endoftext|> in text, tabs\tend"


def _export(tmp_path, tokenizer, vocab_size=257):
    spec = load_spec(ROOT / "examples" / "tiny.yaml", [f"model.vocab_size={vocab_size}"])
    return write_export(tmp_path / "hf", spec, model_with_state(spec), tokenizer)


def test_byte_tokenizer_gives_the_utf8_bytes(tmp_path):
    assert _export(tmp_path, ByteTokenizer()).tokenizer == "byte"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert ids == list(TEXT.encode("utf-8"))                       # the special token's spelling stays text
    assert ids[:4] == [82, 79, 77, 69] and 256 not in ids
    assert tok(TEXT).input_ids == [256] + ids                      # a document starts after end-of-document
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tok.bos_token_id == 256
    assert tok.decode([256] + ids + [256], skip_special_tokens=True) == TEXT == ByteTokenizer().decode(ids + [256])


def test_bpe_tokenizer_matches_grapefx(tmp_path):
    bpe = BPETokenizer.train([TEXT * 3, "the quick brown fox jumps over the lazy dog " * 20], vocab_size=300)
    _export(tmp_path, bpe, vocab_size=bpe.vocab_size)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert ids == bpe.encode(TEXT) and len(ids) < len(TEXT.encode("utf-8"))   # merges were applied
    assert tok(TEXT).input_ids == [bpe.eod_id] + ids
    assert tok.eos_token_id == bpe.eod_id == 0 and tok.decode(ids) == bpe.decode(ids) == TEXT


@pytest.mark.parametrize("tokenizer", [None, type("Ids", (), {"kind": "pretokenized"})()])
def test_without_a_writable_tokenizer_the_model_alone_is_written(tmp_path, tokenizer):
    done = _export(tmp_path, tokenizer)
    assert done.tokenizer is None
    assert done.note.startswith("no tokenizer files: the run has no tokenizer grapefx can write")
    assert ("pretokenized" if tokenizer else "(none;") in done.note
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "tokenizer.json" not in names and "model.safetensors" in names
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert model.config.eos_token_id is None and model.config.tokenizer_vocab_size == 257
