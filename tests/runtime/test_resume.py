"""Resuming with a changed spec names the keys that changed and the learning rate's jump."""

import pytest
import torch

from runtime.metrics import read_metrics
from runtime.resume import resume_note, spec_changes
from trainer_testing import train

CPU = torch.device("cpu")


def test_spec_changes_lists_every_changed_leaf():
    old = "train:\n  steps: 300\n  optimizer: {lr: 0.001, betas: [0.9, 0.95]}\nname: tiny\n"
    new = "train:\n  steps: 600\n  optimizer: {lr: 0.001, betas: [0.9, 0.99]}\nname: tiny\n"
    assert spec_changes(old, new) == [("train.steps", 300, 600), ("train.optimizer.betas", [0.9, 0.95], [0.9, 0.99])]
    note = resume_note("step-000300", spec_changes(old, new), 300, 1e-4, 3.3e-4)
    assert note == ("note: the spec differs from the one step-000300 was trained with (train.steps: 300 -> 600; "
                    "train.optimizer.betas: [0.9, 0.95] -> [0.9, 0.99]); continuing with the new one. The "
                    "learning-rate schedule is recomputed from the new settings: step 301 uses 3.30e-04 where the "
                    "old schedule was at 1.00e-04")
    assert "schedule" not in resume_note("s", [("train.log_every", 10, 5)], 3, 1e-4, 1e-4)


def test_resume_with_more_steps_follows_the_new_schedule_and_says_so(tiny_spec, tmp_path, capsys):
    train(tiny_spec(steps=4, eval_every=100), tmp_path / "r", device=CPU)
    capsys.readouterr()
    trainer, _ = train(tiny_spec(steps=8, eval_every=100), tmp_path / "r", resume=True, device=CPU)
    out = capsys.readouterr().out
    # peak 3e-4, warmup 2, floor 0.1. Old (4 steps): step 5 is past the end, 0.1 x 3e-4 = 3.00e-05.
    # New (8 steps): step 5 is (5 - 2) / (8 - 2) = half-way down the cosine: 0.1 + 0.9 x 0.5 = 0.55 -> 1.65e-04
    assert "(train.steps: 4 -> 8); continuing with the new one" in out
    assert "step 5 uses 1.65e-04 where the old schedule was at 3.00e-05" in out
    lr5 = next(r["lr"] for r in read_metrics(tmp_path / "r") if r["kind"] == "train" and r["step"] == 5)
    assert lr5 == pytest.approx(1.65e-4)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.0]
