"""Evaluate a trained model's loss by position on fixed rows: the record written as ``eval.json``.

    settings = EvalSettings(contexts=(1, 2, 4), batches=8, batch_size=None, seed=0, buckets=48)
    record = evaluate(model, spec, streams, settings, device, data_label="validation split")

Steps: L = max(contexts) · T (T = data.seq_len); N = batches · batch_size rows of L + 1 tokens
chosen without repetition (``rows.py``); for each batch of rows one eager forward pass of the
model at length L gives the per-token losses (``positions.py``), from which the contexts, bands
and buckets are computed. A second, short pass over the first T tokens of the same rows gives the
validation MaxVio at the training context (MATH.md §5: counts summed over the batches,
``(max c - mean c) / mean c`` per MoE layer, the mean over layers and the worst layer) and the
loss of those T-token prefixes evaluated alone, which must equal the long pass's band [0, T) up
to rounding in the compute dtype (``prefix_check``: the long rows see exactly the prefix's
tokens before each position, by causality).

eval.json (``FORMAT``): format, step, source, settings (the EvalSettings plus seq_len, length,
batch_size), data (label, stream names, rows available and used, each row's [stream, start],
sha256 of the rows' tokens), device, dtype, contexts, bands, buckets (each: positions [a, b),
tokens, loss in nats/token), per_row (contexts and bands, one list per row), training_context
(MaxVio and prefix_check).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from compiler import GrapeModel
from runtime.balance import max_vio
from runtime.evaluation.positions import bucket_edges, summarize, token_losses
from runtime.evaluation.rows import (
    Stream,
    available_rows,
    row_tokens,
    rows_digest,
    select_rows,
)
from spec.errors import GrapefxError
from spec.schema import Spec

__all__ = ["EvalSettings", "evaluate", "model_logits", "write_json", "write_text", "FORMAT", "EVAL_FILE"]

FORMAT = 2
EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class EvalSettings:
    contexts: tuple[int, ...] = (1, 2, 4)    # multiples of data.seq_len; the largest sets the row length
    batches: int = 8                         # batches of rows
    batch_size: int | None = None            # rows per batch (None: train.micro_batch)
    seed: int = 0                            # which rows (rows.py)
    buckets: int = 48                        # loss-by-position buckets (at most; see positions.py)
    spacing: str = "log"                     # bucket spacing: log or linear

    def as_dict(self) -> dict:
        return {**asdict(self), "contexts": list(self.contexts)}

    def check(self, where: str = "--contexts") -> None:
        if not self.contexts or any(c < 1 for c in self.contexts):
            raise GrapefxError(f"{where}: {list(self.contexts)}: every context must be a whole number >= 1 (a multiple "
                               "of the training length data.seq_len; 1 = the training length itself)")
        for name, value in (("batches", self.batches), ("batch_size", self.batch_size), ("buckets", self.buckets)):
            if value is not None and value < 1:
                raise GrapefxError(f"{name}: {value} must be >= 1")
        if self.spacing not in ("log", "linear"):
            raise GrapefxError(f"spacing: {self.spacing!r} is not a bucket spacing; use log or linear")


def model_logits(model: GrapeModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (B, L) -> logits (B, L, V)`` of an eager lowered model: the head graph cut before its loss.

    The hidden state entering the head is taken from the model's own forward (a pre-hook on the
    head graph), so the blocks run exactly as in training; targets are not needed for logits.
    """
    from runtime.generate import head_logits

    head = head_logits(model)

    def run(x: torch.Tensor) -> torch.Tensor:
        seen = {}

        def keep(module, args):                                               # returns None: the args go on unchanged
            seen["h"] = args[0]                                               # (B, L, C)
        hook = model.head.register_forward_pre_hook(keep)
        try:
            model(x, torch.zeros_like(x))                                     # the blocks; its loss is unused
        finally:
            hook.remove()
        return head(seen["h"])                                                # (B, L, V)
    return run


@torch.no_grad()
def evaluate(model: GrapeModel, spec: Spec, streams: Sequence[Stream], settings: EvalSettings,
             device: torch.device, *, data_label: str, fix: str, step: int | None = None, source: str = "") -> dict:
    """The eval.json record of ``model`` on rows of ``streams`` (see the module docstring)."""
    settings.check()
    T = spec.data.seq_len
    contexts = sorted(settings.contexts)
    length = contexts[-1] * T
    B = settings.batch_size or spec.train.micro_batch
    rows = select_rows(streams, length, settings.batches * B, settings.seed, what=data_label, fix=fix)
    tokens = row_tokens(streams, rows, length)                                 # (N, L + 1)
    logits = model_logits(model)
    losses, counts, prefix_sum = [], None, 0.0
    model.eval()
    for i in range(0, len(rows), B):
        chunk = tokens[i:i + B].to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]                                     # (B, L) each
        losses.append(token_losses(logits, x, y).cpu())                        # (B, L)
        out = model(x[:, :T].contiguous(), y[:, :T].contiguous())              # the T-token prefixes alone
        prefix_sum += float(out.ce_loss.double()) * x.shape[0] * T
        if out.counts is not None:                                             # (n_moe_layers, E)
            counts = out.counts.float().cpu() if counts is None else counts + out.counts.float().cpu()
    ell = torch.cat(losses)                                                     # (N, L)
    summary = summarize(ell, T, contexts, bucket_edges(length, T, contexts, settings.buckets, settings.spacing))
    in_long = float(ell[:, :T].double().mean())
    alone = prefix_sum / (len(rows) * T)
    training = {"loss_of_prefixes_alone": alone, "loss_of_prefixes_in_long_rows": in_long,
                "prefix_check": abs(alone - in_long), "max_vio": None, "max_vio_worst": None,
                "max_vio_worst_layer": None}
    if counts is not None:
        v = max_vio(counts)                                                    # (n_moe_layers,)
        worst = int(torch.argmax(v))
        training.update(max_vio=float(v.mean()), max_vio_worst=float(v[worst]),
                        max_vio_worst_layer=model.moe_layers[worst] + 1)
    return {
        "format": FORMAT, "step": step, "source": source,
        "settings": {**settings.as_dict(), "contexts": contexts, "batch_size": B, "seq_len": T, "length": length},
        "data": {"label": data_label, "streams": [s.name for s in streams],
                 "rows_available": available_rows(streams, length), "rows_used": len(rows),
                 "rows": [[r.stream, r.start] for r in rows], "rows_sha256": rows_digest(tokens)},
        "device": str(device), "dtype": str(model.compute_dtype).removeprefix("torch."),
        **summary, "training_context": training,
    }


def write_json(path: Path, value: dict) -> Path:
    """Write ``value`` as JSON atomically (``write_text``)."""
    return write_text(path, json.dumps(value, indent=1) + "\n")


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically: a temporary file renamed over ``path`` (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
