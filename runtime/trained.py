"""A trained model, loaded back from a run folder or from an export folder (for generate/export).

    RUN/                          (written by ``grapefx train``)
        spec.resolved.yaml        the spec the model is lowered from
        checkpoints/step-NNNNNN/  the newest complete one is loaded (torch.distributed.checkpoint)
        (tokenizer: the one ``runtime.data.prepare(spec)`` gives, from the prepared data folder)

    EXPORT/                       (written by ``grapefx export``, ``runtime/export.py``)
        spec.yaml, config.json, model.safetensors [, tokenizer.json]

Either way the model is ``compiler.lower(spec)`` with the saved tensors loaded into it, eager, in
the device's compute dtype (``runtime.build.compute_dtype``); master weights stay fp32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler import GrapeModel, lower
from runtime.build import compute_dtype
from runtime.checkpoint import Checkpointer
from spec import load_spec
from spec.errors import GrapefxError
from spec.schema import Spec

__all__ = ["Trained", "load_trained", "load_run", "load_export", "is_export", "EXPORT_FILES"]

# the files an export folder always holds (tokenizer.json only with a BPE tokenizer)
EXPORT_FILES = ("spec.yaml", "config.json", "model.safetensors")


@dataclass
class Trained:
    spec: Spec
    model: GrapeModel
    tokenizer: object            # runtime.data ByteTokenizer | BPETokenizer | PretokenizedTokenizer
    step: int | None             # the optimizer step the weights are from (None: unknown)
    source: str                  # what was loaded, for messages: "RUN/checkpoints/step-000020" or "EXPORT"


def is_export(path: Path) -> bool:
    return all((path / name).is_file() for name in EXPORT_FILES)


def load_trained(path: str | Path, device: torch.device) -> Trained:
    """A run folder (newest complete checkpoint) or an export folder, whichever ``path`` is."""
    path = Path(path)
    if not path.is_dir():
        raise GrapefxError(f"{path}: no such folder; give a run folder (grapefx train --out) or an export folder "
                           "(grapefx export --out)")
    if is_export(path):
        return load_export(path, device)
    if (path / "spec.resolved.yaml").is_file():
        return load_run(path, device)
    raise GrapefxError(f"{path}: neither a run folder (no spec.resolved.yaml) nor an export folder (needs "
                       f"{', '.join(EXPORT_FILES)}); give the --out folder of grapefx train or grapefx export")


def load_run(run: str | Path, device: torch.device) -> Trained:
    """The model of ``run/spec.resolved.yaml`` with the newest complete checkpoint's weights."""
    from runtime.data import prepare

    run = Path(run)
    spec = load_spec(run / "spec.resolved.yaml")
    checkpoints = Checkpointer(run / "checkpoints", keep=1, say=lambda message: None)
    path = checkpoints.latest()
    if path is None:
        raise GrapefxError(f"{run}: no complete checkpoint in {run / 'checkpoints'}; train first "
                           f"(grapefx train SPEC --out {run})")
    model = lower(spec, dtype=compute_dtype(spec, device))
    tensors = {"model": model.state_dict()}      # DCP loads the saved values into these, in place
    state = checkpoints.load(path, tensors)
    model.load_state_dict(tensors["model"])
    model.to(device).eval()
    tokenizer = prepare(spec, progress=False).tokenizer
    return Trained(spec, model, tokenizer, int(state["step"]), str(path))


def load_export(folder: str | Path, device: torch.device) -> Trained:
    """The model of ``folder/spec.yaml`` with the weights of ``folder/model.safetensors`` (see export.py)."""
    from safetensors.torch import load_file

    from runtime.data.tokenizer import open_tokenizer

    folder = Path(folder)
    spec = load_spec(folder / "spec.yaml")
    config = json.loads((folder / "config.json").read_text())
    model = lower(spec, dtype=compute_dtype(spec, device))
    tensors = load_file(folder / "model.safetensors")
    differ = sorted(set(model.state_dict()) ^ set(tensors))
    if differ:
        raise GrapefxError(f"{folder / 'model.safetensors'}: its tensors do not match the model of spec.yaml "
                           f"(first difference: {differ[0]!r}); export the run again with grapefx export")
    model.load_state_dict(tensors)               # bf16 exports are cast back into the fp32 masters
    model.to(device).eval()
    tokenizer = open_tokenizer(config["tokenizer"], folder)
    return Trained(spec, model, tokenizer, config["source"].get("step"), str(folder))
