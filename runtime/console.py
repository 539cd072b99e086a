"""What a training run shows on the terminal: a start summary, then progress.

Start summary (``start_summary``), three groups of lines:

    model  tiny: 4 layers (3 local W=32 grape-m, 1 global grape-a), MoE 8 experts top-2 + 1 shared
           params 1.27M total, 0.93M active; 5.94M training FLOPs/token at T=128
    data   builtin:shakespeare (builtin): 42 documents, validation = 1 of 42 documents, held out whole ...
           tokens 4.95M train, 0.11M valid; tokenizer byte (257 ids)
    run    steps 1..300, batch 8 x 128 = 1,024 tokens/step (micro-batch 8 x 1 accumulated x 1 process)
           device cpu (2 threads), compile off, MFU unknown: no MFU on CPU: ...
           eval every 50 steps on 2,048 tokens; checkpoints every 100; run folder runs/tiny

Progress, one line per logged step (``format_train_line``) and per evaluation
(``format_eval_line``):

    step 120/300  loss 2.314  lr 2.9e-4  grad 0.82  tok/s 12.3k  mfu 38.2%  maxvio 0.11  mem 1.2GiB  elapsed 0:21  eta 0:32
    eval 100/300  val_loss 2.412  maxvio 0.09  on 2,048 tokens

MFU without a peak reads ``mfu unknown (cpu)`` (or ``(no peak)`` for a GPU missing from
``runtime.device.PEAK_BF16_DENSE``); the summary gives the full reason once. ETA = elapsed x
steps left / steps done in this session (so it includes evaluations and the first step's compile).
On a terminal a ``rich`` bar stays under the lines: step/total, loss, tokens/s, MFU, elapsed, ETA
and the last validation loss; elsewhere (CI, a log file) only the plain lines are written. Nothing
here reads a device tensor: values come from the lines the trainer already logs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["Console", "start_summary", "device_text", "format_train_line", "format_eval_line", "mfu_text", "clock"]


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


def _lr(x: float) -> str:
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def _percent(x: float) -> str:
    """38.2%, or two significant digits below 1% (a tiny model's 0.0032%)."""
    return f"{100 * x:.1f}%" if x >= 0.01 else f"{100 * x:.2g}%"


def _opt(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def clock(seconds: float) -> str:
    """0:07, 12:34, 1:02:03."""
    s = round(seconds)
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rough_duration(seconds: float) -> str:
    """12 min, 3.4 h, 2.1 days: an estimate's size, where ``clock`` gives a measured time to the second."""
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def mfu_text(mfu: float | None, peak_label: str = "cpu") -> str:
    """``38.2%``, or ``unknown (cpu)`` / ``unknown (no peak)`` when there is no peak to divide by."""
    if mfu is not None:
        return _percent(mfu)
    return "unknown (cpu)" if peak_label == "cpu" else "unknown (no peak)"


def format_train_line(r: dict, total: int, *, peak_label: str = "cpu", eta_s: float | None = None) -> str:
    mem = "—" if r.get("memory_gib") is None else f"{r['memory_gib']:.1f}GiB"
    line = (f"step {r['step']}/{total}  loss {r['loss']:.3f}  lr {_lr(r['lr'])}  grad {r['grad_norm']:.2f}  "
            f"tok/s {_si(r['tokens_per_s'])}  mfu {mfu_text(r.get('mfu'), peak_label)}  "
            f"maxvio {_opt(r.get('max_vio'), '.2f')}  mem {mem}")
    if r.get("elapsed_s") is not None:
        line += f"  elapsed {clock(r['elapsed_s'])}"
    if eta_s is not None:
        line += f"  eta {clock(eta_s)}"
    return line


def format_eval_line(r: dict, total: int) -> str:
    tokens = f"  on {r['tokens']:,} tokens" if r.get("tokens") is not None else ""
    return f"eval {r['step']}/{total}  val_loss {r['val_loss']:.3f}  maxvio {_opt(r.get('max_vio'), '.2f')}{tokens}"


def _n(x: float) -> str:
    from spec.report import human
    return human(x)


def device_text(device) -> str:
    """``NVIDIA H100 80GB HBM3 x 8`` style names: the GPU's name, or ``cpu (N threads)``."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def start_summary(spec, data, *, device: str, peak, ranks: int, run_dir, compiled: bool, start_step: int,
                  eval_tokens: int) -> list[str]:
    """The lines printed before the first step (module docstring); ``data`` is ``runtime.data.prepare``'s result."""
    from spec.derive import flops_per_token, param_counts

    kinds = spec.layer_kinds()
    att, t = spec.attention, spec.train
    groups = []
    for kind in ("local", "global"):
        n = kinds.count(kind)
        if n:
            a = att.of(kind)
            window = f" W={a.window}" if kind == "local" and a.window else ""
            mech = " tpa" if a.mechanism == "tpa" else ""
            groups.append(f"{n} {kind}{window}{mech} {a.position.kind}")
    ffn = "dense FFN"
    if spec.moe is not None:
        m = spec.moe
        ffn = f"MoE {m.experts} experts top-{m.top_k}" + (f" + {m.shared_experts} shared" if m.shared_experts else "")
        dense = sum(spec.ffn_kind(i) == "dense" for i in range(len(kinds)))
        ffn += f" ({dense} dense FFN layers)" if dense else ""
    pc, fl = param_counts(spec), flops_per_token(spec)
    lines = [f"model  {spec.name}: {len(kinds)} layers ({', '.join(groups)}), {ffn}",
             f"       params {_n(pc.total)} total, {_n(pc.active)} active; {_n(fl.per_token)} training FLOPs/token "
             f"at T={spec.data.seq_len}"]
    for i, s in enumerate(data.manifest["sources"]):
        weight = f", weight {data.train.weights[i]:.2g}" if len(data.manifest["sources"]) > 1 else ""
        valid = s.get("valid", f"validation = {s['docs']['valid']} of {s['docs']['train'] + s['docs']['valid']} "
                                "documents")
        lines.append(f"{'data' if i == 0 else '    '}   {s['path']} ({s['kind']}{weight}): {valid}")
    tok = data.tokenizer
    lines.append(f"       tokens {_n(data.train.num_tokens)} train, {_n(data.valid.num_tokens)} valid; tokenizer "
                 f"{tok.kind} ({tok.vocab_size:,} ids)")
    T = spec.data.seq_len
    accum = t.global_batch // (t.micro_batch * ranks)
    mfu = "MFU against " + peak.label if peak.flops else f"MFU unknown: {peak.note}"
    lines += [f"run    steps {start_step + 1}..{t.steps}, batch {t.global_batch} x {T} = {t.global_batch * T:,} "
              f"tokens/step (micro-batch {t.micro_batch} x {accum} accumulated x {ranks} "
              f"process{'es' if ranks > 1 else ''})",
              f"       device {device}, compile {'on' if compiled else 'off'}, {mfu}",
              f"       eval every {t.eval_every} steps on {eval_tokens:,} tokens; checkpoints every "
              f"{t.checkpoint_every}; run folder {run_dir}"]
    return lines


class Console:
    """Terminal output of one run: lines, and on a terminal a ``rich`` progress bar under them."""

    def __init__(self, total_steps: int, *, start_step: int = 0, enabled: bool = True, tty: bool | None = None,
                 peak_label: str = "cpu"):
        self.total, self.enabled, self.peak_label, self.start_step = total_steps, enabled, peak_label, start_step
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._progress = self._task = None
        if enabled and self.tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self._progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                      TextColumn("{task.fields[now]}"), TimeElapsedColumn(), TextColumn("eta"),
                                      TimeRemainingColumn(), TextColumn("{task.fields[last_eval]}"))
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, now="",
                                                 last_eval="")
            self._progress.start()

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(message, flush=True)

    def lines(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.say(line)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def eta(self, step: int, elapsed_s: float) -> float | None:
        done = step - self.start_step
        return elapsed_s * (self.total - step) / done if done > 0 and elapsed_s > 0 else None

    def train(self, record: dict) -> None:
        if not self.enabled:
            return
        eta = self.eta(record["step"], record.get("elapsed_s") or 0.0)
        self.say(format_train_line(record, self.total, peak_label=self.peak_label, eta_s=eta))
        if self._progress is not None:
            now = (f"loss {record['loss']:.3f}  {_si(record['tokens_per_s'])} tok/s  "
                   f"mfu {mfu_text(record.get('mfu'), self.peak_label)}")
            self._progress.update(self._task, now=now)

    def eval(self, record: dict) -> None:
        if not self.enabled:
            return
        self.say(format_eval_line(record, self.total))
        if self._progress is not None:
            self._progress.update(self._task, last_eval=f"val_loss {record['val_loss']:.3f} @ {record['step']}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
