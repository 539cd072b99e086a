"""The evaluation rows: whole, distinct windows of a token stream, never wrapped around it.

A stream of n tokens (one per validation source, documents back to back with their
end-of-document ids, as the data pipeline stores them) holds R = (n - 1) // L rows of L + 1
tokens, row r = stream[r*L : r*L + L + 1] (inputs = row[:-1], targets = row[1:]), the training
sampler's cut at length L. Of the R_1 + R_2 + ... rows of all streams, N are taken by a
permutation drawn from numpy's PCG64 seeded with SeedSequence([seed, L]): the same rows for
every model evaluated with the same seed, length and data, whatever it was trained with.

Asking for more rows than the streams hold is an error, not a second pass: a repeated row would
count its tokens twice and make the evaluation look larger than it is.

``rows_digest`` is the sha256 of the selected rows' tokens (int64, row after row): two
evaluations with equal digests scored exactly the same tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from spec.errors import GrapefxError

__all__ = ["Stream", "Row", "streams_of_split", "available_rows", "select_rows", "row_tokens", "rows_digest"]


@dataclass(frozen=True)
class Stream:
    name: str                # where it came from, for messages and eval.json
    tokens: np.ndarray       # (n,) the packed token stream


@dataclass(frozen=True)
class Row:
    stream: int              # index into the streams
    start: int               # first token: the row is tokens[start : start + L + 1]


def streams_of_split(split) -> list[Stream]:
    """The streams of a ``runtime.data.Split`` (one per source)."""
    return [Stream(name, part.tokens) for name, part in zip(split.names, split.parts)]


def available_rows(streams: Sequence[Stream], length: int) -> int:
    return sum(max(len(s.tokens) - 1, 0) // length for s in streams)


def select_rows(streams: Sequence[Stream], length: int, n: int, seed: int, *, what: str, fix: str) -> list[Row]:
    """``n`` distinct rows of ``length`` scored tokens (see the module docstring); ``what``/``fix`` word the refusal."""
    counts = [max(len(s.tokens) - 1, 0) // length for s in streams]
    total = sum(counts)
    if n > total:
        tokens = sum(len(s.tokens) for s in streams)
        raise GrapefxError(f"{what} holds {tokens:,} tokens: {total} row(s) of {length} tokens (+1 for the last "
                           f"target), fewer than the {n} rows asked for; rows are never repeated or wrapped "
                           f"around, so {fix}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, length])))
    first = np.cumsum([0] + counts)                                    # global row index of each stream's row 0
    out = []
    for g in rng.permutation(total)[:n].tolist():
        d = int(np.searchsorted(first, g, side="right")) - 1
        out.append(Row(d, (g - int(first[d])) * length))
    return out


def row_tokens(streams: Sequence[Stream], rows: Sequence[Row], length: int) -> torch.Tensor:
    """(len(rows), length + 1) int64: each row's tokens."""
    return torch.from_numpy(np.stack([np.asarray(streams[r.stream].tokens[r.start:r.start + length + 1])
                                      for r in rows]).astype(np.int64))


def rows_digest(tokens: torch.Tensor) -> str:
    """sha256 of the rows' tokens as int64, row after row."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
