"""Loss by position on fixed rows: ``grapefx eval`` and the evaluation of every ``grapefx ablate`` run.

    core.py       evaluate(model, spec, streams, settings, device) -> the eval.json record
    positions.py  per-token losses -> contexts, bands, buckets (the identities, in its docstring)
    rows.py       which rows: distinct, never wrapped around the data, hashed
    data.py       the validation split or a named source (--data)
    plot.py       loss_by_position.png

``evaluate_folder`` is the command's whole job: load a run folder (its newest complete
checkpoint) or an export folder, evaluate, write ``OUT/eval.json`` and ``OUT/loss_by_position.png``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from runtime.evaluation.core import (
    EVAL_FILE,
    FORMAT,
    EvalSettings,
    evaluate,
    model_logits,
    write_json,
)
from runtime.evaluation.data import eval_source
from runtime.evaluation.plot import Curve, bucket_x, plot_loss_by_position

__all__ = ["EvalSettings", "evaluate", "evaluate_folder", "model_logits", "write_json", "plot_record", "EVAL_FILE",
           "FORMAT", "PLOT_FILE"]

PLOT_FILE = "loss_by_position.png"


def plot_record(path: Path, record: dict, label: str) -> Path:
    """loss_by_position.png of one eval.json record."""
    s = record["settings"]
    curve = Curve(label, bucket_x(record["buckets"]), [b["loss"] for b in record["buckets"]])
    return plot_loss_by_position(path, [curve], s["seq_len"], f"loss by position: {record['data']['rows_used']} rows "
                                                              f"of {s['length']} tokens, {record['data']['label']}")


def evaluate_folder(folder: str | Path, settings: EvalSettings, out: str | Path, *, data: str | None = None,
                    device: torch.device | None = None) -> tuple[dict, list[Path]]:
    """Evaluate a run or export folder into ``out``; returns the record and the files written."""
    from runtime.device import pick_device
    from runtime.trained import load_trained

    settings.check()
    device = device or pick_device()
    trained = load_trained(folder, device)
    source = eval_source(trained.spec, trained.tokenizer, data)
    record = evaluate(trained.model, trained.spec, source.streams, settings, device, data_label=source.label,
                      fix=source.fix, step=trained.step, source=str(folder))
    out = Path(out)
    json_path = write_json(out / EVAL_FILE, record)
    png = plot_record(out / PLOT_FILE, record, f"{Path(folder).name} (step {trained.step})")
    return record, [json_path, png]
