"""A split (train or valid) of prepared data, and how its sources are blended by weight.

Blending follows Megatron's `--data-path w1 p1 w2 p2 ...`: weights are normalised to sum to 1
and rows (training samples) are drawn from each source in proportion. The exact scheme:

1. Each source d is one packed token stream cut into R_d rows (see `runtime.data.sampler`).
   One epoch of the blend has N = sum_d R_d rows, as many as the sources concatenated.
2. Slot i of the epoch (i = 0..N-1) goes to a source by "ideal times": source d's k-th draw
   is due at t = (k + 0.5) / w_d; the slots take the N earliest due draws in time order, ties
   to the lower source index (Webster/Sainte-Lague apportionment). After any i slots source d
   has had w_d * i draws within 0.5 for two sources, within a few draws for more (measured
   < 3 for up to 16 random weights). No randomness: interleaving is the same every epoch.
3. Within a source, draws continue across blend epochs: its k-th draw overall is row
   perm_{d, k // R_d}[k % R_d], a fresh seeded permutation per pass through the source. A source
   weighted above its size repeats (upsampling); one weighted below it is subsampled per blend
   epoch and carries on where it stopped in the next (every row is eventually seen).

Megatron assigns slots with a greedy error rule (argmax_d w_d * (i + 1) - count_d, within 1),
a sequential loop it runs in C++; the ideal-times rule is as proportional in the long run and
is one vectorised sort.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from runtime.data.errors import DataError
from runtime.data.indexed import IndexedDataset

__all__ = ["Split", "blend_schedule"]


class Split:
    """One split of prepared data: a packed token stream (IndexedDataset) per source, with blend weights.

    `weights` are normalised to sum to 1; `names` say where each part came from (messages).
    """

    def __init__(self, name: str, parts: Sequence[IndexedDataset], weights: Sequence[float],
                 names: Sequence[str] | None = None):
        if len(parts) != len(weights) or not parts:
            raise ValueError("a split needs one weight per part and at least one part")
        for i, w in enumerate(weights):
            if not (w > 0 and math.isfinite(w)):
                raise DataError(f"data.sources[{i}].weight: {w} must be a positive number")
        total = float(sum(weights))
        self.name = name
        self.parts = tuple(parts)
        self.weights = tuple(float(w) / total for w in weights)
        self.names = tuple(names) if names is not None else tuple(str(p.prefix) for p in parts)

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    @property
    def num_docs(self) -> int:
        return sum(p.num_docs for p in self.parts)

    def __repr__(self) -> str:
        return f"Split({self.name!r}, docs={self.num_docs}, tokens={self.num_tokens}, weights={self.weights})"


def blend_schedule(rows: Sequence[int], weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 2 of the module docstring for one epoch of N = sum(rows) slots.

    Returns (source int16[N], draw int64[N], per_epoch int64[D]): slot i holds the draw-th draw of
    this epoch from `source[i]`; source d gets per_epoch[d] slots per epoch.
    """
    n = int(sum(rows))
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    times, owner, kth = [], [], []
    for d, wd in enumerate(w):
        # enough candidate draws: source d's count among the first n slots is <= wd * (n + D) + 1
        k = np.arange(math.ceil(wd * (n + len(w))) + 2, dtype=np.int64)
        times.append((k + 0.5) / wd)
        owner.append(np.full(len(k), d, dtype=np.int16))
        kth.append(k)
    owner_all, kth_all = np.concatenate(owner), np.concatenate(kth)
    order = np.lexsort((owner_all, np.concatenate(times)))[:n]  # by due time, ties to the lower source
    source, draw = owner_all[order], kth_all[order]
    per_epoch = np.bincount(source, minlength=len(w)).astype(np.int64)
    return source, draw, per_epoch
