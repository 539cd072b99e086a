"""Paired statistics for two variants: evaluation noise (rows) and training noise (seeds), kept apart.

Runs of equal seed k share data order and the initial values of shared parameters, and every run
is scored on the same N rows (equal ``rows_sha256`` in eval.json). For a quantity q (the loss at a
context or in a band), variant B against the reference A:

    d[k, n] = q_B[k, n] − q_A[k, n]            row n of seed k's pair of runs (> 0: B's loss is higher)

Evaluation noise, per seed (``bootstrap``): D_k = mean_n d[k, n] with a 95% percentile bootstrap
interval: the N rows are resampled with replacement R = 2000 times (numpy PCG64, seed 0) and the
2.5th and 97.5th percentiles of the resampled means are taken. It says how much D_k depends on
which rows were scored, for these trained weights; it says nothing about retraining.

Training noise, over S seeds (``t_interval``): mean_k D_k ± t(0.975, S−1) · s / √S, s the sample
standard deviation of the D_k (S − 1 in the denominator). It needs S >= 3: with S = 2 there is one
degree of freedom and t = 12.7, an interval too wide to say anything. A difference is *resolved*
when this interval excludes 0; otherwise the variants are not distinguished at this number of seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "Paired", "bootstrap", "paired", "t_interval", "t_quantile"]

BOOTSTRAP_SAMPLES = 2000
MIN_SEEDS = 3

# t(0.975, df), df = 1..30 (two-sided 95%), from the standard table
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """t(0.975, df): the table for df <= 30, else the Cornish-Fisher expansion around z = 1.959964 (error < 1e-3)."""
    if df < 1:
        raise ValueError(f"df = {df}: a t-interval needs at least 2 values")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int                   # rows (bootstrap) or seeds (t-interval)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap(diffs: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Interval:
    """The mean of ``diffs`` with its 95% percentile bootstrap interval (see the module docstring)."""
    d = np.asarray(diffs, dtype=np.float64)
    rng = np.random.Generator(np.random.PCG64(seed))
    means = d[rng.integers(0, len(d), size=(samples, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(d.mean()), float(low), float(high), len(d))


def t_interval(values: Sequence[float]) -> Interval | None:
    """mean ± t(0.975, S−1) · s / √S over S values; None with fewer than ``MIN_SEEDS``."""
    if len(values) < MIN_SEEDS:
        return None
    m, s = statistics.fmean(values), statistics.stdev(values)
    half = t_quantile(len(values) - 1) * s / math.sqrt(len(values))
    return Interval(m, m - half, m + half, len(values))


@dataclass(frozen=True)
class Paired:
    """B − A for one quantity: per seed the row-bootstrap interval, over seeds the t-interval."""
    per_seed: dict[int, Interval]
    seeds: Interval | None   # None: fewer than MIN_SEEDS paired seeds

    @property
    def resolved(self) -> bool:
        return self.seeds is not None and self.seeds.excludes_zero


def paired(a: dict[int, Sequence[float]], b: dict[int, Sequence[float]]) -> Paired:
    """Per-row values of A and B by seed (rows in the same order) -> their paired difference B − A."""
    per_seed = {}
    for k in sorted(set(a) & set(b)):
        if len(a[k]) != len(b[k]):
            raise ValueError(f"seed {k}: {len(a[k])} rows against {len(b[k])}: not the same rows")
        per_seed[k] = bootstrap([y - x for x, y in zip(a[k], b[k])])
    return Paired(per_seed, t_interval([i.mean for i in per_seed.values()]))
