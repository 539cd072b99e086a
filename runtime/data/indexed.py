"""Megatron-LM indexed datasets (`PREFIX.bin` + `PREFIX.idx`, MMIDIDX version 1), read and written.

The layout is Megatron's (megatron/core/datasets/indexed_dataset.py), so data made by Megatron's
`tools/preprocess_data.py` reads here and ours reads there. All integers little-endian:

    .idx  offset  size  field
          0       9     magic b"MMIDIDX\\x00\\x00"
          9       8     version, uint64 (= 1)
          17      1     dtype code, uint8 (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)
          18      8     S = sequence count, uint64
          26      8     D = document count + 1, uint64
          34      4*S   sequence_lengths, int32[S] (tokens per sequence)
          ..      8*S   sequence_pointers, int64[S] (byte offset of each sequence in .bin)
          ..      8*D   document_indices, int64[D] (first sequence of each document, then S)
          ..      1*S   sequence_modes, int8[S] (multimodal only; accepted, ignored)
    .bin  the tokens of every sequence back to back, no header, dtype from the .idx.

We write one sequence per document (document_indices = [0, 1, ..., S], what Megatron's
preprocessing does without --split-sentences). Documents stored by grapefx end with the
tokenizer's end-of-document id, as Megatron's `--append-eod` does, so the `.bin` read front to
back *is* the packed training stream.

Everything is checked on open, vectorised, so a corrupt or foreign file fails with a message
instead of a wrong batch: magic, version, dtype code, .idx length, pointers consistent with the
lengths, document indices, .bin length, and (given a vocabulary size) every token id < V.
Codes 6 and 7 (float64/float32) are valid Megatron dtypes but not token ids, so they are refused.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from runtime.data.errors import DataError

__all__ = ["MAGIC", "VERSION", "DTYPE_CODES", "optimal_dtype", "IndexedDatasetWriter", "write_indexed_dataset",
           "IndexedDataset"]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # magic 9 + version 8 + dtype 1 + sequence count 8 + document count 8
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits with Megatron's margin (vocab < 65500), else int32 (Megatron's rule)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedDatasetWriter:
    """Streams documents (1-D integer arrays, one sequence each) into PREFIX.bin, then writes PREFIX.idx.

    The caller appends the end-of-document id to each document; tokens are stored as given.
    Use as a context manager: the .idx is written when the block ends without an error.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX token code")
        self.prefix = Path(prefix)
        self._bin = open(self.prefix.with_name(self.prefix.name + ".bin"), "wb")
        self._lengths: list[int] = []

    def add(self, doc: np.ndarray) -> None:
        doc = np.asarray(doc)
        info = np.iinfo(self.dtype)
        if doc.size and (doc.min() < info.min or doc.max() > info.max):
            raise ValueError(f"token ids {doc.min()}..{doc.max()} do not fit {self.dtype}")
        self._bin.write(doc.astype(self.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
        self._lengths.append(int(doc.size))

    @property
    def num_docs(self) -> int:
        return len(self._lengths)

    @property
    def num_tokens(self) -> int:
        return sum(self._lengths)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bin.close()
        if exc_type is None:
            self._write_index()

    def _write_index(self) -> None:
        sizes = np.asarray(self._lengths, dtype=np.int32)  # (S,)
        pointers = np.zeros(len(sizes), dtype=np.int64)  # (S,) byte offsets into .bin
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)  # (S+1,) one sequence per document
        with open(self.prefix.with_name(self.prefix.name + ".idx"), "wb") as fidx:
            fidx.write(MAGIC)
            fidx.write(struct.pack("<Q", VERSION))
            fidx.write(struct.pack("<B", _CODE_OF[self.dtype]))
            fidx.write(struct.pack("<Q", len(sizes)))
            fidx.write(struct.pack("<Q", len(doc_idx)))
            fidx.write(sizes.astype("<i4").tobytes(order="C"))
            fidx.write(pointers.astype("<i8").tobytes(order="C"))
            fidx.write(doc_idx.astype("<i8").tobytes(order="C"))


def write_indexed_dataset(prefix: str | Path, documents: Iterable[np.ndarray], dtype: np.dtype) -> tuple[int, int]:
    """Write `documents` to PREFIX.bin/.idx in one go; return (docs, tokens)."""
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in documents:
            w.add(doc)
    return w.num_docs, w.num_tokens


class IndexedDataset:
    """A read-only, memory-mapped Megatron indexed dataset.

    `ds[i]` is sequence i, `ds.document(k)` the tokens of document k (its sequences joined),
    `ds.tokens` the whole `.bin` as one 1-D memmap (the packed stream). With `vocab_size`, every
    token id must be in [0, vocab_size).
    """

    def __init__(self, prefix: str | Path, *, vocab_size: int | None = None):
        self.prefix = Path(prefix)
        idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        missing = [str(p) for p in (idx_path, bin_path) if not p.is_file()]
        if missing:
            raise DataError(f"{self.prefix}: Megatron indexed dataset incomplete, missing {' and '.join(missing)} "
                            "(a dataset is PREFIX.bin + PREFIX.idx; pass the prefix without extension)")
        self.dtype, self.sizes, self.pointers, self.doc_idx = _read_index(idx_path)
        n_tokens = int(self.sizes.sum(dtype=np.int64))
        want, have = n_tokens * self.dtype.itemsize, bin_path.stat().st_size
        if want != have:
            raise DataError(f"{bin_path}: size mismatch: {idx_path.name} describes {n_tokens} tokens of {self.dtype} "
                            f"({want} bytes) but the .bin has {have} bytes; the pair is truncated or from "
                            "different runs, so regenerate both")
        if n_tokens == 0:
            raise DataError(f"{bin_path}: empty corpus: the dataset holds no tokens")
        self.tokens = np.memmap(bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")  # (n_tokens,) the packed stream
        if vocab_size is not None:
            self.check_vocab(vocab_size)

    def check_vocab(self, vocab_size: int, fix: str | None = None) -> None:
        """Every id in [0, vocab_size), checked in one vectorised pass per 64 Mi tokens.

        The error names the first bad id, its position and the largest id in the data; `fix` (with
        `{need}`, the largest id + 1) replaces the default advice (use the tokenizer that made it).
        """
        chunk, first, top = 1 << 26, None, -1
        for start in range(0, len(self.tokens), chunk):
            part = self.tokens[start:start + chunk]
            bad = part >= vocab_size
            if np.issubdtype(self.dtype, np.signedinteger):
                bad |= part < 0
            if bad.any():
                i = int(np.argmax(bad))
                first = first or (int(part[i]), start + i)
            top = max(top, int(part.max()))
        if first is not None:
            advice = (fix.format(need=top + 1) if fix else
                      "the data was tokenized with a different tokenizer (set data.tokenizer to the one that made it)")
            raise DataError(f"{self.prefix}.bin: token id {first[0]} at token {first[1]} is outside the vocabulary of "
                            f"{vocab_size} ids (the largest id in the data is {top}); {advice}")

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_idx) - 1

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    def document(self, k: int) -> np.ndarray:
        first, end = int(self.doc_idx[k]), int(self.doc_idx[k + 1])
        if first == end:
            return self.tokens[:0]
        start = int(self.pointers[first]) // self.dtype.itemsize
        last = int(self.pointers[end - 1]) // self.dtype.itemsize + int(self.sizes[end - 1])
        return self.tokens[start:last]  # sequences are contiguous (pointers checked on open)


def _read_index(path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Parse and check an .idx file; return (dtype, sizes int32[S], pointers int64[S], doc_idx int64[D])."""
    raw = path.read_bytes()
    if raw[:9] != MAGIC:
        raise DataError(f"{path}: not a Megatron indexed dataset: the file does not start with the magic "
                        f"{MAGIC!r} (found {raw[:9]!r}); only the mmap format (MMIDIDX) is supported")
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: size mismatch: {len(raw)} bytes is shorter than the {HEADER_BYTES}-byte header; "
                        "the index is truncated")
    (version,) = struct.unpack_from("<Q", raw, 9)
    if version != VERSION:
        raise DataError(f"{path}: MMIDIDX version {version} is not supported (expected {VERSION})")
    (code,) = struct.unpack_from("<B", raw, 17)
    if code not in DTYPE_CODES:
        raise DataError(f"{path}: dtype code {code} is not a token dtype (expected one of "
                        + ", ".join(f"{c} {np.dtype(t)}" for c, t in DTYPE_CODES.items()) + ")")
    dtype = np.dtype(DTYPE_CODES[code])
    s, d = struct.unpack_from("<QQ", raw, 18)
    plain = HEADER_BYTES + 12 * s + 8 * d
    if len(raw) not in (plain, plain + s):  # + s: optional int8 sequence_modes
        raise DataError(f"{path}: size mismatch: the header declares {s} sequences and {d} document indices "
                        f"({plain} bytes) but the file has {len(raw)} bytes; the index is truncated or corrupt")
    sizes = np.frombuffer(raw, dtype="<i4", count=s, offset=HEADER_BYTES).astype(np.int32)  # (S,)
    pointers = np.frombuffer(raw, dtype="<i8", count=s, offset=HEADER_BYTES + 4 * s).astype(np.int64)  # (S,)
    doc_idx = np.frombuffer(raw, dtype="<i8", count=d, offset=HEADER_BYTES + 12 * s).astype(np.int64)  # (D,)
    if (sizes < 0).any():
        raise DataError(f"{path}: corrupt index: negative sequence length at sequence {int(np.argmax(sizes < 0))}")
    expected = np.zeros(s, dtype=np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=expected[1:])
    if (pointers != expected).any():
        i = int(np.argmax(pointers != expected))
        raise DataError(f"{path}: corrupt index: sequence_pointers[{i}] = {int(pointers[i])} but the running sum "
                        f"of lengths x {dtype.itemsize} bytes gives {int(expected[i])}")
    if d < 1 or doc_idx[0] != 0 or doc_idx[-1] != s or (np.diff(doc_idx) < 0).any():
        raise DataError(f"{path}: corrupt index: document_indices must rise from 0 to the sequence count {s}")
    return dtype, sizes, pointers, doc_idx
