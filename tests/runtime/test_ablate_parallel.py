"""`grapefx ablate --gpus`: scheduling runs one per device, tested with stand-in devices (no GPU needed)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.ablate.matrix import Run
from runtime.ablate.parallel import launch, parse_gpus, schedule
from spec.errors import GrapefxError


class FakeRun:
    """A stand-in for a training process: finishes with ``status`` after ``polls`` polls."""

    def __init__(self, log: list, run: Run, device: str, polls: int, status: int):
        self.log, self.run, self.device, self.left, self.status = log, run, device, polls, status

    def poll(self):
        self.left -= 1
        if self.left > 0:
            return None
        self.log.append(("end", self.run.name, self.device))
        return self.status


def _runs(tmp_path: Path, n: int) -> list[Run]:
    return [Run("v", k, None, tmp_path / f"v-seed{k}") for k in range(1, n + 1)]


def _scheduled(tmp_path, n, devices, polls, status=None):
    log = []
    status = status or {}

    def start(run, device):
        log.append(("start", run.name, device))
        return FakeRun(log, run, device, polls[run.seed], status.get(run.seed, 0))
    said = []
    result = schedule(_runs(tmp_path, n), devices, start, say=said.append, poll_s=0)
    return result, log, said


def _busy(log: list) -> dict[str, int]:
    """The most runs ever active on one device at once, per device."""
    active, most = {}, {}
    for kind, _, device in log:
        active[device] = active.get(device, 0) + (1 if kind == "start" else -1)
        most[device] = max(most.get(device, 0), active[device])
    return most


def test_runs_are_handed_out_in_order_to_the_free_device(tmp_path):
    # 5 runs on stand-in devices "a" and "b"; run 1 is slow, so "b" takes runs 2, 3 and 4 while "a" still works
    result, log, said = _scheduled(tmp_path, 5, ["a", "b"], polls={1: 9, 2: 1, 3: 1, 4: 1, 5: 1})
    assert result == 0
    starts = [(name, device) for kind, name, device in log if kind == "start"]
    assert starts == [("v-seed1", "a"), ("v-seed2", "b"), ("v-seed3", "b"), ("v-seed4", "b"), ("v-seed5", "b")]
    assert _busy(log) == {"a": 1, "b": 1}                       # never two runs on one device
    assert sum(1 for e in log if e[0] == "end") == 5
    assert said[0] == "v-seed1: started on GPU a" and "v-seed5: done on GPU b" in said


def test_a_failed_run_stops_new_starts_and_returns_its_status(tmp_path):
    result, log, said = _scheduled(tmp_path, 4, ["0", "1"], polls={1: 1, 2: 3, 3: 1, 4: 1}, status={1: 3})
    assert result == 3
    assert [n for k, n, _ in log if k == "start"] == ["v-seed1", "v-seed2"]    # seed 2 was running: it finishes
    assert any(m.startswith("v-seed1: failed on GPU 0 (status 3)") for m in said)
    assert said[-1] == "not started: v-seed3, v-seed4; run the same command again to continue"


@pytest.mark.parametrize("text, available, expected", [("all", 2, ["0", "1"]), ("1", 2, ["1"]), ("0, 1", 4, ["0", "1"])])
def test_gpu_lists(text, available, expected):
    assert parse_gpus(text, available) == expected


@pytest.mark.parametrize("text, available, message", [
    ("0,0", 2, "--gpus: 0,0: a GPU is listed twice"),
    ("2", 2, "--gpus: GPU 2 does not exist (2 visible); use 0..1 or all"),
    ("x", 2, "--gpus: 'x' is not a list of GPU indices; write e.g. 0,1 or all"),
    ("all", 0, "--gpus: no GPU is visible here; leave --gpus out"),
])
def test_gpu_list_errors(text, available, message):
    with pytest.raises(GrapefxError, match="^" + re.escape(message)):
        parse_gpus(text, available)


def test_each_run_is_its_own_process_on_its_own_gpu(tmp_path, monkeypatch):
    seen = {}

    def popen(cmd, stdout, stderr, env):
        seen.update(cmd=cmd, env=env, log=stdout.name)
        return "handle"
    monkeypatch.setattr(subprocess, "Popen", popen)
    run = Run("nope", 2, None, tmp_path / "out" / "runs" / "nope-seed2")
    assert launch("m.yaml", tmp_path / "out", ["train.steps=5"])(run, "3") == "handle"
    assert seen["cmd"] == [sys.executable, "-m", "runtime.cli", "ablate", "m.yaml", "--out", str(tmp_path / "out"),
                           "--run", "nope-seed2", "--set", "train.steps=5"]
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "3"
    assert seen["log"] == str(run.folder / "ablate.log")
