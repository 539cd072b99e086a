"""`grapefx ablate`: train every (variant, seed) of a matrix the same way, evaluate each run the same way, report.

    DIR/
        runs/<variant>-seed<k>/   a run folder as grapefx train writes it, plus eval.json
        report.md, report.json, loss.png, grape_m_spectrum.png        (runtime/ablate_report.py)

Before anything trains, every run's spec is resolved (``runtime/ablate_matrix.py``) and checked:
variants may differ from the baseline only in the keys they declare, a run folder left by an
earlier invocation must hold the same resolved spec, and the validation split must fill the
evaluation batches at every context. What makes runs comparable: the same train.seed for the
same k gives every variant the same data order and, through per-name seeded initialisation
(``compiler/lower/init.py``), the same initial value for every parameter they share; the diff
check guarantees the same optimiser, schedule and data.

Resume: a run whose final checkpoint (step ``train.steps``) exists is not trained again; one with
an earlier complete checkpoint continues from it (the trainer's exact resume); ``eval.json`` is
reused when it was written for the same final step and evaluation settings. So re-running the same
command after a crash or Ctrl-C finishes what is missing and rewrites the report.

Evaluation of a run (``evaluate``): the final checkpoint is loaded into an eager, uncompiled
lowered model (its graphs are shape-generic, so longer rows need no recompile) in the device's
compute dtype. At each context c of ``eval.contexts`` it reads the first ``eval.batches`` batches
of ``batch_size`` rows of c x data.seq_len tokens from a validation sampler seeded with
``eval.seed``: the same rows for every run, whatever its seed. Per context it records the
token-weighted mean cross-entropy and the validation MaxVio (MATH.md §5) of the expert counts
summed over those batches, per MoE layer (mean over layers and the worst). It also stores the
learned GRAPE-M log-frequencies.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from compiler import GrapeModel, lower
from runtime.ablate_matrix import Change, Matrix, check_variants, load_matrix, run_name, run_spec, saved_spec_changes
from runtime.ablate_report import write_report
from runtime.balance import max_vio
from runtime.build import compute_dtype
from runtime.checkpoint import Checkpointer
from runtime.data import Sampler, prepare
from runtime.device import pick_device
from runtime.optim import frequency_owner
from spec.errors import GrapefxError, SpecError
from spec.schema import Spec

__all__ = ["Run", "ablate", "plan", "evaluate", "EVAL_FILE"]

EVAL_FILE = "eval.json"
EVAL_FORMAT = 1


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    spec: Spec
    folder: Path

    @property
    def name(self) -> str:
        return run_name(self.variant, self.seed)


def plan(matrix: Matrix, out: Path, overrides: Sequence[str] = ()) -> tuple[list[Run], dict[str, list[Change]]]:
    """Every run of the matrix and each variant's changes; checks fairness and earlier run folders.

    Runs are ordered seed by seed (all variants of the first seed, then the next seed), so an
    ablation stopped half-way already holds complete paired comparisons.
    """
    diffs = check_variants(matrix, overrides)
    runs = [Run(v.name, k, run_spec(matrix, v, k, overrides), out / "runs" / run_name(v.name, k))
            for k in matrix.seeds for v in matrix.variants]
    for run in runs:
        saved = run.folder / "spec.resolved.yaml"
        if saved.is_file():
            changes = saved_spec_changes(saved.read_text(), run.spec, str(saved))
            if changes:
                shown = ", ".join(str(c) for c in changes[:8]) + (", ..." if len(changes) > 8 else "")
                raise GrapefxError(f"{run.folder}: this run was started with a different spec ({shown}); the runs "
                                   "of one ablation must share one matrix and one --set list: re-run with the "
                                   "original arguments, or give a new --out (or delete that run folder)")
    return runs, diffs


def _batch_size(matrix: Matrix, spec: Spec) -> int:
    return matrix.eval.batch_size or spec.train.micro_batch


def _check_eval_rows(matrix: Matrix, runs: list[Run]) -> None:
    """Refuse before training when the validation split cannot fill the evaluation batches (no repeated rows)."""
    seen: set[str] = set()
    for run in runs:
        key = json.dumps([repr(run.spec.data), _batch_size(matrix, run.spec)])
        if key in seen:
            continue
        seen.add(key)
        valid = prepare(run.spec, progress=False).valid
        need = matrix.eval.batches * _batch_size(matrix, run.spec)
        for c in matrix.eval.contexts:
            length = c * run.spec.data.seq_len
            rows = sum((p.num_tokens - 1) // length for p in valid.parts)
            if rows < need:
                raise SpecError(matrix.file, "eval", f"the validation split of {run.name} holds {rows} row(s) of "
                                                     f"{length} tokens (context {c}x data.seq_len "
                                                     f"{run.spec.data.seq_len}), fewer than eval.batches x batch "
                                                     f"size = {need}; lower eval.batches, eval.batch_size or the "
                                                     "largest context, or raise data.valid_fraction")


# ---------------------------------------------------------------------- training
def _final_checkpoint(run: Run) -> Path | None:
    done = dict(Checkpointer(run.folder / "checkpoints", keep=1, say=lambda m: None).complete())
    return done.get(run.spec.train.steps)


def train(run: Run, command: Sequence[str], say=print) -> int:
    """Train ``run`` to train.steps, resuming from its newest complete checkpoint; 0 when done."""
    from runtime.trainer import Trainer

    checkpoints = Checkpointer(run.folder / "checkpoints", keep=1, say=lambda m: None).complete()
    if checkpoints and checkpoints[-1][0] >= run.spec.train.steps:
        say(f"{run.name}: trained (step {checkpoints[-1][0]}), not training again")
        return 0
    say(f"{run.name}: " + (f"resuming at step {checkpoints[-1][0]} of {run.spec.train.steps}" if checkpoints
                           else f"training {run.spec.train.steps} steps") + f" in {run.folder}")
    trainer = Trainer(run.spec, run.folder, resume=bool(checkpoints), command=command)
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


@torch.no_grad()
def evaluate(run: Run, model: GrapeModel, matrix: Matrix, device: torch.device) -> dict:
    """Validation loss and MaxVio at each context, and the GRAPE-M spectrum (see the module docstring)."""
    spec, e = run.spec, matrix.eval
    valid = prepare(spec, progress=False).valid
    batch_size = _batch_size(matrix, spec)
    contexts = []
    for c in e.contexts:
        length = c * spec.data.seq_len
        sampler = Sampler(valid, length, batch_size, e.seed)
        loss_sum, tokens, counts = 0.0, 0, None
        for _ in range(e.batches):
            x, y = sampler.next_batch()                                       # (B, c*T) each
            out = model(x.to(device), y.to(device))
            n = int((y != -100).sum())
            loss_sum += float(out.ce_loss.double()) * n
            tokens += n
            if out.counts is not None:                                        # (n_moe_layers, E)
                counts = out.counts.float() if counts is None else counts + out.counts.float()
        record = {"context": c, "seq_len": length, "rows": e.batches * batch_size, "tokens": tokens,
                  "val_loss": loss_sum / max(tokens, 1), "max_vio": None, "max_vio_worst": None,
                  "max_vio_worst_layer": None}
        if counts is not None:
            v = max_vio(counts)                                               # (n_moe_layers,)
            worst = int(torch.argmax(v))
            record.update(max_vio=float(v.mean()), max_vio_worst=float(v[worst]),
                          max_vio_worst_layer=model.moe_layers[worst] + 1)
        contexts.append(record)
    return {"format": EVAL_FORMAT, "step": spec.train.steps, "eval": {**e.as_dict(), "batch_size": batch_size},
            "device": str(device), "dtype": str(model.compute_dtype).removeprefix("torch."),
            "contexts": contexts, "grape_m": grape_m_vectors(model, spec)}


def grape_m_vectors(model: GrapeModel, spec: Spec) -> list[dict]:
    """Every GRAPE-M log-frequency vector of the model as ln(theta) and its RoPE initialisation ln(base^(-2j/D)).

    theta_j = exp(p_j / c) (MATH.md §2); the initial p_j gives theta_j = base^(-2j/D), j = 0..D/2-1.
    ``share: model`` gives one vector (``grape_m.log_freq``), ``share: layer`` one per rotating layer.
    """
    out = []
    for name, p in model.state_dict().items():
        if not name.endswith("grape_m.log_freq"):
            continue
        pos = frequency_owner(spec, name)
        half = p.numel()                                                      # D/2
        ln_init = [-2.0 * j / (2 * half) * math.log(pos.base) for j in range(half)]
        out.append({"name": name, "ln_theta": (p.double() / pos.log_freq_scale).tolist(), "ln_theta_init": ln_init,
                    "learnable": pos.learnable_freq})
    return out


def _cached_eval(run: Run, matrix: Matrix) -> dict | None:
    path = run.folder / EVAL_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    wanted = {**matrix.eval.as_dict(), "batch_size": _batch_size(matrix, run.spec)}
    same = (record.get("format"), record.get("step"), record.get("eval")) == (EVAL_FORMAT, run.spec.train.steps, wanted)
    return record if same else None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the command
def ablate(matrix_path: str | Path, out: str | Path, overrides: Sequence[str] = (), *,
           command: Sequence[str] = ("grapefx", "ablate")) -> int:
    """Run the whole matrix into ``out`` and write the report; 0 when done, else the failed run's status."""
    matrix, out = load_matrix(matrix_path), Path(out)
    runs, diffs = plan(matrix, out, overrides)
    _check_eval_rows(matrix, runs)
    nv, ns = len(matrix.variants), len(matrix.seeds)
    print(f"ablate {matrix.name}: {nv} variant{'s' * (nv != 1)} x {ns} seed{'s' * (ns != 1)} = {len(runs)} "
          f"run{'s' * (len(runs) != 1)} in {out / 'runs'}")
    for v in matrix.variants:
        changes = ", ".join(str(c) for c in diffs[v.name]) or "none (the baseline)"
        print(f"  {v.name}: {changes}")
    device, evals = pick_device(), {}
    for i, run in enumerate(runs, 1):
        say = lambda message, i=i: print(f"[{i}/{len(runs)}] {message}", flush=True)  # noqa: E731
        status = train(run, command, say)
        if status:
            say(f"{run.name}: stopped (status {status}); run the same command again to continue")
            return status
        evals[run.name] = _cached_eval(run, matrix)
        if evals[run.name] is not None:
            say(f"{run.name}: evaluated earlier ({run.folder / EVAL_FILE}), not evaluating again")
            continue
        lengths = ", ".join(str(c * run.spec.data.seq_len) for c in matrix.eval.contexts)
        say(f"{run.name}: evaluating the final weights at {lengths} tokens")
        evals[run.name] = evaluate(run, load_final(run, device), matrix, device)
        _write_json(run.folder / EVAL_FILE, evals[run.name])
    for path in write_report(out, matrix, runs, diffs, evals, command):
        print(f"wrote {path}")
    return 0
