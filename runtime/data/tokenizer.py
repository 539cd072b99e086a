"""Tokenizers: byte-level (the default, nothing to train), a byte-level BPE, and none (pretokenized).

Both expose `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size` and `eod_id`
(the end-of-document id written after every document). `encode_array` returns the ids as a numpy
array, which is what preparation writes.

- byte: ids 0..255 are the UTF-8 bytes, 256 is end-of-document; vocab 257. Lossless on any text.
- bpe: the `tokenizers` library's byte-level BPE (GPT-2 pre-tokenisation, no prefix space) with
  `<|endoftext|>` as its one special token. Trained on the training split, saved as
  `tokenizer.json` beside the prepared data, or loaded from `data.tokenizer.path` (any
  `tokenizer.json` whose vocabulary holds an end-of-document token, see `EOD_NAMES`; a Hugging
  Face model's, saved with `AutoTokenizer.from_pretrained(name).backend_tokenizer.save(path)`,
  works as it is).
- pretokenized: no text at all. The sources are Megatron `.bin/.idx` token ids, the vocabulary is
  `model.vocab_size` and the end-of-document id is `data.tokenizer.eod_id` (None: the data has
  none). `encode` refuses text, `decode` is not defined (there is no text to give back).

Text that happens to contain a special token's spelling (e.g. "<|endoftext|>") is encoded as
plain text, never as the special id, so a document cannot inject a document boundary.
`decode` drops the end-of-document id.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from runtime.data.errors import DataError

__all__ = ["ByteTokenizer", "BPETokenizer", "PretokenizedTokenizer", "EOD_NAMES", "open_tokenizer"]

# end-of-document spellings looked up, in order, in a user's tokenizer.json
EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")


class ByteTokenizer:
    kind = "byte"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tokenizer, source: str = "<memory>"):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # not saved in tokenizer.json, so set on every load
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        ids = [tokenizer.token_to_id(name) for name in EOD_NAMES]
        found = [i for i in ids if i is not None]
        if not found:
            raise DataError(f"{source}: the tokenizer has no end-of-document token (looked for "
                            f"{', '.join(EOD_NAMES)}); add one as a special token or let grapefx train one "
                            "(data.tokenizer.path: null, data.tokenizer.vocab_size: N)")
        self.eod_id = found[0]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, progress: bool = False) -> BPETokenizer:
        """Train a byte-level BPE of at most `vocab_size` ids (fewer if the text has too few merges)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size <= 257:
            raise DataError(f"data.tokenizer.vocab_size: {vocab_size} leaves no room for merges; a byte-level BPE "
                            "needs more than 257 ids (256 byte symbols + end-of-document), e.g. 4096")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_NAMES[0]],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=progress and sys.stderr.isatty())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path, key: str = "data.tokenizer.path") -> BPETokenizer:
        """A tokenizer.json; `key` is the setting that named it (for messages)."""
        from tokenizers import Tokenizer

        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"{key}: {path} does not exist (expected a tokenizer.json)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise DataError(f"{key}: {path} is not a readable tokenizer.json ({e})") from e
        return cls(tok, source=str(path))

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class PretokenizedTokenizer:
    """The ids of pre-tokenised data: a vocabulary size and an end-of-document id, no text."""
    kind = "pretokenized"

    def __init__(self, vocab_size: int, eod_id: int | None):
        self.vocab_size, self.eod_id = vocab_size, eod_id

    def encode(self, text: str) -> list[int]:
        raise DataError("the data was tokenised elsewhere (data.tokenizer.kind: pretokenized), so there is no "
                        "tokenizer to turn text into ids; give the tokenizer.json that made the data (generate "
                        "--tokenizer FILE, or data.tokenizer: {kind: bpe, path: FILE})")

    encode_array = encode

    def decode(self, ids: Iterable[int]) -> str:
        raise DataError("pretokenized data has no tokenizer to turn ids into text; give the tokenizer.json that made "
                        "the data (generate --tokenizer FILE)")


def open_tokenizer(entry: dict, folder: Path) -> ByteTokenizer | BPETokenizer | PretokenizedTokenizer:
    """The tokenizer a manifest or export config describes: {kind, vocab_size, eod_id, file}; file is in `folder`."""
    if entry["kind"] == "bpe":
        return BPETokenizer.load(Path(folder) / entry["file"])
    if entry["kind"] == "pretokenized":
        return PretokenizedTokenizer(entry["vocab_size"], entry["eod_id"])
    return ByteTokenizer()
