"""``grapefx ablate --gpus 0,1|all``: independent runs of a matrix at the same time, one per GPU.

Each run is its own process, ``grapefx ablate MATRIX --out DIR --run NAME [--set ...]`` with
``CUDA_VISIBLE_DEVICES`` set to its GPU, so it trains and evaluates exactly as in a sequential
ablation and leaves a normal run folder (its output goes to ``RUN/ablate.log``). Runs are handed
out in the matrix's order (seed by seed) to whichever GPU is free; when one fails, no new run
starts, the running ones finish, and the failed run's status is returned. The report is then
written from the run folders, the same as after a sequential ablation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from runtime.ablate.matrix import Run
from spec.errors import GrapefxError

__all__ = ["parse_gpus", "schedule", "launch"]


class Handle(Protocol):
    def poll(self) -> int | None: ...           # None while running, else the exit status


def parse_gpus(text: str, available: int) -> list[str]:
    """``all`` -> every visible GPU; ``0,2`` -> those; each must exist and appear once."""
    if text == "all":
        ids = [str(i) for i in range(available)]
    else:
        ids = [t.strip() for t in text.split(",") if t.strip()]
        if not all(i.isdigit() for i in ids):
            raise GrapefxError(f"--gpus: {text!r} is not a list of GPU indices; write e.g. 0,1 or all")
        if len(set(ids)) != len(ids):
            raise GrapefxError(f"--gpus: {text}: a GPU is listed twice; one run at a time runs on each GPU")
        missing = [i for i in ids if int(i) >= available]
        if missing:
            raise GrapefxError(f"--gpus: GPU {', '.join(missing)} does not exist ({available} visible); use 0.."
                               f"{available - 1} or all" if available else "--gpus: no GPU is visible here; leave "
                               "--gpus out to run the matrix one run after another")
    if not ids:
        raise GrapefxError("--gpus: no GPU is visible here; leave --gpus out to run the matrix one run after another")
    return ids


def schedule(runs: Sequence[Run], devices: Sequence[str], start: Callable[[Run, str], Handle], *,
             say: Callable[[str], None] = print, poll_s: float = 0.5) -> int:
    """Run ``start(run, device)`` for every run, at most one per device at a time; 0, or the first failure's status."""
    pending, free = list(runs), list(devices)
    active: list[tuple[Run, str, Handle]] = []
    failed = 0
    while active or (pending and not failed):
        while pending and free and not failed:
            run, device = pending.pop(0), free.pop(0)
            say(f"{run.name}: started on GPU {device}")
            active.append((run, device, start(run, device)))
        time.sleep(poll_s if active else 0)
        for item in list(active):
            run, device, handle = item
            status = handle.poll()
            if status is None:
                continue
            active.remove(item)
            free.append(device)
            if status:
                say(f"{run.name}: failed on GPU {device} (status {status}); see {run.folder / 'ablate.log'}; no new "
                    "run starts")
                failed = failed or status
            else:
                say(f"{run.name}: done on GPU {device}")
    if failed and pending:
        say(f"not started: {', '.join(r.name for r in pending)}; run the same command again to continue")
    return failed


def launch(matrix_path: str, out: Path, overrides: Sequence[str]) -> Callable[[Run, str], Handle]:
    """A ``start`` for ``schedule``: the run as its own ``grapefx ablate --run`` process on one GPU."""
    def start(run: Run, device: str) -> subprocess.Popen:
        run.folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "runtime.cli", "ablate", matrix_path, "--out", str(out), "--run", run.name]
        for o in overrides:
            cmd += ["--set", o]
        log = open(run.folder / "ablate.log", "a")            # the child holds it; closed when the child exits
        try:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "CUDA_VISIBLE_DEVICES": device})
        finally:
            log.close()
    return start
