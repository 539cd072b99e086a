"""The training device: which one, its datasheet peak for MFU, and memory in use.

MFU (MATH.md §6) = FLOPs/token x tokens/s / peak, with the peak from the device's datasheet
(dense bf16, no sparsity), the torchtitan convention. The table is keyed by a substring of
``torch.cuda.get_device_name()``; the first match wins, so the specific variants come first.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

__all__ = ["PEAK_BF16_DENSE", "Peak", "pick_device", "device_peak", "cpu_matmul_flops", "memory_gib"]

# (name substring, label, dense bf16 FLOP/s from the datasheet)
PEAK_BF16_DENSE: tuple[tuple[str, str, float], ...] = (
    ("H200", "H200", 989e12),
    ("H100 PCIe", "H100 PCIe", 756e12),
    ("H100 NVL", "H100 NVL", 835e12),
    ("H100", "H100 SXM", 989e12),
    ("A100", "A100", 312e12),
)


@dataclass(frozen=True)
class Peak:
    """The peak used for MFU: ``flops`` is None when there is none, and ``note`` says why."""
    flops: float | None
    label: str
    note: str

    def as_dict(self) -> dict:
        return {"peak_flops": self.flops, "peak_label": self.label, "note": self.note}


def pick_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_peak(device: torch.device) -> Peak:
    if device.type != "cuda":
        return Peak(None, "cpu", "no MFU on CPU: there is no datasheet bf16 tensor peak to compare with")
    name = torch.cuda.get_device_name(device)
    for key, label, flops in PEAK_BF16_DENSE:
        if key in name:
            return Peak(flops, label, f"{name}: datasheet dense bf16 peak of the {label}, {flops / 1e12:.0f} TFLOP/s")
    return Peak(None, name, f"{name} is not in runtime.device.PEAK_BF16_DENSE; add its dense bf16 peak to get MFU")


def cpu_matmul_flops(n: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of the best of ``repeats`` fp32 (n, n) x (n, n) matmuls on this CPU (2 n^3 FLOPs each): an upper
    bound on what a training step reaches here, for a lower bound on its time (about 0.1 s to measure)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)                                                   # first call: allocation and dispatch
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def memory_gib(device: torch.device) -> float | None:
    """CUDA: the most memory tensors have held (max allocated). CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss               # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
