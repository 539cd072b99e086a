"""Loss by position: one pass over long rows gives the loss at every context up to their length.

In a causal model the loss at position p, ℓ[n, p] = −ln P(row_n[p+1] | row_n[0..p]), depends
only on tokens 0..p of row n. So one forward pass over rows of L = c_max · T tokens (T =
data.seq_len, the training context) scores every position 0..L−1, and

    loss at context c      = mean over rows n and positions p < c·T of ℓ[n, p]
                             (= the loss of the c·T-token prefixes evaluated alone: same tokens,
                             same predictions, so the contexts are points of one curve, not
                             different samples of text)
    loss in band [a, b)    = mean over rows n and positions a <= p < b of ℓ[n, p]
                             bands [0, T), [T, 2T), [2T, 4T), ... up to L: what the model does
                             within, just past and far past its training context
    loss in bucket [a, b)  = the same over the buckets below, for the loss-by-position curve

Every row has all L positions, so these means are also token-weighted means. The causality
holds for every layer of the model family, MoE routing included, as long as experts drop no
tokens (``parallel.capacity_factor: null``, the default): with a capacity factor, which tokens an
expert drops depends on the whole batch, and eval.json's ``prefix_check`` shows the difference.

Bucket edges: 0, L and the rounded points L^(i/n) (``log``) or i·L/n (``linear``),
i = 0..n, deduplicated, plus every c·T of the evaluated contexts, so that each context and band
is a union of whole buckets. Positions count from 0; a curve drawn over "tokens seen" uses p + 1.

Sums are taken in float64 from the per-token losses (float32, computed in float32 from the
model's logits).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["token_losses", "bucket_edges", "band_edges", "summarize"]


def token_losses(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ (B, L) float32: the cross-entropy of each target ``y`` (B, L) under ``logits_fn(x)`` (B, L, V)."""
    logits = logits_fn(x)                                                    # (B, L, V)
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return flat.view(y.shape)                                                 # (B, L)


def bucket_edges(length: int, seq_len: int, contexts: Sequence[int], n: int, spacing: str = "log") -> list[int]:
    """Sorted bucket edges from 0 to ``length`` (see the module docstring)."""
    if spacing == "log":
        raw = {round(length ** (i / n)) for i in range(n + 1)}
    elif spacing == "linear":
        raw = {round(i * length / n) for i in range(n + 1)}
    else:
        raise ValueError(f"spacing {spacing!r}: use log or linear")
    return sorted({0, length} | raw | {c * seq_len for c in contexts if c * seq_len <= length})


def band_edges(length: int, seq_len: int) -> list[int]:
    """0, T, 2T, 4T, ... (each below ``length``), then ``length``."""
    edges, b = [0], seq_len
    while b < length:
        edges.append(b)
        b *= 2
    return edges + [length]


def _means(cum: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    """(N, len(edges) - 1): per row, the mean of ℓ over each [edges[i], edges[i+1]), from cum = [0, cumsum ℓ]."""
    a = torch.tensor(edges[:-1])
    b = torch.tensor(edges[1:])
    return (cum[:, b] - cum[:, a]) / (b - a).to(cum.dtype)


def summarize(losses: torch.Tensor, seq_len: int, contexts: Sequence[int], edges: Sequence[int]) -> dict:
    """Contexts, bands and buckets of per-token losses ``losses`` (N rows, L positions); see the module docstring.

    Per-row values of the contexts and bands are kept (``per_row``) for paired comparisons of
    two models on the same rows.
    """
    n, length = losses.shape
    ell = losses.double().cpu()
    cum = torch.cat([ell.new_zeros(n, 1), ell.cumsum(1)], dim=1)            # (N, L + 1)
    ctx_rows = torch.stack([cum[:, c * seq_len] / (c * seq_len) for c in contexts], dim=1)   # (N, n_contexts)
    bands = band_edges(length, seq_len)
    band_rows = _means(cum, bands)                                           # (N, n_bands)
    bucket = _means(cum, edges).mean(0)                                      # (n_buckets,)
    return {
        "contexts": [{"context": c, "positions": [0, c * seq_len], "tokens": n * c * seq_len,
                      "loss": float(ctx_rows[:, i].mean())} for i, c in enumerate(contexts)],
        "bands": [{"positions": [a, b], "tokens": n * (b - a), "loss": float(band_rows[:, i].mean())}
                  for i, (a, b) in enumerate(zip(bands[:-1], bands[1:]))],
        "buckets": [{"positions": [a, b], "tokens": n * (b - a), "loss": float(bucket[i])}
                    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))],
        "per_row": {"contexts": ctx_rows.tolist(), "bands": band_rows.tolist()},
    }
