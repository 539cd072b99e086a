"""Paired statistics of the ablation report (runtime/ablate/stats.py), pinned with hand-computed numbers."""

import math

import pytest

from runtime.ablate.stats import bootstrap, paired, t_interval, t_quantile


def test_t_quantiles_are_the_table_and_the_expansion_beyond_it():
    assert t_quantile(2) == 4.303 and t_quantile(30) == 2.042
    assert t_quantile(40) == pytest.approx(2.021, abs=5e-4)       # table: t(0.975, 40) = 2.021
    assert t_quantile(120) == pytest.approx(1.980, abs=5e-4)      # table: t(0.975, 120) = 1.980
    with pytest.raises(ValueError):
        t_quantile(0)


def test_t_interval_over_seeds():
    # 0.3, 0.4, 0.5: mean 0.4, s = 0.1, half width 4.303 * 0.1 / sqrt(3) = 0.248434
    i = t_interval([0.3, 0.4, 0.5])
    assert (i.mean, i.low, i.high, i.n) == (pytest.approx(0.4), pytest.approx(0.151566, abs=1e-6),
                                            pytest.approx(0.648434, abs=1e-6), 3)
    assert i.excludes_zero
    assert not t_interval([-0.1, 0.0, 0.2]).excludes_zero
    assert t_interval([0.3, 0.4]) is None                        # two seeds: no interval


def test_bootstrap_percentiles():
    # rows [0, 1]: a resampled mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the 2.5th and 97.5th
    # percentiles of 2000 of them are 0 and 1
    i = bootstrap([0.0, 1.0])
    assert (i.mean, i.low, i.high, i.n) == (0.5, 0.0, 1.0, 2)
    c = bootstrap([0.25] * 7)
    assert (c.low, c.high) == (0.25, 0.25)
    assert bootstrap([0.0, 1.0, 3.0], seed=0) == bootstrap([0.0, 1.0, 3.0], seed=0)     # seeded


def test_paired_differences_are_per_row_then_per_seed():
    a = {1: [1.0, 2.0], 2: [1.0, 2.0], 3: [1.0, 2.0]}
    b = {1: [1.1, 2.1], 2: [1.2, 2.2], 3: [1.3, 2.3], 4: [9.0, 9.0]}      # seed 4 has no partner: left out
    p = paired(a, b)
    assert sorted(p.per_seed) == [1, 2, 3]
    assert [round(i.mean, 9) for i in p.per_seed.values()] == [0.1, 0.2, 0.3]
    half = 4.303 * 0.1 / math.sqrt(3)
    assert (p.seeds.low, p.seeds.high) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert not p.resolved                                              # 0.2 - 0.248 < 0
    with pytest.raises(ValueError, match="not the same rows"):
        paired({1: [1.0]}, {1: [1.0, 2.0]})
