"""Checkpoint folders: atomic writes, skipping cut-short ones, keeping the newest K, loading in place."""

import json

import pytest
import torch

from runtime.checkpoint import MARKER, Checkpointer
from spec.errors import GrapefxError


def _tensors(v: float):
    return {"model": {"w": torch.full((2, 3), v), "b": torch.full((3,), -v)}, "rng": {"k": torch.arange(4) + int(v)}}


def test_save_then_load_in_place(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", keep=2)
    path = ck.save(7, _tensors(1.5), {"step": 7, "sampler": {"epoch": 0, "position": 12}})
    assert path.name == "step-000007"
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", MARKER, "state.json"]
    target = _tensors(0.0)
    state = ck.load(path, target)
    assert state == {"step": 7, "sampler": {"epoch": 0, "position": 12}}
    assert torch.equal(target["model"]["w"], torch.full((2, 3), 1.5)) and torch.equal(target["rng"]["k"], torch.arange(4) + 1)


def test_keeps_only_the_newest_k(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        ck.save(step, _tensors(step), {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]


def test_latest_skips_unfinished_saves_with_a_message(tmp_path):
    messages = []
    ck = Checkpointer(tmp_path, keep=5, say=messages.append)
    ck.save(2, _tensors(2.0), {"step": 2})
    (tmp_path / ".tmp-step-000004").mkdir()                     # a crash in the middle of a save
    (tmp_path / ".tmp-step-000004" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / "step-000003").mkdir()                          # a folder without the marker
    assert ck.latest() == tmp_path / "step-000002"
    assert any(".tmp-step-000004" in m and "did not finish" in m for m in messages)
    assert any("step-000003" in m and MARKER in m and "cut short" in m for m in messages)


def test_a_new_save_clears_stale_temporaries_and_replaces_a_rerun_step(tmp_path):
    ck = Checkpointer(tmp_path, keep=5)
    ck.save(3, _tensors(3.0), {"step": 3, "run": 1})
    (tmp_path / ".tmp-step-000009").mkdir()
    ck.save(3, _tensors(4.0), {"step": 3, "run": 2})            # step 3 again, after resuming from an older one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003"]
    assert json.loads((tmp_path / "step-000003" / "state.json").read_text())["run"] == 2


def test_load_refuses_a_folder_without_the_marker_and_a_mismatched_model(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    path = ck.save(1, _tensors(1.0), {"step": 1})
    wrong = {"model": {"w": torch.zeros(5, 5), "b": torch.zeros(3)}, "rng": {"k": torch.zeros(4, dtype=torch.int64)}}
    with pytest.raises(GrapefxError, match="cannot be loaded into this model"):
        ck.load(path, wrong)
    (path / MARKER).unlink()
    with pytest.raises(GrapefxError, match="not a complete checkpoint"):
        ck.load(path, _tensors(0.0))


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(GrapefxError, match="train.keep_checkpoints: 0 must be >= 1"):
        Checkpointer(tmp_path, keep=0)
