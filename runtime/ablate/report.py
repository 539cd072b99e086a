"""The ablation report: ``report.md``, ``report.json`` and the figures (``figures.py``).

It takes data only (the matrix, the runs' specs and folders, their eval.json records), reads back
``metrics.jsonl`` and ``env.json`` from the run folders, and never trains or evaluates: a report
can be rewritten from finished run folders at any time (``grapefx ablate --report-only``).

Quantities, each defined once in the report beside its numbers:
- loss in band [a, b) and loss at c× (eval.json; ``runtime/evaluation/positions.py``): the same N
  rows of L = max(contexts) · T tokens for every run, nats/token;
- final validation loss: the trainer's last evaluation (``train.eval_batches`` micro-batches of
  T-token rows drawn by the run's own seed: other rows for each seed, and fewer), nats/token;
- validation MaxVio at the training context: eval.json's ``training_context``;
- training throughput: tokens / seconds over the logged windows after the first (warm-up and
  compilation), tokens/s.

Per variant a quantity is summarised over seeds as mean [min–max]. Differences between a variant
and the reference (the matrix's first variant) are paired on identical rows and equal seeds
(``stats.py``): per seed a row-bootstrap interval (evaluation noise), over seeds a t-interval
(training noise); "resolved" only when the seed-level interval excludes 0. Throughput has no rows:
only its seed-level interval, and on a CPU it is marked indicative.
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime.ablate.figures import plot_extrapolation, plot_loss, plot_spectrum
from runtime.ablate.matrix import Change, Matrix, Run
from runtime.ablate.stats import MIN_SEEDS, Interval, Paired, paired, t_interval
from runtime.evaluation.core import write_json, write_text
from runtime.metrics import read_metrics
from spec.errors import GrapefxError

__all__ = ["Quantity", "Summary", "quantities", "throughput", "write_report"]


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float               # population std over seeds (report.json only)
    min: float
    max: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Summary | None:
        if not values:
            return None
        return Summary(statistics.fmean(values), statistics.pstdev(values), min(values), max(values), len(values))


@dataclass(frozen=True)
class Quantity:
    """A loss on the fixed rows: at a context (positions < c·T) or in a band (positions a..b−1)."""
    key: str                 # loss_2x, band_128_256
    label: str               # table header
    name: str                # in sentences
    kind: str                # "context" | "band"
    index: int               # into eval.json's contexts / bands and per_row lists


def quantities(record: dict) -> list[Quantity]:
    """The bands, then the contexts, of one eval.json record."""
    T = record["settings"]["seq_len"]
    out = []
    for i, b in enumerate(record["bands"]):
        a, e = b["positions"]
        where = ("within the training length" if a == 0 else f"at {_times(a, T)}–{_times(e, T)}× the training length")
        out.append(Quantity(f"band_{a}_{e}", f"[{a}, {e})", f"the loss {where} (positions {a}–{e - 1})", "band", i))
    for i, c in enumerate(record["contexts"]):
        n = c["positions"][1]
        out.append(Quantity(f"loss_{c['context']}x", f"< {n} ({c['context']}×)",
                            f"the loss at {c['context']}× the training length (positions < {n})", "context", i))
    return out


def _times(p: int, T: int) -> str:
    return f"{p // T}" if p % T == 0 else f"{p / T:.2g}"


def throughput(records: Sequence[dict]) -> float | None:
    """Training tokens/s over the logged windows after the first (warm-up, compilation); all of them if one."""
    lines = [r for r in records if r.get("kind") == "train" and r.get("tokens_per_s")]
    if not lines:
        return None
    windows, previous = [], 0
    for r in lines:                                   # each line's window: tokens since the previous line
        tokens = r["tokens"] - previous
        previous = r["tokens"]
        windows.append((tokens, tokens / r["tokens_per_s"]))
    steady = windows[1:] or windows
    return sum(t for t, _ in steady) / sum(s for _, s in steady)


# ---------------------------------------------------------------------- collecting
def _check_same_rows(runs: Sequence[Run], evals: Mapping[str, dict]) -> None:
    digests = {evals[r.name]["data"]["rows_sha256"] for r in runs}
    if len(digests) > 1:
        names = ", ".join(f"{r.name} {evals[r.name]['data']['rows_sha256'][:12]}" for r in runs)
        raise GrapefxError(f"the runs were evaluated on different rows ({names}), so they cannot be paired; their "
                           "data sections must be equal (the matrix's fairness check ensures it): delete the "
                           "differing eval.json files and run grapefx ablate again")


def _run_values(run: Run, record: dict, metrics: list[dict], qs: Sequence[Quantity]) -> dict[str, float | None]:
    evals = [r for r in metrics if r.get("kind") == "eval"]
    out: dict[str, float | None] = {q.key: record[q.kind + "s"][q.index]["loss"] for q in qs}
    t = record["training_context"]
    out.update(final_val_loss=next((r["val_loss"] for r in reversed(evals) if r["step"] == run.spec.train.steps), None),
               max_vio_mean=t["max_vio"], max_vio_worst=t["max_vio_worst"], tokens_per_s=throughput(metrics),
               grape_m_drift=_drift(record.get("grape_m", [])))
    return out


def _drift(vectors: list[dict]) -> float | None:
    """Mean over pairs j (and vectors) of |ln theta_j - ln theta_j(init)|: how far training moved the spectrum."""
    diffs = [abs(a - b) for v in vectors for a, b in zip(v["ln_theta"], v["ln_theta_init"])]
    return statistics.fmean(diffs) if diffs else None


def _rows(record: dict, q: Quantity) -> list[float]:
    return [row[q.index] for row in record["per_row"][q.kind + "s"]]


def _env(folder: Path) -> dict:
    path = folder / "env.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _host(runs: Sequence[Run], evals: Mapping[str, dict], env: dict) -> dict:
    """The device, and whether other work shared the machine (1-minute load average vs the run's threads)."""
    loads = [evals[r.name].get("host", {}).get("load_1min") for r in runs]
    loads = [x for x in loads if x is not None]
    threads = env.get("cpu_threads")
    device = env.get("device") or "an unrecorded device"
    on_cpu = device == "cpu"
    # on a CPU the run's own threads make a load of about `threads`; more is other work. The load says nothing
    # about who else used a GPU, so there it stays unknown.
    shared = None if not loads or threads is None or not on_cpu else max(loads) > threads + 1
    return {"device": device, "on_cpu": on_cpu, "cpu_threads": threads, "load_1min": [min(loads), max(loads)]
            if loads else None, "shared": shared}


# ---------------------------------------------------------------------- formatting
def _num(x: float | None, digits: int) -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}".replace("-", "−")


def _signed(x: float, digits: int) -> str:
    return ("+" if x >= 0 else "") + _num(x, digits)


def _cell(s: Summary | None, digits: int) -> str:
    if s is None:
        return "—"
    if s.n == 1:
        return _num(s.mean, digits)
    return f"{_num(s.mean, digits)} [{_num(s.min, digits)} to {_num(s.max, digits)}]"


def _interval(i: Interval | None, digits: int) -> str:
    if i is None:
        return "—"
    return f"{_signed(i.mean, digits)} [{_signed(i.low, digits)}, {_signed(i.high, digits)}]"


def _verdict(p: Paired, b: str, a: str, digits: int, higher: str = "higher") -> str:
    if p.seeds is None:
        return f"not judged: {len(p.per_seed)} paired seed(s), a seed-level interval needs {MIN_SEEDS}"
    if not p.resolved:
        return "**not resolved**: the seed-level interval includes 0"
    side = higher if p.seeds.mean > 0 else {"higher": "lower", "faster": "slower"}[higher]
    return f"**resolved**: {b} is {side} than {a}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _value(x) -> str:
    return x if isinstance(x, str) else json.dumps(x)


# ---------------------------------------------------------------------- the report
def write_report(out: Path, matrix: Matrix, runs: Sequence[Run], diffs: Mapping[str, Sequence[Change]],
                 evals: Mapping[str, dict], command: Sequence[str]) -> list[Path]:
    """Write report.md, report.json and the figures into ``out``; ``evals`` maps run names to eval.json records."""
    _check_same_rows(runs, evals)
    variants = [v.name for v in matrix.variants]
    reference = variants[0]
    first = evals[runs[0].name]
    qs = quantities(first)
    metrics = {r.name: read_metrics(r.folder) for r in runs}
    per_run = {r.name: _run_values(r, evals[r.name], metrics[r.name], qs) for r in runs}
    keys = [q.key for q in qs] + ["final_val_loss", "max_vio_mean", "max_vio_worst", "tokens_per_s", "grape_m_drift"]
    summaries = {k: {v: Summary.of([per_run[r.name][k] for r in runs if r.variant == v
                                    and per_run[r.name][k] is not None]) for v in variants} for k in keys}
    by_seed = {v: {r.seed: r for r in runs if r.variant == v} for v in variants}
    pairs = {b: {q.key: paired({k: _rows(evals[r.name], q) for k, r in by_seed[reference].items()},
                               {k: _rows(evals[r.name], q) for k, r in by_seed[b].items()}) for q in qs}
             for b in variants[1:]}
    speed = {b: _speed(by_seed[reference], by_seed[b], per_run) for b in variants[1:]}
    env = _env(runs[0].folder)
    host = _host(runs, evals, env)

    figures = [plot_extrapolation(out / "loss_by_position.png", variants, runs, evals),
               plot_loss(out / "loss.png", variants, runs, metrics),
               plot_spectrum(out / "grape_m_spectrum.png", variants, runs, evals)]
    report = {
        "name": matrix.name, "matrix": matrix.file, "baseline": str(matrix.baseline), "command": list(command),
        "seeds": list(matrix.seeds), "variants": variants, "reference": reference,
        "train": {"steps": runs[0].spec.train.steps, "global_batch": runs[0].spec.train.global_batch,
                  "seq_len": first["settings"]["seq_len"]},
        "eval": first["settings"], "rows": {k: first["data"][k] for k in ("label", "rows_used", "rows_sha256")},
        "device": host, "torch": env.get("torch"), "git_commit": env.get("git_commit"),
        "definitions": _definitions(first, runs[0]),
        "quantities": [asdict(q) for q in qs],
        "results": {v: {"changes": [{"key": c.key, "baseline": c.baseline, "variant": c.variant} for c in diffs[v]],
                        "runs": {str(r.seed): {"folder": str(r.folder), **per_run[r.name]}
                                 for r in runs if r.variant == v},
                        "summary": {k: (asdict(s[v]) if s[v] else None) for k, s in summaries.items()}}
                    for v in variants},
        "paired": {b: {"minus": reference,
                       **{key: {"per_seed": {str(k): asdict(i) for k, i in p.per_seed.items()},
                                "seeds": asdict(p.seeds) if p.seeds else None, "resolved": p.resolved}
                          for key, p in pairs[b].items()},
                       "tokens_per_s": {"seeds": asdict(speed[b]) if speed[b] else None,
                                        "resolved": bool(speed[b] and speed[b].excludes_zero),
                                        "indicative": host["on_cpu"]}}
                   for b in variants[1:]},
        "files": [p.name for p in figures],
    }
    json_path = out / "report.json"
    write_json(json_path, report)
    md_path = out / "report.md"
    write_text(md_path, _markdown(matrix, runs, diffs, evals, qs, summaries, pairs, speed, per_run, env, host,
                                  shlex.join(command)))
    return [md_path, json_path, *figures]


def _speed(a: Mapping[int, Run], b: Mapping[int, Run], per_run: Mapping[str, dict]) -> Interval | None:
    """Seed-level t-interval of B's tokens/s minus A's, runs of equal seed paired."""
    d = [per_run[b[k].name]["tokens_per_s"] - per_run[a[k].name]["tokens_per_s"] for k in sorted(set(a) & set(b))
         if per_run[a[k].name]["tokens_per_s"] is not None and per_run[b[k].name]["tokens_per_s"] is not None]
    return t_interval(d)


def _definitions(record: dict, run: Run) -> dict[str, str]:
    s, d = record["settings"], record["data"]
    t = run.spec.train
    return {
        "rows": f"{d['rows_used']} rows of {s['length']} tokens ({max(s['contexts'])}× the training length T = "
                f"{s['seq_len']}) from {d['label']}, chosen by eval.seed {s['seed']}, never repeated; the same rows "
                f"for every run (sha256 of their tokens {d['rows_sha256'][:16]}…)",
        "band": "loss in band [a, b): mean cross-entropy (nats/token) over positions a ≤ p < b of those rows, where "
                "position p predicts token p + 1 from tokens 0..p",
        "context": "loss at c×: the same over positions p < c·T; by causality it equals the loss of the c·T-token "
                   "prefixes of the rows scored alone, so the contexts are points of one curve on one set of tokens",
        "final_val_loss": f"the trainer's last evaluation at step {t.steps}: train.eval_batches = {t.eval_batches} "
                          f"micro-batches of {t.micro_batch} rows of T tokens drawn by the run's own seed (other, "
                          "fewer rows for each seed), so it differs from the loss at 1× on the fixed rows",
        "max_vio": "validation MaxVio at the training length: (max_i c_i − mean c) / mean c per MoE layer, c = tokens "
                   "routed to each expert, summed over the T-token prefixes of the rows; mean over layers and the "
                   "worst layer",
        "tokens_per_s": "training tokens over training time of the logged windows after the first (warm-up and "
                        "compilation)",
        "paired": "B − A on identical rows: per seed, the mean over rows of the per-row difference with a 95% "
                  "row-bootstrap interval (2000 resamples; evaluation noise); over seeds, the mean of the per-seed "
                  f"differences with a 95% t-interval (training noise; needs ≥ {MIN_SEEDS} seeds); resolved only when "
                  "the seed-level interval excludes 0",
    }


def _summary_paragraph(matrix: Matrix, runs: Sequence[Run], qs: Sequence[Quantity], pairs, speed, host: dict,
                       record: dict) -> str:
    t, s = runs[0].spec.train, record["settings"]
    names = ", ".join(f"**{v.name}**" for v in matrix.variants)
    seeds = ", ".join(str(k) for k in matrix.seeds)
    head = (f"{_count(len(matrix.variants), 'variant')} ({names}) of `{matrix.baseline.name}`, "
            f"{_count(len(matrix.seeds), 'seed')} each (seeds {seeds}): {t.steps} optimizer steps of "
            f"{t.global_batch} × {s['seq_len']} tokens per run, on {host['device']}. Every run is scored at every "
            f"position of the same {record['data']['rows_used']} validation rows of {s['length']} tokens.")
    if len(matrix.variants) < 2:
        return head + " With one variant there is nothing to compare."
    reference = matrix.variants[0].name
    sentences = []
    bands = [q for q in qs if q.kind == "band"]
    for b in [v.name for v in matrix.variants[1:]]:
        for q in [bands[0]] + ([bands[-1]] if len(bands) > 1 else []):
            p = pairs[b][q.key]
            if p.seeds is None:
                means = ", ".join(_signed(i.mean, 3) for i in p.per_seed.values())
                sentences.append(f"On {q.name}, {b} − {reference} is {means} nats/token per seed; with "
                                 f"{len(p.per_seed)} seed(s) there is no seed-level interval (it needs {MIN_SEEDS}), "
                                 "so the difference is not judged.")
                continue
            i = p.seeds
            word = ("higher" if i.mean > 0 else "lower")
            verdict = (f"resolved: the 95% interval over seeds, {_signed(i.low, 3)} to {_signed(i.high, 3)}, excludes 0"
                       if p.resolved else f"not resolved: the 95% interval over seeds, {_signed(i.low, 3)} to "
                       f"{_signed(i.high, 3)}, includes 0, so these seeds do not tell the variants apart")
            sentences.append(f"On {q.name}, {b}'s loss is {word} than {reference}'s by {abs(i.mean):.3f} nats/token "
                             f"on average — {verdict}.")
        sp = speed[b]
        if sp is not None:
            where = ("indicative only: measured on a CPU" + (" shared with other work" if host["shared"] else "")
                     if host["on_cpu"] else f"on {host['device']}")
            if sp.excludes_zero:
                sentences.append(f"Training throughput ({where}): {b} is {'faster' if sp.mean > 0 else 'slower'} by "
                                 f"{abs(sp.mean):,.0f} tokens/s (interval over seeds excludes 0).")
            else:
                sentences.append(f"Training throughput ({where}): no difference resolved between {b} and "
                                 f"{reference}.")
    return " ".join([head] + sentences)


def _markdown(matrix, runs, diffs, evals, qs, summaries, pairs, speed, per_run, env, host, cmd) -> str:
    variants = [v.name for v in matrix.variants]
    reference = variants[0]
    record = evals[runs[0].name]
    defs = _definitions(record, runs[0])
    lines = [f"# Ablation `{matrix.name}`: {' vs '.join(variants)}", "",
             _summary_paragraph(matrix, runs, qs, pairs, speed, host, record), "",
             "Command (paths as given, relative to the folder it ran in):", "", f"    {cmd}", ""]

    bands = [q for q in qs if q.kind == "band"]
    contexts = [q for q in qs if q.kind == "context"]
    lines += ["## Loss by position", "", "![loss by position](loss_by_position.png)", "",
              f"`loss_by_position.png`: the loss in each position bucket of the evaluation rows, one line per "
              f"variant (mean over seeds), band = min–max over seeds; the dashed line is the training length "
              f"T = {record['settings']['seq_len']}. Rows: {defs['rows']}.", "",
              f"Each cell: mean [min to max] over seeds, nats/token. {defs['band'][0].upper()}{defs['band'][1:]}. "
              f"{defs['context'][0].upper()}{defs['context'][1:]}.", ""]
    header = ["variant", "seeds"] + [f"band {q.label}" for q in bands] + [f"positions {q.label}" for q in contexts]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        n = len([r for r in runs if r.variant == v])
        lines.append("| " + " | ".join([v, str(n)] + [_cell(summaries[q.key][v], 3) for q in bands + contexts]) + " |")

    for b in variants[1:]:
        seeds = sorted(next(iter(pairs[b].values())).per_seed)
        lines += ["", f"## Paired differences: {b} − {reference}", "",
                  f"Positive: {b}'s loss is higher (worse). {defs['paired'][0].upper()}{defs['paired'][1:]}.", "",
                  "| quantity | " + " | ".join(f"seed {k}: mean [95% rows]" for k in seeds)
                  + " | over seeds: mean [95% t] | verdict |", "|" + "---|" * (len(seeds) + 3)]
        for q in bands + contexts:
            p = pairs[b][q.key]
            lines.append(f"| {'band' if q.kind == 'band' else 'positions'} {q.label} | "
                         + " | ".join(_interval(p.per_seed.get(k), 4) for k in seeds)
                         + f" | {_interval(p.seeds, 4)} | {_verdict(p, b, reference, 4)} |")

    lines += ["", "## Other measurements", "",
              "| variant | final val loss (trainer) | val MaxVio mean @ T | val MaxVio worst @ T | train tokens/s |",
              "|---|---|---|---|---|"]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(_cell(summaries[k][v], d) for k, d in
                                               (("final_val_loss", 3), ("max_vio_mean", 3), ("max_vio_worst", 3),
                                                ("tokens_per_s", 0))) + " |")
    load = host["load_1min"]
    shared = ("not known (a load average does not show other users of a GPU)" if not host["on_cpu"] else
              "not recorded" if host["shared"] is None else
              f"{'yes' if host['shared'] else 'no'} (1-minute load average {load[0]:.1f}–{load[1]:.1f} at the end of "
              f"the runs' training, {_count(host['cpu_threads'], 'CPU thread')} per run)")
    lines += ["", f"- Final val loss: {defs['final_val_loss']}.", f"- MaxVio: {defs['max_vio']}.",
              f"- Throughput: {defs['tokens_per_s']}; device: {host['device']}; shared with other work: {shared}."]
    for b in variants[1:]:
        sp = speed[b]
        if host["on_cpu"]:
            what = "indicative only (a CPU, where other work changes the rate from run to run)"
        else:
            what = f"measured on {host['device']}"
        verdict = ("no seed-level interval (fewer than 3 paired seeds), so no verdict" if sp is None else
                   f"{b} − {reference} = {_interval(sp, 0)} tokens/s over seeds: "
                   + (f"{b} is {'faster' if sp.mean > 0 else 'slower'}" if sp.excludes_zero else "not resolved"))
        lines.append(f"- Throughput of {b} against {reference}, {what}: {verdict}.")

    lines += ["", "## What each variant changes", "",
              f"Against the baseline `{matrix.baseline}` (resolved specs compared key by key; `grapefx ablate` "
              "refuses to train when a variant differs anywhere its overlay does not declare; `(absent)`: the "
              "spec has no such key, e.g. an option of a position kind the other spec does not use):", ""]
    for v in matrix.variants:
        changes = diffs[v.name]
        if not changes:
            lines.append(f"- **{v.name}**: nothing (the baseline itself)")
            continue
        lines.append(f"- **{v.name}**" + (f" (`{v.file}`)" if v.file is not None else "") + ":")
        lines += [f"  - `{c.key}`: {_value(c.baseline)} → {_value(c.variant)}" for c in changes]

    drift = summaries["grape_m_drift"]
    drift_text = "; ".join(f"{v} {drift[v].mean:.3g} [{drift[v].min:.3g}–{drift[v].max:.3g}]"
                           for v in variants if drift[v] is not None)
    lines += ["", "## Training curves and the GRAPE-M spectrum", "",
              "![validation loss](loss.png)", "",
              "`loss.png`: the trainer's validation loss during training (the final val loss above), mean over "
              "seeds, band = min–max.", "",
              "![GRAPE-M spectrum](grape_m_spectrum.png)", "",
              "`grape_m_spectrum.png`: learned GRAPE-M frequencies θ_j = exp(p_j / c) of the final weights against "
              "their RoPE initialisation base^(−2j/D) (top, log scale) and ln(θ_j / θ_j,init) (bottom); geometric "
              "mean over seeds (and over layers with `share: layer`), band = min–max over seeds."
              + (f" Mean |ln(θ_j / θ_j,init)| over pairs j: {drift_text}." if drift_text else
                 " No variant has GRAPE-M frequencies."), ""]

    cols = bands + contexts
    lines += ["## Per run", "", "| run | " + " | ".join(f"{'band' if q.kind == 'band' else 'pos.'} {q.label}"
                                                         for q in cols)
              + " | final val loss | tokens/s |", "|" + "---|" * (len(cols) + 3)]
    order = {v: i for i, v in enumerate(variants)}
    for r in sorted(runs, key=lambda r: (order[r.variant], r.seed)):
        x = per_run[r.name]
        lines.append(f"| {r.name} | " + " | ".join(_num(x[q.key], 4) for q in cols)
                     + f" | {_num(x['final_val_loss'], 4)} | {_num(x['tokens_per_s'], 0)} |")

    s = record["settings"]
    lines += ["", "## How it was measured", "",
              "- Every run is a normal `grapefx train` run folder under `runs/<variant>-seed<k>/`; runs of one seed "
              "share data order and the initial values of shared parameters (per-name seeded initialisation), and "
              "the specs differ only as listed above.",
              f"- Evaluation: the final checkpoint in an eager, uncompiled model ({record['dtype']} on "
              f"{record['device']}), one forward pass per batch of {s['batch_size']} rows of {s['length']} tokens; "
              f"per-token cross-entropy in float32, summed in float64; {len(record['buckets'])} position buckets "
              f"({s['spacing']} spacing). Each run's `eval.json` holds the per-row values and the rows' offsets.",
              f"- torch {env.get('torch', '?')}, grapefx commit {env.get('git_commit') or 'unknown'}.", ""]
    return "\n".join(lines)
