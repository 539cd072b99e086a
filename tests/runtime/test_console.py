"""The training console: start summary, per-step and eval lines, MFU without a peak, ETA, the rich bar."""

import io

import pytest
import torch

from runtime.console import Console, clock, format_eval_line, format_train_line, start_summary
from runtime.data import prepare
from runtime.device import device_peak
from spec import spec_from_dict


def _record(**changes):
    r = dict(step=120, loss=2.3141, lr=2.9e-4, grad_norm=0.8213, tokens_per_s=12345.0, mfu=None, max_vio=0.114,
             memory_gib=1.23)
    r.update(changes)
    return r


def test_train_line_reads_like_torchtitan_and_says_why_mfu_is_unknown():
    assert format_train_line(_record(), 300) == \
        "step 120/300  loss 2.314  lr 2.9e-4  grad 0.82  tok/s 12.3k  mfu unknown (cpu)  maxvio 0.11  mem 1.2GiB"
    assert "mfu unknown (no peak)" in format_train_line(_record(), 300, peak_label="NVIDIA GeForce RTX 3090")
    line = format_train_line(_record(mfu=0.382, max_vio=None, tokens_per_s=2.5e6), 300)
    assert "tok/s 2.5M  mfu 38.2%  maxvio —" in line
    assert "mfu 0.0032%" in format_train_line(_record(mfu=3.2e-5), 300)   # a tiny model still shows a number
    # elapsed 21 s after 120 of 300 steps (from step 0): 21 * 180 / 120 = 31.5 s left
    assert format_train_line(_record(elapsed_s=21.0), 300, eta_s=31.5).endswith("mem 1.2GiB  elapsed 0:21  eta 0:32")
    assert format_eval_line({"step": 100, "val_loss": 2.4104, "max_vio": 0.08, "tokens": 732}, 300) == \
        "eval 100/300  val_loss 2.410  maxvio 0.08  on 732 tokens"


def test_clock_and_eta():
    assert (clock(7), clock(754), clock(3723)) == ("0:07", "12:34", "1:02:03")
    console = Console(300, start_step=100, enabled=False)
    assert console.eta(150, 10.0) == pytest.approx(30.0)     # 50 steps in 10 s: 0.2 s each, 150 left
    assert console.eta(100, 0.0) is None


def test_plain_lines_off_a_terminal(capsys):
    console = Console(10, tty=False)
    console.train(_record(step=5, tokens_per_s=900.0, elapsed_s=5.0))
    console.eval({"step": 5, "val_loss": 2.0, "max_vio": None, "tokens": 64})
    console.close()
    out = capsys.readouterr().out.splitlines()
    assert out == ["step 5/10  loss 2.314  lr 2.9e-4  grad 0.82  tok/s 900  mfu unknown (cpu)  maxvio 0.11  "
                   "mem 1.2GiB  elapsed 0:05  eta 0:05",
                   "eval 5/10  val_loss 2.000  maxvio —  on 64 tokens"]


def test_on_a_terminal_a_rich_bar_carries_loss_speed_and_the_last_eval():
    console = Console(10, tty=True)
    buffer = io.StringIO()
    console._progress.console.file = buffer
    console.train(_record(step=5, tokens_per_s=900.0, elapsed_s=5.0))
    console.eval({"step": 5, "val_loss": 2.0, "max_vio": None, "tokens": 64})
    task = console._progress.tasks[0]
    assert task.fields["now"] == "loss 2.314  900 tok/s  mfu unknown (cpu)"
    assert task.fields["last_eval"] == "val_loss 2.000 @ 5"
    console.close()


def test_start_summary_names_model_data_and_run(tiny_dict, tmp_path):
    spec = spec_from_dict(tiny_dict())
    data = prepare(spec, progress=False)
    lines = start_summary(spec, data, device="cpu (2 threads)", peak=device_peak(torch.device("cpu")), ranks=1,
                          run_dir=tmp_path / "run", compiled=False, start_step=0, eval_tokens=64)
    text = "\n".join(lines)
    assert lines[0] == "model  tiny: 2 layers (1 local W=4 grape-m, 1 global grape-a), MoE 4 experts top-2 + 1 shared"
    assert "training FLOPs/token at T=16" in lines[1] and "params " in lines[1]
    assert "validation = 6 of 60 documents, held out whole (split: documents)" in text   # round(0.1 * 60)
    assert "tokenizer byte (257 ids)" in text
    # 4 sequences x 16 tokens; micro-batch 2 -> 2 accumulated
    assert "run    steps 1..6, batch 4 x 16 = 64 tokens/step (micro-batch 2 x 2 accumulated x 1 process)" in text
    assert ("device cpu (2 threads), compile off, MFU unknown: no MFU on CPU: there is no datasheet bf16 tensor "
            "peak to compare with") in text
    assert f"eval every 3 steps on 64 tokens; checkpoints every 100; run folder {tmp_path / 'run'}" in text
