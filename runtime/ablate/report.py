"""The ablation report: ``report.md``, ``report.json``, ``loss.png``, ``grape_m_spectrum.png``.

Everything is read back from the run folders (``metrics.jsonl``, ``eval.json``, ``env.json``), so
the report can be rewritten from finished runs at any time.

Metrics per run (units in the table headers):
- final validation loss: the trainer's evaluation at the last step (``train.eval_batches``
  micro-batches of a validation sampler seeded with the run's seed: the same rows for every
  variant of one seed, other rows for another seed), nats/token;
- validation loss at each evaluation context (``eval.json``: the same rows for every run), nats/token;
- validation MaxVio at the training context (the smallest evaluation context): counts summed
  over the evaluation batches, ``(max c - mean c) / mean c`` per MoE layer (MATH.md §5), the mean
  over layers and the worst layer;
- training throughput: tokens / seconds over the logged windows after the first (the first holds
  warm-up and compilation), tokens/s.

Per variant each metric is summarised over seeds as mean, min and max (and the population std in
``report.json``). With a handful of seeds a standard deviation says little, so the report shows
the min-max range and judges differences with it.

Spread rule (``beyond_spread``): the better variant (better mean) wins by more than the seed
spread when its min-max range and the runner-up's do not overlap, i.e. its worst seed beats the
runner-up's best seed. With one seed there is no spread, and no verdict. The report also counts
paired wins: runs of equal seed share data order and initialisation, so "better on 3/3 seeds"
compares like with like.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from runtime.metrics import read_metrics

if TYPE_CHECKING:
    from runtime.ablate.matrix import Change, Matrix, Run

__all__ = ["Metric", "Summary", "Verdict", "beyond_spread", "compare", "throughput", "write_report", "metrics_for"]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str               # table header, with its unit
    name: str                # in sentences
    unit: str
    lower_is_better: bool
    digits: int


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float               # population std over seeds (report.json only)
    min: float
    max: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> "Summary | None":
        if not values:
            return None
        return Summary(statistics.fmean(values), statistics.pstdev(values), min(values), max(values), len(values))


@dataclass(frozen=True)
class Verdict:
    metric: str
    winner: str
    runner_up: str
    winner_mean: float
    runner_up_mean: float
    beyond_spread: bool | None   # None: fewer than two seeds on a side
    paired_wins: int             # seeds where the winner's run beats the runner-up's run of that seed
    paired: int                  # seeds both variants have
    paired_gain: Summary | None  # per seed, how much better the winner's run is (> 0: better), over seeds
    tie: bool


def beyond_spread(best: Summary, other: Summary, lower_is_better: bool) -> bool | None:
    """True when ``best``'s min-max range and ``other``'s do not overlap (``best`` on the better side)."""
    if best.n < 2 or other.n < 2:
        return None
    return best.max < other.min if lower_is_better else best.min > other.max


def compare(metric: Metric, values: Mapping[str, Mapping[int, float | None]]) -> Verdict | None:
    """The best variant by mean and how it compares with the runner-up; None with fewer than two variants."""
    summaries = {v: Summary.of([x for x in per_seed.values() if x is not None]) for v, per_seed in values.items()}
    ranked = sorted((s.mean if metric.lower_is_better else -s.mean, v) for v, s in summaries.items() if s is not None)
    if len(ranked) < 2:
        return None
    (_, w), (_, r) = ranked[0], ranked[1]
    sw, sr = summaries[w], summaries[r]
    seeds = [k for k in values[w] if values[w][k] is not None and values[r].get(k) is not None]
    sign = -1.0 if metric.lower_is_better else 1.0
    gains = [sign * (values[w][k] - values[r][k]) for k in seeds]
    tie = math.isclose(sw.mean, sr.mean, rel_tol=1e-12, abs_tol=1e-12)
    return Verdict(metric.key, w, r, sw.mean, sr.mean, None if tie else beyond_spread(sw, sr, metric.lower_is_better),
                   sum(g > 0 for g in gains), len(seeds), Summary.of(gains), tie)


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


def metrics_for(contexts: Sequence[int], seq_len: int) -> list[Metric]:
    first = contexts[0] * seq_len
    ms = [Metric("final_val_loss", "final val loss", "final validation loss", "nats/token", True, 3)]
    ms += [Metric(f"val_loss_{c}x", f"val loss @ {c * seq_len} tok ({c}×)",
                  f"validation loss at {c}× the training context ({c * seq_len} tokens)", "nats/token", True, 3)
           for c in contexts]
    ms += [Metric("max_vio_mean", f"val MaxVio mean @ {first} tok", "validation MaxVio (mean over MoE layers)", "",
                  True, 3),
           Metric("max_vio_worst", f"val MaxVio worst layer @ {first} tok", "validation MaxVio (worst layer)", "",
                  True, 3),
           Metric("tokens_per_s", "train tokens/s", "training throughput", "tokens/s", False, 0)]
    return ms


def _run_values(run: "Run", eval_record: dict, records: list[dict]) -> dict[str, float | None]:
    evals = [r for r in records if r.get("kind") == "eval"]
    final = next((r["val_loss"] for r in reversed(evals) if r["step"] == run.spec.train.steps), None)
    out: dict[str, float | None] = {"final_val_loss": final}
    for c in eval_record["contexts"]:
        out[f"val_loss_{c['context']}x"] = c["loss"]
    first = eval_record["training_context"]
    out.update(max_vio_mean=first["max_vio"], max_vio_worst=first["max_vio_worst"], tokens_per_s=throughput(records))
    out["grape_m_drift"] = _drift(eval_record["grape_m"])
    return out


def _drift(vectors: list[dict]) -> float | None:
    """Mean over pairs j (and vectors) of |ln theta_j - ln theta_j(init)|: how far training moved the spectrum."""
    diffs = [abs(a - b) for v in vectors for a, b in zip(v["ln_theta"], v["ln_theta_init"])]
    return statistics.fmean(diffs) if diffs else None


# ---------------------------------------------------------------------- formatting
def _num(x: float | None, digits: int) -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def _cell(s: Summary | None, digits: int) -> str:
    if s is None:
        return "—"
    if s.n == 1:
        return _num(s.mean, digits)
    return f"{_num(s.mean, digits)} [{_range(s.min, s.max, digits)}]"


def _range(low: float, high: float, digits: int) -> str:
    """``0.007–0.023``; ``−0.007 to 0.014`` when a bound is negative (a dash would read as a minus sign)."""
    a, b = _num(low, digits), _num(high, digits)
    return f"{a}–{b}" if low >= 0 and high >= 0 else f"{a} to {b}".replace("-", "−")


def _phrase(v: Verdict, digits: int) -> str:
    if v.tie:
        return "a tie"
    if v.beyond_spread is None:
        return "one seed only, so there is no seed spread to judge it against"
    g = v.paired_gain
    paired = f"better on {v.paired_wins} of {v.paired} seeds"
    if g is not None and v.paired_wins == v.paired:
        low, high = _num(g.min, digits), _num(g.max, digits)
        paired += f", by {low}" if low == high else f", by {_range(g.min, g.max, digits)}"
    if v.beyond_spread:
        return f"larger than the seed spread (the min–max ranges do not overlap); paired by seed it is {paired}"
    return f"within the seed spread (the min–max ranges overlap); paired by seed it is {paired}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _value(x: Any) -> str:
    return x if isinstance(x, str) else json.dumps(x)


# ---------------------------------------------------------------------- the report
def write_report(out: Path, matrix: "Matrix", runs: Sequence["Run"], diffs: Mapping[str, Sequence["Change"]],
                 evals: Mapping[str, dict], command: Sequence[str]) -> list[Path]:
    """Write the four report files into ``out``; ``evals`` maps run names to their ``eval.json``; returns the paths."""
    first = runs[0].spec
    seq_len = first.data.seq_len
    metrics = metrics_for(matrix.eval.contexts, seq_len)
    variants = [v.name for v in matrix.variants]
    records = {r.name: read_metrics(r.folder) for r in runs}
    per_run = {r.name: _run_values(r, evals[r.name], records[r.name]) for r in runs}
    values = {key: {v: {r.seed: per_run[r.name][key] for r in runs if r.variant == v} for v in variants}
              for key in [m.key for m in metrics] + ["grape_m_drift"]}
    summaries = {key: {v: Summary.of([x for x in per_seed.values() if x is not None]) for v, per_seed in vs.items()}
                 for key, vs in values.items()}
    verdicts = {m.key: compare(m, values[m.key]) for m in metrics}
    env = _env(runs[0].folder)
    cmd = shlex.join(command)

    loss_png = _plot_loss(out / "loss.png", variants, runs, records)
    spectrum_png = _plot_spectrum(out / "grape_m_spectrum.png", variants, runs, evals)
    report = {
        "name": matrix.name, "matrix": matrix.file, "baseline": str(matrix.baseline), "command": list(command),
        "seeds": list(matrix.seeds), "variants": variants,
        "train": {"steps": first.train.steps, "global_batch": first.train.global_batch, "seq_len": seq_len},
        "eval": evals[runs[0].name]["settings"], "device": env.get("device"), "torch": env.get("torch"),
        "git_commit": env.get("git_commit"),
        "spread": {"shown": "min-max over seeds", "rule": "a difference is larger than the seed spread when the "
                   "min-max ranges over seeds of the better variant and the runner-up do not overlap"},
        "metrics": [asdict(m) for m in metrics],
        "results": {v: {"changes": [{"key": c.key, "baseline": c.baseline, "variant": c.variant} for c in diffs[v]],
                        "runs": {str(r.seed): {"folder": str(r.folder), **per_run[r.name]}
                                 for r in runs if r.variant == v},
                        "summary": {k: (asdict(s[v]) if s[v] else None) for k, s in summaries.items()}}
                    for v in variants},
        "verdicts": {k: (asdict(v) if v else None) for k, v in verdicts.items()},
        "files": {"loss": loss_png.name, "grape_m_spectrum": spectrum_png.name},
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path = out / "report.md"
    md_path.write_text(_markdown(matrix, runs, diffs, metrics, summaries, verdicts, per_run, env, cmd))
    return [md_path, json_path, loss_png, spectrum_png]


def _env(folder: Path) -> dict:
    path = folder / "env.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _summary_paragraph(matrix: "Matrix", runs: Sequence["Run"], metrics: list[Metric],
                       verdicts: Mapping[str, Verdict | None], env: dict) -> str:
    t, seq_len = runs[0].spec.train, runs[0].spec.data.seq_len
    names = ", ".join(f"**{v.name}**" for v in matrix.variants)
    seeds = ", ".join(str(s) for s in matrix.seeds)
    head = (f"{_count(len(matrix.variants), 'variant')} ({names}) of `{matrix.baseline.name}`, "
            f"{_count(len(matrix.seeds), 'seed')} each (seeds {seeds}): {t.steps} optimizer steps of "
            f"{t.global_batch} × {seq_len} tokens per run, on {env.get('device', 'an unrecorded device')}.")
    if len(matrix.variants) < 2:
        return head + " With one variant there is nothing to compare; the table lists its numbers."
    by_key = {m.key: m for m in metrics}
    ctx = matrix.eval.contexts
    longest = [f"val_loss_{ctx[-1]}x"] if len(ctx) > 1 else []
    headline = [f"val_loss_{ctx[0]}x"] + longest + ["max_vio_mean", "tokens_per_s"]
    sentences = []
    for key in headline:
        v, m = verdicts.get(key), by_key[key]
        if v is None:
            continue
        unit = f" {m.unit}" if m.unit else ""
        better = "lower" if m.lower_is_better else "higher"
        if v.tie:
            sentences.append(f"On {m.name}, {v.winner} and {v.runner_up} tie at {_num(v.winner_mean, m.digits)}{unit}.")
            continue
        sentences.append(f"On {m.name}, **{v.winner}** is {better}: {_num(v.winner_mean, m.digits)} vs "
                         f"{_num(v.runner_up_mean, m.digits)}{unit} for {v.runner_up} — {_phrase(v, m.digits)}.")
    judged = [(m, verdicts[m.key]) for m in metrics
              if verdicts.get(m.key) is not None and verdicts[m.key].beyond_spread is not None]
    clear = [f"{m.name} (**{v.winner}**)" for m, v in judged if v.beyond_spread]
    if judged:
        sentences.append(f"Larger than the seed spread: {', '.join(clear)}; every other difference is within it."
                         if clear else "None of the differences is larger than the seed spread.")
    return " ".join([head] + sentences)


def _markdown(matrix, runs, diffs, metrics, summaries, verdicts, per_run, env, cmd) -> str:
    variants = [v.name for v in matrix.variants]
    seeds = ", ".join(str(s) for s in matrix.seeds)
    lines = [f"# Ablation `{matrix.name}`: {' vs '.join(variants)}", "",
             _summary_paragraph(matrix, runs, metrics, verdicts, env), "",
             "Command (paths as given, relative to the folder it ran in):", "", f"    {cmd}", ""]

    lines += ["## Results", "",
              f"Each cell: mean [min–max] over seeds {seeds}; the spread shown is the min–max range across seeds "
              "(with so few seeds a standard deviation would mean little; `report.json` has it too). Losses are "
              "mean cross-entropy in nats/token, MaxVio is a ratio (0 = perfectly balanced experts), throughput is "
              "in training tokens/s. Lower is better, except tokens/s.", ""]
    header = ["variant", "seeds"] + [m.label for m in metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        n = len([r for r in runs if r.variant == v])
        lines.append("| " + " | ".join([v, str(n)] + [_cell(summaries[m.key][v], m.digits) for m in metrics]) + " |")

    lines += ["", "## Which variant wins", "",
              "| metric | better | runner-up | difference of means | larger than the seed spread? | better on seeds | "
              "paired gain per seed |",
              "|---|---|---|---|---|---|---|"]
    for m in metrics:
        v = verdicts[m.key]
        if v is None:
            lines.append(f"| {m.name} | — | — | — | — | — | — |")
            continue
        beyond = ("tie" if v.tie else "n/a (one seed)" if v.beyond_spread is None
                  else "**yes** (ranges do not overlap)" if v.beyond_spread else "no (ranges overlap)")
        unit = f" {m.unit}" if m.unit else ""
        better = f"tie: {v.winner}" if v.tie else f"**{v.winner}**"
        lines.append(f"| {m.name} | {better} | {v.runner_up} | "
                     f"{_num(abs(v.winner_mean - v.runner_up_mean), m.digits)}{unit} | {beyond} | "
                     f"{v.paired_wins}/{v.paired} | {_cell(v.paired_gain, m.digits)} |")
    lines += ["", "A difference counts as larger than the seed spread when the min–max ranges over seeds of the "
              "better variant and the runner-up do not overlap: the better variant's worst seed still beats the "
              "runner-up's best seed. *Better on seeds* compares the two variants' runs of equal seed (same data "
              "order, same initial values of shared parameters), one pair per seed; the *paired gain* is how much "
              "better the winner's run is than the runner-up's run of the same seed, mean [min–max] over seeds "
              "(positive: better). Pairing removes the seed-to-seed variation the ranges include, so a gain that is "
              "positive on every seed while the ranges overlap is a consistent but small effect.", ""]

    lines += ["## What each variant changes", "",
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
    lines += ["", "## Plots", "",
              "![validation loss](loss.png)", "",
              "`loss.png`: the trainer's validation loss during training, one colour per variant: the line is the "
              "mean over seeds, the band the min–max range.", "",
              "![GRAPE-M spectrum](grape_m_spectrum.png)", "",
              "`grape_m_spectrum.png`: learned GRAPE-M frequencies θ_j = exp(p_j / c) of the final weights against "
              "their RoPE initialisation base^(−2j/D) (top, log scale) and ln(θ_j / θ_j,init) (bottom); geometric "
              "mean over seeds (and over layers with `share: layer`), band = min–max over seeds."
              + (f" Mean |ln(θ_j / θ_j,init)| over pairs j: {drift_text}." if drift_text else
                 " No variant has GRAPE-M frequencies."), ""]

    lines += ["## Per run", "", "| run | " + " | ".join(m.label for m in metrics) + " |",
              "|" + "---|" * (len(metrics) + 1)]
    order = {v: i for i, v in enumerate(variants)}
    for r in sorted(runs, key=lambda r: (order[r.variant], r.seed)):
        lines.append(f"| {r.name} | " + " | ".join(_num(per_run[r.name][m.key], m.digits) for m in metrics) + " |")

    e, seq_len = matrix.eval, runs[0].spec.data.seq_len
    bs = e.batch_size or runs[0].spec.train.micro_batch
    lines += ["", "## How it was measured", "",
              "- Every run is a normal `grapefx train` run folder under `runs/<variant>-seed<k>/`; runs of one seed "
              "share data order and the initial values of shared parameters (per-name seeded initialisation), and "
              "the specs differ only as listed above.",
              f"- Final validation loss: the trainer's last evaluation (`train.eval_batches` = "
              f"{runs[0].spec.train.eval_batches} micro-batches; its validation rows depend on the run's seed).",
              f"- Validation loss at each context: the final checkpoint in an eager, uncompiled model, on the first "
              f"{e.batches} batches of {bs} rows of the validation split at each length "
              f"({', '.join(str(c * seq_len) for c in e.contexts)} tokens), sampler seed {e.seed}: the same rows "
              "for every run. Token-weighted mean cross-entropy.",
              f"- MaxVio: (max_i c_i − mean c) / mean c per MoE layer, c = tokens routed to each expert summed over "
              f"those batches at {e.contexts[0] * seq_len} tokens; mean over layers and the worst layer.",
              "- Throughput: training tokens over training time of the logged windows after the first (warm-up"
              f"{' and compilation' if runs[0].spec.compile.enabled else ''}), on {env.get('device', '?')} "
              f"({env.get('cpu_threads', '?')} CPU threads, torch {env.get('torch', '?')}); it depends on what else "
              "ran on the machine.",
              f"- grapefx commit: {env.get('git_commit') or 'unknown'}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def _figure(size: tuple[float, float], rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return fig, axes


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _plot_loss(path: Path, variants: list[str], runs: Sequence["Run"], records: Mapping[str, list[dict]]) -> Path:
    fig, (ax,) = _figure((7.5, 4.2))
    for v, colour in zip(variants, _colours(len(variants))):
        curves = [{r["step"]: r["val_loss"] for r in records[run.name] if r.get("kind") == "eval"}
                  for run in runs if run.variant == v]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        ys = [[c[s] for c in curves] for s in steps]
        ax.plot(steps, [statistics.fmean(y) for y in ys], color=colour, marker="o", markersize=3,
                label=f"{v} (mean of {len(curves)} seed{'s' if len(curves) > 1 else ''})")
        if len(curves) > 1:
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss: mean over seeds, band = min–max", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plot_spectrum(path: Path, variants: list[str], runs: Sequence["Run"], evals: Mapping[str, dict]) -> Path:
    fig, (top, bottom) = _figure((7.5, 6.5), rows=2)
    init_drawn = False
    for v, colour in zip(variants, _colours(len(variants))):
        per_seed, init = [], None
        for run in runs:
            vectors = evals[run.name]["grape_m"] if run.variant == v else []
            same = [x for x in vectors if x["ln_theta_init"] == vectors[0]["ln_theta_init"]]
            if same:
                init = same[0]["ln_theta_init"]
                per_seed.append([statistics.fmean(col) for col in zip(*(x["ln_theta"] for x in same))])
        if not per_seed:
            continue
        j = list(range(len(init)))
        if not init_drawn:
            top.plot(j, [math.exp(x) for x in init], color="black", linestyle="--", label="RoPE init base^(−2j/D)")
            bottom.axhline(0.0, color="black", linestyle="--", linewidth=1)
            init_drawn = True
        mean = [statistics.fmean(col) for col in zip(*per_seed)]                 # ln of the geometric mean over seeds
        ratio = [[a - b for a, b in zip(s, init)] for s in per_seed]             # per seed, ln(theta / theta_init)
        top.plot(j, [math.exp(x) for x in mean], color=colour, marker="o", markersize=3, label=v)
        bottom.plot(j, [a - b for a, b in zip(mean, init)], color=colour, marker="o", markersize=3, label=v)
        if len(per_seed) > 1:
            bottom.fill_between(j, [min(col) for col in zip(*ratio)], [max(col) for col in zip(*ratio)],
                                color=colour, alpha=0.2, linewidth=0)
    if init_drawn:
        top.set_yscale("log")
        top.set_ylabel("θ_j (radians / position)")
        top.set_title("learned GRAPE-M frequencies vs RoPE initialisation (geometric mean over seeds)", fontsize=10)
        top.legend(fontsize=8)
        bottom.set_ylabel("ln(θ_j / θ_j at init)")
        bottom.set_xlabel("frequency pair j")
        bottom.legend(fontsize=8)
        for ax in (top, bottom):
            ax.grid(alpha=0.3, which="both")
    else:
        for ax in (top, bottom):
            ax.set_axis_off()
        top.text(0.5, 0.5, "no variant has GRAPE-M frequencies", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path)
    return path
