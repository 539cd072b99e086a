"""The tokenizer of a run as ``tokenizer.json`` + ``tokenizer_config.json`` for ``AutoTokenizer``.

Both kinds load as ``PreTrainedTokenizerFast`` (no custom code) and give grapefx's ids:

- bpe: grapefx's own ``tokenizer.json``; the end-of-document token is its EOS and padding token.
- byte: a byte-level BPE without merges whose 256 symbols are the bytes in GPT-2's byte-to-unicode
  spelling, in byte order, so text -> its UTF-8 bytes as ids 0..255; id 256, end-of-document,
  is spelled ``<|endoftext|>``.

Text starts after the end-of-document id, as every document does in training and as ``grapefx
generate`` feeds a prompt: ``tokenizer(text)`` gives ``[eod] + ids`` (the end-of-document token is
also the BOS token); ``tokenizer(text, add_special_tokens=False)`` gives grapefx's ``encode(text)``.
``split_special_tokens: true`` keeps grapefx's rule that text spelling a special token is encoded
as plain text, never as the special id.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["BYTE_EOD", "TOKENIZER_FILES", "byte_tokenizer", "write_tokenizer"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
BYTE_EOD = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """A ``tokenizers.Tokenizer`` equal to grapefx's byte tokenizer (ids 0..255 bytes, 256 end-of-document)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOD, special=True)])
    assert tok.token_to_id(BYTE_EOD) == 256
    return tok


def write_tokenizer(tokenizer, folder: Path) -> None:
    """Write ``TOKENIZER_FILES`` for grapefx ``tokenizer`` (kind byte or bpe) into ``folder``."""
    from tokenizers import Tokenizer, processors

    if tokenizer.kind == "bpe":
        tokenizer.save(folder / "tokenizer.json")
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        eod = tok.id_to_token(tokenizer.eod_id)
    else:
        tok, eod = byte_tokenizer(), BYTE_EOD
    tok.post_processor = processors.TemplateProcessing(single=f"{eod} $A", pair=f"{eod} $A {eod} $B",
                                                       special_tokens=[(eod, tokenizer.eod_id)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eod, "eos_token": eod, "pad_token": eod,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
