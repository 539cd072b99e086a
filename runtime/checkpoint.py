"""Checkpoint folders: written atomically with torch.distributed.checkpoint, found again on resume.

Layout of ``RUN/checkpoints/``::

    step-000200/
        .metadata, __0_0.distcp    torch.distributed.checkpoint (DCP): every tensor (model incl.
                                   expert biases, optimizer state, RNG states)
        state.json                 everything else: step, tokens, scheduler, optimizer
                                   hyper-parameters, sampler state, resolved spec text
        complete.json              the marker, written last: a folder without it is not a checkpoint
    .tmp-step-000300/              a save in progress (or cut short by a crash)

A save writes into ``.tmp-step-NNNNNN/``, fsyncs every file, writes ``complete.json``, fsyncs,
then renames the folder to ``step-NNNNNN/`` and fsyncs the parent, so a crash at any moment
leaves either the old set of checkpoints or the new one, never a half-written ``step-*``.
Only the newest ``keep`` complete checkpoints are kept.

The DCP part holds tensors only: DCP would unpickle non-tensor values with
``torch.load(weights_only=False)``, so those go to ``state.json`` instead. DCP works in one
process without a process group; with one, every rank calls ``save``/``load`` (DCP is
collective) and the ``coordinator`` (rank 0) alone renames, marks and prunes, between ``barrier``s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from spec.errors import GrapefxError

__all__ = ["Checkpointer", "MARKER", "STATE"]

MARKER = "complete.json"
STATE = "state.json"
_STEP = re.compile(r"^step-(\d+)$")


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): nothing to flush
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as fh:
        json.dump(value, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _quiet(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a DCP function without its 'assuming a single process' warning (one process is intended)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return fn(*args, **kwargs)


def _cause(e: BaseException) -> str:
    """The last line of DCP's per-rank traceback text (e.g. 'ValueError: Size mismatch ... for model.w')."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1][:400] if lines else type(e).__name__


class Checkpointer:
    """Saves, finds and loads the checkpoints under ``folder`` (``RUN/checkpoints``)."""

    def __init__(self, folder: str | Path, keep: int, *, say: Callable[[str], None] = print,
                 coordinator: bool = True, barrier: Callable[[], None] = lambda: None):
        if keep < 1:
            raise GrapefxError(f"train.keep_checkpoints: {keep} must be >= 1 (the newest checkpoint is needed to resume)")
        self.folder, self.keep, self.say = Path(folder), keep, say
        self.coordinator, self.barrier = coordinator, barrier

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:06d}"

    # ------------------------------------------------------------------ finding
    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first, as (step, folder)."""
        found = []
        for path in self.folder.glob("step-*") if self.folder.is_dir() else ():
            m = _STEP.match(path.name)
            if m and path.is_dir() and (path / MARKER).is_file():
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint; says which folders it skipped and why."""
        if not self.folder.is_dir():
            return None
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith(".tmp-"):
                self.say(f"skipping {path}: a save that did not finish (the run stopped while writing it)")
            elif _STEP.match(path.name) and not (path / MARKER).is_file():
                self.say(f"skipping {path}: no {MARKER}, so it was cut short (a crash while writing it)")
        done = self.complete()
        return done[-1][1] if done else None

    # ------------------------------------------------------------------ saving
    def save(self, step: int, tensors: dict[str, Any], state: dict[str, Any]) -> Path:
        """Write ``tensors`` (nested dicts of tensors) and ``state`` (JSON) as ``step-NNNNNN``; prune old ones."""
        final = self.folder / self.name(step)
        tmp = self.folder / f".tmp-{self.name(step)}"
        if self.coordinator:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".tmp-*"):    # saves cut short earlier: one save runs at a time
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        _quiet(dcp.save, tensors, checkpoint_id=tmp)
        self.barrier()
        if self.coordinator:
            _write_json(tmp / STATE, state)
            _fsync_tree(tmp)
            _write_json(tmp / MARKER, {"step": step, "format": 1})
            _fsync_dir(tmp)
            if final.exists():                      # a re-run of this step after a resume from an older one
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        for _, path in self.complete()[:-self.keep]:
            shutil.rmtree(path)

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, tensors: dict[str, Any]) -> dict[str, Any]:
        """Load the tensors of checkpoint ``path`` into ``tensors`` in place; return its ``state.json``."""
        if not (path / MARKER).is_file():
            raise GrapefxError(f"{path}: no {MARKER}; it is not a complete checkpoint")
        try:
            _quiet(dcp.load, tensors, checkpoint_id=path)
        except (CheckpointException, RuntimeError, ValueError) as e:  # a shape or key mismatch
            raise GrapefxError(f"{path}: cannot be loaded into this model ({_cause(e)}); "
                               "was it written by a different spec? Resume with the spec of that run, or "
                               "train into a new --out folder") from e
        with open(path / STATE) as fh:
            return json.load(fh)
