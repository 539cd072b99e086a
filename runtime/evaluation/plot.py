"""The loss-by-position figure: loss per position bucket against token position (log scale).

Each bucket [a, b) of positions is drawn at x = sqrt((a + 1) · b), the geometric middle of its
1-based positions a + 1 .. b (position 1 = the first predicted token, which has seen one token).
A vertical line marks the training length T; right of it the model sees more tokens than it was
trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["Curve", "bucket_x", "plot_loss_by_position"]


@dataclass(frozen=True)
class Curve:
    label: str
    x: list[float]
    y: list[float]
    low: list[float] | None = None       # band (e.g. the seed spread), drawn when given
    high: list[float] | None = None


def bucket_x(buckets: Sequence[dict]) -> list[float]:
    return [math.sqrt((b["positions"][0] + 1) * b["positions"][1]) for b in buckets]


def plot_loss_by_position(path: Path, curves: Sequence[Curve], seq_len: int, title: str) -> Path:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["tab10"]
    for i, c in enumerate(curves):
        ax.plot(c.x, c.y, color=cmap(i % 10), marker="o", markersize=2.5, linewidth=1.2, label=c.label)
        if c.low is not None and c.high is not None:
            ax.fill_between(c.x, c.low, c.high, color=cmap(i % 10), alpha=0.2, linewidth=0)
    ax.axvline(seq_len, color="black", linestyle="--", linewidth=1, label=f"training length T = {seq_len}")
    ax.set_xscale("log")
    ax.set_xlabel("token position (1 = the first predicted token; log scale)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path
