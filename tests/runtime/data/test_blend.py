"""Blending sources by weight: the ideal-times schedule, pinned by hand, and its proportions."""

import numpy as np
import pytest

from runtime.data import DataError, IndexedDataset, Sampler, Split, blend_schedule, write_indexed_dataset


def test_schedule_by_hand_three_to_one():
    # weights 0.75 / 0.25: source 0 is due at (k + 0.5) / 0.75 = 0.67, 2, 3.33, 4.67, 6, 7.33, ...,
    # source 1 at (k + 0.5) / 0.25 = 2, 6, 10, ...; ties (t = 2, t = 6) go to source 0 first.
    source, draw, per_epoch = blend_schedule([100, 10], [3, 1])
    assert source[:8].tolist() == [0, 0, 1, 0, 0, 0, 1, 0]
    assert draw[:8].tolist() == [0, 1, 0, 2, 3, 4, 1, 5]
    # N = 110 slots: source 0's 83rd draw and source 1's 28th are both due at t = 110; the tie
    # goes to source 0, so the epoch holds 83 + 27.
    assert per_epoch.tolist() == [83, 27]


def test_schedule_equal_weights_alternates():
    source, _, per_epoch = blend_schedule([3, 5], [1, 1])
    assert source.tolist() == [0, 1, 0, 1, 0, 1, 0, 1] and per_epoch.tolist() == [4, 4]


def test_every_prefix_stays_proportional():
    weights = np.array([0.5, 0.3, 0.2])
    source, _, _ = blend_schedule([400, 300, 300], weights)
    counts = np.cumsum(np.eye(3)[source], axis=0)  # (N, 3) draws per source after i + 1 slots
    ideal = np.outer(np.arange(1, 1001), weights)
    assert np.abs(counts - ideal).max() < 1.0


@pytest.fixture
def two_sources(tmp_path):
    """Source 0: 401 tokens < 100 (100 rows at T=4); source 1: 41 tokens >= 1000 (10 rows)."""
    write_indexed_dataset(tmp_path / "a", [np.arange(401) % 100], np.uint16)
    write_indexed_dataset(tmp_path / "b", [1000 + np.arange(41)], np.uint16)
    return IndexedDataset(tmp_path / "a"), IndexedDataset(tmp_path / "b")


def test_sampler_draws_sources_in_proportion_and_repeats_the_small_one(two_sources):
    split = Split("train", two_sources, [3.0, 1.0])
    assert split.weights == (0.75, 0.25)
    s = Sampler(split, seq_len=4, batch_size=10, seed=0)
    x = np.concatenate([s.next_batch()[0].numpy() for _ in range(11)])  # one epoch: 110 rows
    from_b = x[:, 0] >= 1000
    assert from_b.sum() == 27 and (~from_b).sum() == 83
    # source 1 has 10 rows; its 27 draws are passes 0 and 1 (each row once) and 7 rows of pass 2
    rows_b = (x[from_b, 0] - 1000) // 4
    assert sorted(rows_b[:10]) == sorted(rows_b[10:20]) == list(range(10))
    assert np.bincount(rows_b, minlength=10).max() == 3


def test_blend_resume_is_exact(two_sources):
    split = Split("train", two_sources, [1.0, 2.0])
    ref = Sampler(split, 4, 7, seed=1)
    batches = [ref.next_batch()[0] for _ in range(12)]
    s = Sampler(split, 4, 7, seed=1)
    for _ in range(5):
        s.next_batch()
    t = Sampler(split, 4, 7, seed=1)
    t.load_state_dict(s.state_dict())
    assert all((t.next_batch()[0] == b).all() for b in batches[5:])


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_non_positive_weights_are_refused(two_sources, weight):
    with pytest.raises(DataError, match=r"data.sources\[1\].weight: .* must be a positive number"):
        Split("train", two_sources, [1.0, weight])
