"""Where training metrics go: ``RUN/metrics.jsonl``, TensorBoard, the terminal, ``RUN/loss.png``.

One JSON object per line in ``metrics.jsonl``, ``kind`` first:

    {"kind": "train", "step", "loss", "ce_loss", "aux_loss", "lr", "grad_norm", "tokens",
     "tokens_per_s", "mfu", "max_vio", "max_vio_worst", "max_vio_worst_layer", "expert_bias",
     "zero_token_experts", "memory_gib", "elapsed_s"}
    {"kind": "eval", "step", "val_loss", "max_vio", "max_vio_worst", "max_vio_worst_layer", "tokens"}

``mfu`` is null where there is no datasheet peak (CPU; ``env.json`` says why); the MaxVio,
``expert_bias`` and ``zero_token_experts`` keys are null for dense models. Layers are counted from
1: ``expert_bias`` maps a layer to the min/max/mean/std of its bias, ``zero_token_experts`` a layer
to the experts that got no token since the previous line (layers where all got some are left out);
MaxVio is of this step's global batch, ``max_vio`` the mean over MoE layers; ``memory_gib`` is
CUDA's max allocated, or the process's peak resident set on CPU; ``tokens`` counts all ranks.

The terminal (``runtime.console``) gets a start summary, one line per logged step and per
evaluation, and on a terminal a ``rich`` progress bar. TensorBoard event files go to ``RUN/tb/``
(tensorboard is a dependency: 20 MB of wheels next to torch's 200; if it cannot be imported the
run says once where the events would go and how to get them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.console import Console

__all__ = ["MetricsLogger", "read_metrics", "plot_loss"]

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(run_dir: str | Path) -> Path:
    """``RUN/loss.png``: training cross-entropy per logged step and validation loss per evaluation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(run_dir)
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # both curves are cross-entropy: the training objective adds the router's aux terms, evaluation does not
    for kind, key, label in (("train", "ce_loss", "train loss"), ("eval", "val_loss", "validation loss")):
        pts = [(r["step"], r[key]) for r in records if r.get("kind") == kind]
        if pts:
            ax.plot(*zip(*pts), marker="o" if kind == "eval" else None, markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)" if records else "")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out)
    return out


class MetricsLogger:
    """Writes metrics of one run (rank 0 only: other ranks pass ``enabled=False``); ``console`` shows them."""

    def __init__(self, run_dir: str | Path, total_steps: int, *, start_step: int = 0, enabled: bool = True,
                 tty: bool | None = None, peak_label: str = "cpu"):
        self.run_dir, self.total, self.enabled = Path(run_dir), total_steps, enabled
        self.console = Console(total_steps, start_step=start_step, enabled=enabled, tty=tty, peak_label=peak_label)
        self._tb = None
        if not enabled:
            return
        self._keep_until(start_step)
        self._file = open(self.run_dir / METRICS_FILE, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            self.say(f"note: no TensorBoard events ({e}); `pip install tensorboard` writes them to "
                     f"{self.run_dir / 'tb'} on the next run")
        else:
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def _keep_until(self, step: int) -> None:
        """A fresh run starts an empty file; a resumed one drops lines past the checkpoint (they are re-run)."""
        path = self.run_dir / METRICS_FILE
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step] if step else []
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def say(self, message: str) -> None:
        self.console.say(message)

    def advance(self, step: int) -> None:
        self.console.advance(step)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def train(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "train", **record})
        self.console.train(record)
        if self._tb is not None:
            step = record["step"]
            for key in ("loss", "ce_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "max_vio", "memory_gib"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"train/{key}", record[key], step)
            for layer, stats in (record.get("expert_bias") or {}).items():
                for k, v in stats.items():
                    self._tb.add_scalar(f"expert_bias/layer{layer}/{k}", v, step)

    def eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", **record})
        self.console.eval(record)
        if self._tb is not None:
            for key in ("val_loss", "max_vio"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"eval/{key}", record[key], record["step"])

    def close(self) -> None:
        self.console.close()
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._file.close()
