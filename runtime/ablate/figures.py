"""The ablation report's figures, drawn from the run folders' records (no training code).

    loss_by_position.png   loss per position bucket of the evaluation rows, one line per variant (mean over
                           seeds), band = min–max over seeds, dashed line at the training length
    loss.png               the trainer's validation loss during training, mean over seeds, band = min–max
    grape_m_spectrum.png   learned GRAPE-M frequencies against their RoPE initialisation
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from runtime.ablate.matrix import Run
from runtime.evaluation.plot import Curve, bucket_x, plot_loss_by_position

__all__ = ["plot_extrapolation", "plot_loss", "plot_spectrum"]


def plot_extrapolation(path: Path, variants: Sequence[str], runs: Sequence[Run], evals: Mapping[str, dict]) -> Path:
    """loss_by_position.png for all variants (see the module docstring)."""
    first = evals[runs[0].name]
    s, buckets = first["settings"], first["buckets"]
    curves = []
    for v in variants:
        per_seed = [[b["loss"] for b in evals[r.name]["buckets"]] for r in runs if r.variant == v]
        if not per_seed:
            continue
        cols = list(zip(*per_seed))
        n = len(per_seed)
        curves.append(Curve(f"{v} (mean of {n} seed{'s' if n > 1 else ''})", bucket_x(buckets),
                            [statistics.fmean(c) for c in cols],
                            [min(c) for c in cols] if n > 1 else None, [max(c) for c in cols] if n > 1 else None))
    return plot_loss_by_position(path, curves, s["seq_len"],
                                 f"loss by position on the same {first['data']['rows_used']} rows of {s['length']} "
                                 "tokens: mean over seeds, band = min–max")


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


def plot_loss(path: Path, variants: Sequence[str], runs: Sequence[Run], records: Mapping[str, list[dict]]) -> Path:
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


def plot_spectrum(path: Path, variants: Sequence[str], runs: Sequence[Run], evals: Mapping[str, dict]) -> Path:
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
