"""Seeding, and the process's random-number states as tensors (for checkpoints).

grapefx's own randomness is seeded where it is used (initialisation per parameter name, the data
order from ``train.seed``), so training does not draw from the global generators today. Their
states are still saved and restored, so anything that does (a user's op, a later dropout)
resumes exactly too. Python's and numpy's Mersenne-Twister keys are 32-bit words, stored as
int64 tensors; the few scalars beside them go to the checkpoint's JSON.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_all", "rng_state", "set_rng_state"]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, scalars) describing torch (CPU and ``device``), numpy and Python RNG states."""
    py_version, py_key, py_gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(),
               "python_key": torch.tensor(py_key, dtype=torch.int64),
               "numpy_key": torch.from_numpy(np_key.astype(np.int64))}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    scalars = {"python_version": py_version, "python_gauss": py_gauss, "numpy_name": np_name, "numpy_pos": int(np_pos),
               "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss)}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    random.setstate((scalars["python_version"], tuple(int(v) for v in tensors["python_key"].tolist()),
                     scalars["python_gauss"]))
    np.random.set_state((scalars["numpy_name"], tensors["numpy_key"].numpy().astype(np.uint32), scalars["numpy_pos"],
                         scalars["numpy_has_gauss"], scalars["numpy_gauss"]))
