"""`grapefx train` end to end on a tiny spec, eagerly (--no-compile)."""

import json
import re

from runtime.cli import main
from runtime.metrics import read_metrics


def test_train_writes_the_run_folder_and_resumes(tiny_yaml, tmp_path, capsys):
    spec = tiny_yaml(steps=4, eval_every=2, checkpoint_every=2, keep_checkpoints=1)
    run = tmp_path / "run"
    assert main(["train", str(spec), "--out", str(run), "--no-compile", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "step 1/3  loss " in out and "  lr " in out and "  tok/s " in out and "  mfu " in out and "maxvio " in out
    assert "eval 2/3  val_loss " in out and f"run folder: {run}" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003"]   # keep 1
    assert {"spec.resolved.yaml", "env.json", "metrics.jsonl", "loss.png", "checkpoints"} <= {p.name for p in run.iterdir()}
    env = json.loads((run / "env.json").read_text())
    assert env["command"] == ["grapefx", "train", str(spec), "--out", str(run), "--steps", "3", "--no-compile"]
    assert "train:\n  steps: 3\n" in (run / "spec.resolved.yaml").read_text()

    # more steps: --resume picks up step 3 and trains step 4 only
    assert main(["train", str(spec), "--out", str(run), "--no-compile", "--steps", "4", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 4/4" in out and "step 3/4" not in out
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_nan_exits_with_status_3_and_says_why(tiny_yaml, tmp_path, capsys):
    # an absurd learning rate without clipping overflows the weights within a few steps
    spec = tiny_yaml(steps=6, grad_clip=None, optimizer={"lr": 1e30}, schedule={"warmup_steps": 1})
    assert main(["train", str(spec), "--out", str(tmp_path / "run"), "--no-compile"]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]   # earlier lines: data preparation
    assert re.match(r"step \d+: (loss|gradient norm) is (nan|inf); training stopped", err), err
    assert "training stopped" in err and "Lower train.optimizer.lr" in err


def test_user_errors_exit_2_with_one_line(tiny_yaml, tmp_path, capsys):
    spec = tiny_yaml(steps=2)
    run = tmp_path / "run"
    assert main(["train", str(spec), "--out", str(run), "--no-compile"]) == 0
    capsys.readouterr()
    assert main(["train", str(spec), "--out", str(run), "--no-compile"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
