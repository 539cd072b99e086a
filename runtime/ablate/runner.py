"""`grapefx ablate`: train every (variant, seed) of a matrix the same way, evaluate each run the same way, report.

    DIR/
        runs/<variant>-seed<k>/   a run folder as grapefx train writes it, plus eval.json and loss_by_position.png
        report.md, report.json, loss_by_position.png, loss.png, grape_m_spectrum.png   (report.py)

Before anything trains, every run's spec is resolved (``matrix.py``) and checked: variants may
differ from the baseline only in the keys they declare, a run folder left by an earlier
invocation must hold the same resolved spec, and the validation split must hold the evaluation
rows. What makes runs comparable: the same train.seed for the same k gives every variant the same
data order and, through per-name seeded initialisation (``compiler/lower/init.py``), the same
initial value for every parameter they share; the diff check guarantees the same optimiser,
schedule and data.

Resume: a run whose final checkpoint (step ``train.steps``) exists is not trained again; one with
an earlier complete checkpoint continues from it (the trainer's exact resume); ``eval.json`` is
reused when it was written for the same final step and evaluation settings. So re-running the same
command after a crash or Ctrl-C finishes what is missing and rewrites the report.

Evaluation of a run (``evaluate_run``): the final checkpoint in an eager, uncompiled lowered model
(its graphs are shape-generic, so longer rows need no recompile) in the device's compute dtype,
scored by ``runtime.evaluation`` on the same validation rows for every run (``eval.seed``): the
loss at every position of rows of max(eval.contexts) x data.seq_len tokens, hence the loss at each
context, band and bucket, and the MaxVio at the training context. It also stores the learned
GRAPE-M log-frequencies (``spectrum.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from compiler import GrapeModel, lower
from runtime.ablate.matrix import (
    Change,
    Matrix,
    Run,
    check_variants,
    load_matrix,
    run_name,
    run_spec,
    saved_spec_changes,
)
from runtime.ablate.spectrum import grape_m_vectors
from runtime.build import compute_dtype
from runtime.checkpoint import Checkpointer
from runtime.data import prepare
from runtime.device import pick_device
from runtime.evaluation import (
    EVAL_FILE,
    FORMAT,
    PLOT_FILE,
    evaluate,
    plot_record,
    write_json,
)
from runtime.evaluation.rows import available_rows, streams_of_split
from spec.errors import GrapefxError, SpecError

__all__ = ["Run", "ablate", "plan", "evaluate_run", "load_final", "EVAL_FILE"]


def plan(matrix: Matrix, out: Path, overrides: Sequence[str] = (), *, check_saved: bool = True) -> \
        tuple[list[Run], dict[str, list[Change]]]:
    """Every run of the matrix and each variant's changes; checks fairness and earlier run folders.

    Runs are ordered seed by seed (all variants of the first seed, then the next seed), so an
    ablation stopped half-way already holds complete paired comparisons. ``check_saved=False``
    (``--report-only``, which trains nothing) accepts run folders whose saved spec differs, e.g.
    written by a grapefx version whose specs had fewer keys.
    """
    diffs = check_variants(matrix, overrides)
    runs = [Run(v.name, k, run_spec(matrix, v, k, overrides), out / "runs" / run_name(v.name, k))
            for k in matrix.seeds for v in matrix.variants]
    for run in runs if check_saved else []:
        saved = run.folder / "spec.resolved.yaml"
        if saved.is_file():
            changes = saved_spec_changes(saved.read_text(), run.spec, str(saved))
            if changes:
                shown = ", ".join(str(c) for c in changes[:8]) + (", ..." if len(changes) > 8 else "")
                raise GrapefxError(f"{run.folder}: this run was started with a different spec ({shown}); the runs "
                                   "of one ablation must share one matrix and one --set list: re-run with the "
                                   "original arguments, or give a new --out (or delete that run folder)")
    return runs, diffs


def _batch_size(matrix: Matrix, run: Run) -> int:
    return matrix.eval.batch_size or run.spec.train.micro_batch


def _check_eval_rows(matrix: Matrix, runs: list[Run]) -> None:
    """Refuse before training when the validation split cannot hold the evaluation rows (no repeated rows)."""
    seen: set[str] = set()
    for run in runs:
        key = json.dumps([repr(run.spec.data), _batch_size(matrix, run)])
        if key in seen:
            continue
        seen.add(key)
        length = max(matrix.eval.contexts) * run.spec.data.seq_len
        rows = available_rows(streams_of_split(prepare(run.spec, progress=False).valid), length)
        need = matrix.eval.batches * _batch_size(matrix, run)
        if rows < need:
            raise SpecError(matrix.file, "eval", f"the validation split of {run.name} holds {rows} row(s) of "
                                                 f"{length} tokens (the largest context, {max(matrix.eval.contexts)}x "
                                                 f"data.seq_len {run.spec.data.seq_len}), fewer than eval.batches x "
                                                 f"batch size = {need}; rows are never repeated: lower eval.batches, "
                                                 "eval.batch_size or the largest context, or raise "
                                                 "data.valid_fraction")


# ---------------------------------------------------------------------- training
def _final_checkpoint(run: Run) -> Path | None:
    done = dict(Checkpointer(run.folder / "checkpoints", keep=1, say=lambda m: None).complete())
    return done.get(run.spec.train.steps)


def train(run: Run, command: Sequence[str], say=print, device: torch.device | None = None) -> int:
    """Train ``run`` to train.steps, resuming from its newest complete checkpoint; 0 when done."""
    from runtime.trainer import Trainer

    checkpoints = Checkpointer(run.folder / "checkpoints", keep=1, say=lambda m: None).complete()
    if checkpoints and checkpoints[-1][0] >= run.spec.train.steps:
        say(f"{run.name}: trained (step {checkpoints[-1][0]}), not training again")
        return 0
    say(f"{run.name}: " + (f"resuming at step {checkpoints[-1][0]} of {run.spec.train.steps}" if checkpoints
                           else f"training {run.spec.train.steps} steps") + f" in {run.folder}")
    trainer = Trainer(run.spec, run.folder, resume=bool(checkpoints), command=command, device=device)
    try:
        return trainer.fit()
    finally:
        trainer.close()


# ---------------------------------------------------------------------- evaluation
def load_final(run: Run, device: torch.device) -> GrapeModel:
    """The eager lowered model of ``run.spec`` with the weights of its final checkpoint."""
    path = _final_checkpoint(run)
    if path is None:
        raise GrapefxError(f"{run.folder}: no complete checkpoint of step {run.spec.train.steps}; train it first")
    model = lower(run.spec, dtype=compute_dtype(run.spec, device))
    tensors = {"model": model.state_dict()}          # DCP loads the saved values into these, in place
    Checkpointer(run.folder / "checkpoints", keep=1, say=lambda m: None).load(path, tensors)
    model.load_state_dict(tensors["model"])
    return model.to(device).eval()


def evaluate_run(run: Run, model: GrapeModel, matrix: Matrix, device: torch.device) -> dict:
    """The run's eval.json record: loss by position on the matrix's fixed rows, plus the GRAPE-M spectrum."""
    valid = prepare(run.spec, progress=False).valid
    record = evaluate(model, run.spec, streams_of_split(valid), matrix.eval, device,
                      data_label=f"the validation split of {', '.join(valid.names)}",
                      fix="lower eval.batches, eval.batch_size or the largest context, or raise data.valid_fraction",
                      step=run.spec.train.steps, source=run.name)
    return {**record, "grape_m": grape_m_vectors(model, run.spec)}


def _cached_eval(run: Run, matrix: Matrix) -> dict | None:
    path = run.folder / EVAL_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    settings = record.get("settings", {})
    wanted = {**matrix.eval.as_dict(), "batch_size": _batch_size(matrix, run)}
    same = (record.get("format"), record.get("step")) == (FORMAT, run.spec.train.steps) and \
        all(settings.get(k) == v for k, v in wanted.items())
    return record if same else None


def train_and_evaluate(run: Run, matrix: Matrix, command: Sequence[str], device: torch.device, say=print) -> \
        tuple[int, dict | None]:
    """One run, trained (or resumed) and evaluated (or its eval.json reused): (status, record)."""
    status = train(run, command, say, device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None    # the last minute of training (or of nothing)
    if status:
        say(f"{run.name}: stopped (status {status}); run the same command again to continue")
        return status, None
    record = _cached_eval(run, matrix)
    if record is not None:
        say(f"{run.name}: evaluated earlier ({run.folder / EVAL_FILE}), not evaluating again")
        return 0, record
    length = max(matrix.eval.contexts) * run.spec.data.seq_len
    say(f"{run.name}: scoring every position of {matrix.eval.batches} x {_batch_size(matrix, run)} validation rows "
        f"of {length} tokens with the final weights")
    record = {**evaluate_run(run, load_final(run, device), matrix, device),
              "host": {"load_1min": load, "cpu_count": os.cpu_count()}}
    write_json(run.folder / EVAL_FILE, record)
    plot_record(run.folder / PLOT_FILE, record, run.name)
    return 0, record


# ---------------------------------------------------------------------- the command
def _recorded_evals(runs: list[Run], matrix: Matrix) -> dict[str, dict]:
    """Every run's eval.json as it is in its folder (``--report-only``); an error names the first one missing."""
    evals = {}
    for run in runs:
        record = _cached_eval(run, matrix)
        if record is None:
            raise GrapefxError(f"{run.folder / EVAL_FILE}: missing, or written for other evaluation settings or "
                               "another step; run grapefx ablate without --report-only to train and evaluate it")
        evals[run.name] = record
    return evals


def ablate(matrix_path: str | Path, out: str | Path, overrides: Sequence[str] = (), *,
           command: Sequence[str] = ("grapefx", "ablate"), report_only: bool = False, only: str | None = None,
           gpus: str | None = None) -> int:
    """Run the whole matrix into ``out`` and write the report; 0 when done, else the failed run's status.

    ``report_only``: train and evaluate nothing; rewrite the report from the run folders' records.
    ``only``: train and evaluate that one run (a name like ``baseline-seed1``), no report.
    ``gpus``: the runs at the same time, one per GPU (``parallel.py``), then the report.
    """
    from runtime.ablate.report import write_report

    matrix, out = load_matrix(matrix_path), Path(out)
    runs, diffs = plan(matrix, out, overrides, check_saved=not report_only)
    if only is not None:
        chosen = [r for r in runs if r.name == only]
        if not chosen:
            raise GrapefxError(f"--run: {only!r} is not a run of {matrix.file}; its runs are "
                               f"{', '.join(r.name for r in runs)}")
        return train_and_evaluate(chosen[0], matrix, command, pick_device())[0]
    if report_only:                        # the report shows the command that trained the runs (env.json)
        env = runs[0].folder / "env.json"
        command = (json.loads(env.read_text()).get("command") if env.is_file() else None) or command
        for path in write_report(out, matrix, runs, diffs, _recorded_evals(runs, matrix), command):
            print(f"wrote {path}")
        return 0
    _check_eval_rows(matrix, runs)
    nv, ns = len(matrix.variants), len(matrix.seeds)
    print(f"ablate {matrix.name}: {nv} variant{'s' * (nv != 1)} x {ns} seed{'s' * (ns != 1)} = {len(runs)} "
          f"run{'s' * (len(runs) != 1)} in {out / 'runs'}")
    for v in matrix.variants:
        changes = ", ".join(str(c) for c in diffs[v.name]) or "none (the baseline)"
        print(f"  {v.name}: {changes}")
    if gpus is not None:
        from runtime.ablate.parallel import launch, parse_gpus, schedule

        devices = parse_gpus(gpus, torch.cuda.device_count())
        print(f"running {len(runs)} runs on GPU{'s' * (len(devices) > 1)} {', '.join(devices)}, one per GPU at a time "
              "(each run's output: its folder's ablate.log)", flush=True)
        status = schedule(runs, devices, launch(str(matrix_path), out, overrides),
                          say=lambda m: print(m, flush=True))
        if status:
            return status
        evals = _recorded_evals(runs, matrix)
    else:
        device, evals = pick_device(), {}
        for i, run in enumerate(runs, 1):
            say = lambda message, i=i: print(f"[{i}/{len(runs)}] {message}", flush=True)  # noqa: E731
            status, evals[run.name] = train_and_evaluate(run, matrix, command, device, say)
            if status:
                return status
    for path in write_report(out, matrix, runs, diffs, evals, command):
        print(f"wrote {path}")
    return 0
