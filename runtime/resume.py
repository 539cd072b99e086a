"""Resuming with a changed spec: which keys changed, and what that does to the run, in words.

A checkpoint stores the resolved spec it was trained with (``state.json``: ``spec``). When the
spec given to ``--resume`` differs, the run continues with the new one, and from the next step:

- the learning rate follows the new schedule (``train.steps``, ``train.schedule``,
  ``train.optimizer.lr``) at the step reached: with more steps the cosine is stretched, so the
  rate usually jumps up (300 of 300 steps ends at the floor; 300 of 600 is half-way down);
- AdamW's betas, eps and weight decay are the new spec's (its moments are kept);
- everything else (logging, evaluation, checkpoint cadence) is simply the new value.

The model's shape and the data cannot change under a checkpoint: loading it fails with its own
message before this note.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["spec_changes", "resume_note", "SCHEDULE_KEYS"]

SCHEDULE_KEYS = ("train.steps", "train.schedule.", "train.optimizer.lr")
MAX_LISTED = 12


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def spec_changes(old_yaml: str, new_yaml: str) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every leaf that differs, in the new spec's order (absent = None)."""
    old, new = _flat(yaml.safe_load(old_yaml) or {}), _flat(yaml.safe_load(new_yaml) or {})
    keys = list(new) + [k for k in old if k not in new]
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def _lr(x: float) -> str:
    return f"{x:.2e}"


def resume_note(checkpoint: str, changes: list[tuple[str, Any, Any]], step: int, old_lr: float,
                new_lr: float) -> str:
    """The note printed on resume: the changed keys, and the learning rate's jump if the schedule changed."""
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:MAX_LISTED])
    more = f"; and {len(changes) - MAX_LISTED} more" if len(changes) > MAX_LISTED else ""
    note = (f"note: the spec differs from the one {checkpoint} was trained with ({shown}{more}); continuing with "
            "the new one")
    if any(k.startswith(SCHEDULE_KEYS) for k, _, _ in changes):
        note += (f". The learning-rate schedule is recomputed from the new settings: step {step + 1} uses "
                 f"{_lr(new_lr)} where the old schedule was at {_lr(old_lr)}")
    return note
