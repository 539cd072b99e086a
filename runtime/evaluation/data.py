"""What an evaluation reads: the model's validation split, or a named source (``grapefx eval --data``).

    (none)          the validation split of the model's own spec (data.sources, prepared and cached
                    as for training; whole held-out documents, never seen in training)
    SPEC.yaml       the validation split of that spec's data section (its tokenizer must be the model's)
    PREFIX          a Megatron indexed dataset PREFIX.bin/.idx, all of it, already tokenized
    FILE / FOLDER   text: a file (one document), a .jsonl (a "text" per line) or a folder of .txt files,
                    all of it, encoded with the model's tokenizer, each document followed by the
                    end-of-document id (the pipeline's packing)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.data import IndexedDataset, prepare
from runtime.data.cache import cache_root
from runtime.data.sources import iter_texts, resolve_source
from runtime.evaluation.rows import Stream, streams_of_split
from spec import load_spec
from spec.errors import GrapefxError
from spec.schema import Spec

__all__ = ["Source", "eval_source"]

PROBE = "ROMEO: Is the day so young? 1234 — café, naïve.\n\tend"


class Source:
    def __init__(self, streams: list[Stream], label: str, fix: str):
        self.streams, self.label, self.fix = streams, label, fix


def _check_tokenizer(ours, theirs, where: str) -> None:
    same = (ours.kind, ours.vocab_size, ours.eod_id) == (theirs.kind, theirs.vocab_size, theirs.eod_id)
    if not (same and list(ours.encode(PROBE)) == list(theirs.encode(PROBE))):
        raise GrapefxError(f"{where}: its tokenizer ({theirs.kind}, {theirs.vocab_size} ids) is not the model's "
                           f"({ours.kind}, {ours.vocab_size} ids), so its tokens mean other things to the model; "
                           "give a source with the model's tokenizer, or text (a file, .jsonl or folder)")


def _split_source(spec: Spec, tokenizer, where: str, own: bool) -> Source:
    prepared = prepare(spec, progress=False)
    _check_tokenizer(tokenizer, prepared.tokenizer, where)
    names = ", ".join(prepared.valid.names)
    fix = ("lower --batches, --batch-size or the largest context, raise data.valid_fraction of the spec, or give a "
           "larger source with --data" if own else "lower --batches, --batch-size or the largest context, or give a "
           "larger source")
    return Source(streams_of_split(prepared.valid), f"the validation split of {names}", fix)


def eval_source(spec: Spec, tokenizer, data: str | None) -> Source:
    """The streams to evaluate on (see the module docstring)."""
    if data is None:
        return _split_source(spec, tokenizer, "data", own=True)
    if data.endswith((".yaml", ".yml")) and Path(data).is_file():
        return _split_source(load_spec(data), tokenizer, f"--data {data}", own=False)
    try:
        source = resolve_source(0, data)
    except GrapefxError as e:
        raise GrapefxError(f"--data: {str(e).split(': ', 1)[-1]}") from None
    fix = "lower --batches, --batch-size or the largest context, or give a larger source"
    if source.kind == "megatron":
        ds = IndexedDataset(source.path, vocab_size=tokenizer.vocab_size)
        return Source([Stream(data, ds.tokens)], f"{data} (Megatron dataset)", fix)
    eod = np.asarray([tokenizer.eod_id], dtype=np.int64)
    docs = [np.concatenate([tokenizer.encode_array(t).astype(np.int64), eod])
            for t in iter_texts(source, cache_root(spec.data.cache_dir), progress=False) if t]
    if not docs:
        raise GrapefxError(f"--data: {data} holds no text")
    return Source([Stream(data, np.concatenate(docs))], f"{data} ({len(docs)} documents)", fix)
