"""Packing, deterministic order, exact resume and rank sharding of the batch sampler."""

import numpy as np
import pytest
import torch

from runtime.data import DataError, IndexedDataset, Sampler, write_indexed_dataset


@pytest.fixture
def stream(tmp_path) -> IndexedDataset:
    """41 tokens whose ids equal their stream position (two documents), so a row names itself."""
    write_indexed_dataset(tmp_path / "s", [np.arange(0, 20), np.arange(20, 41)], np.uint16)
    return IndexedDataset(tmp_path / "s")


def drain(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def row_ids(batches, seq_len):
    """Row index r of each row (its first token is r * T)."""
    return [int(r) // seq_len for x, _ in batches for r in x[:, 0]]


def test_rows_are_T_plus_1_tokens_overlapping_by_one(stream):
    s = Sampler(stream, seq_len=4, batch_size=5, seed=0)
    x, y = s.next_batch()
    assert x.shape == y.shape == (5, 4) and x.dtype == y.dtype == torch.int64
    for r in (x[:, 0] // 4).tolist():  # row r = stream[4r : 4r + 5], crossing document boundaries
        i = (x[:, 0] == 4 * r).nonzero().item()
        assert x[i].tolist() == [4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3]
        assert y[i].tolist() == [4 * r + 1, 4 * r + 2, 4 * r + 3, 4 * r + 4]
    assert s.rows_per_epoch == (41 - 1) // 4 == 10


@pytest.mark.parametrize("batch_size", [1, 3])
def test_inputs_and_targets_share_no_memory(stream, batch_size):
    # the evaluation writes -100 into targets; at B = 1 the two slices of one row were views
    # overlapping by T - 1 tokens, and inputs became -100 (an embedding index out of range)
    x, y = Sampler(stream, seq_len=4, batch_size=batch_size, seed=0).next_batch()
    before = x.clone()
    y[:, 1:] = -100
    assert torch.equal(x, before)


def test_each_epoch_is_a_permutation_and_reshuffles(stream):
    s = Sampler(stream, seq_len=4, batch_size=5, seed=0)
    e0, e1 = row_ids(drain(s, 2), 4), row_ids(drain(s, 2), 4)
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert e0 != e1
    assert s.state_dict()["epoch"] == 2 and s.state_dict()["position"] == 0


def test_same_seed_same_order_other_seed_other_order(stream):
    a = row_ids(drain(Sampler(stream, 4, 5, seed=7), 4), 4)
    assert a == row_ids(drain(Sampler(stream, 4, 5, seed=7), 4), 4)
    assert a != row_ids(drain(Sampler(stream, 4, 5, seed=8), 4), 4)


def test_a_batch_crossing_the_epoch_end_takes_both_sides(stream):
    straight = row_ids(drain(Sampler(stream, 4, 1, seed=3), 12), 4)  # 10 rows of epoch 0, 2 of epoch 1
    s = Sampler(stream, 4, 4, seed=3)
    assert row_ids(drain(s, 3), 4) == straight
    assert s.state_dict() == {"epoch": 1, "position": 2, "seed": 3, "rows_per_epoch": 10}


def test_resume_continues_exactly_through_torch_save(stream, tmp_path):
    reference = drain(Sampler(stream, 4, 3, seed=5), 9)
    first = Sampler(stream, 4, 3, seed=5)
    drain(first, 4)
    torch.save({"sampler": first.state_dict()}, tmp_path / "ckpt.pt")
    resumed = Sampler(stream, 4, 3, seed=999)  # the checkpoint's seed wins
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["sampler"])
    for (x, y), (rx, ry) in zip(drain(resumed, 5), reference[4:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_state_survives_distributed_checkpoint(stream, tmp_path):
    import torch.distributed.checkpoint as dcp

    s = Sampler(stream, 4, 3, seed=5)
    drain(s, 4)
    dcp.save({"sampler": s.state_dict()}, checkpoint_id=tmp_path / "dcp")
    target = {"sampler": Sampler(stream, 4, 3, seed=0).state_dict()}
    dcp.load(target, checkpoint_id=tmp_path / "dcp")
    assert target["sampler"] == s.state_dict()


def test_ranks_take_disjoint_slices_whose_union_is_the_world_1_batch(stream):
    world, B = 3, 2
    ranks = [Sampler(stream, 4, B, seed=11, rank=r, world=world) for r in range(world)]
    single = Sampler(stream, 4, B * world, seed=11)
    for _ in range(5):  # 30 rows: crosses two epoch ends
        parts = [r.next_batch() for r in ranks]
        x, y = single.next_batch()
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(r.state_dict() == single.state_dict() for r in ranks)


def test_state_from_other_data_is_refused(stream):
    s = Sampler(stream, 4, 2, seed=0)
    with pytest.raises(DataError, match="state is for 20 rows per epoch but the data split has 10 at seq_len 4"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 0, "rows_per_epoch": 20})


def test_a_stream_shorter_than_one_row_is_refused(stream):
    with pytest.raises(DataError, match=r"41 tokens cannot fill one row of seq_len \+ 1 = 42 tokens; lower data"):
        Sampler(stream, seq_len=41, batch_size=1, seed=0)
