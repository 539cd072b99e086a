"""The MFU peak table, memory, the loss plot (the terminal lines: test_console.py)."""

import json
import sys

import pytest
import torch

from runtime import device as devmod
from runtime.device import device_peak, memory_gib
from runtime.metrics import plot_loss


@pytest.mark.parametrize("name, label, flops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12), ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H200", "H200", 989e12), ("NVIDIA A100-SXM4-80GB", "A100", 312e12)])
def test_peak_table_by_device_name(monkeypatch, name, label, flops):
    monkeypatch.setattr(devmod.torch.cuda, "get_device_name", lambda device=None: name)
    peak = device_peak(torch.device("cuda"))
    assert (peak.label, peak.flops) == (label, flops) and name in peak.note


def test_no_peak_on_cpu_or_unknown_gpus(monkeypatch):
    cpu = device_peak(torch.device("cpu"))
    assert cpu.flops is None and "CPU" in cpu.note
    monkeypatch.setattr(devmod.torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    other = device_peak(torch.device("cuda"))
    assert other.flops is None and "PEAK_BF16_DENSE" in other.note


def test_cpu_memory_is_the_process_peak_rss():
    assert 0.01 < memory_gib(torch.device("cpu")) < 1024


def test_loss_plot_from_metrics_file(tmp_path):
    lines = [{"kind": "train", "step": s, "loss": 3.0 / s, "ce_loss": 3.0 / s} for s in (1, 2, 3, 4)]
    lines.append({"kind": "eval", "step": 4, "val_loss": 0.9})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = plot_loss(tmp_path)
    assert out == tmp_path / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_are_written_or_their_absence_said_once(tmp_path, monkeypatch, capsys):
    from runtime.metrics import MetricsLogger

    (tmp_path / "a").mkdir()
    MetricsLogger(tmp_path / "a", 10, tty=False).close()
    assert list((tmp_path / "a" / "tb").iterdir())           # a base dependency: events by default
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if it could not be imported
    (tmp_path / "b").mkdir()
    MetricsLogger(tmp_path / "b", 10, tty=False).close()
    out = capsys.readouterr().out
    assert out.count("note: no TensorBoard events") == 1
    assert f"`pip install tensorboard` writes them to {tmp_path / 'b' / 'tb'} on the next run" in out
    assert not (tmp_path / "b" / "tb").exists()
