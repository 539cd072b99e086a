"""The one place the trainer gets its model from.

Master weights are fp32; the compute dtype comes from the spec: ``precision.compute`` on CUDA,
``precision.cpu_compute`` on CPU (MATH.md §6).
"""

from __future__ import annotations

import torch

from compiler.lower import GrapeModel, lower
from spec.errors import GrapefxError
from spec.schema import Spec

__all__ = ["compute_dtype", "build_model"]


def compute_dtype(spec: Spec, device: torch.device) -> str:
    return spec.precision.compute if device.type == "cuda" else spec.precision.cpu_compute


def build_model(spec: Spec, device: torch.device, *, compile: bool) -> GrapeModel:
    """The model of ``spec`` on ``device``: its graphs compiled by the pipeline, or eager with ``compile=False``."""
    if compile:  # TODO(issue 4): compiler.pipeline.build_model(spec, device, compile=True, passes=...) replaces this
        raise GrapefxError("compile.enabled: compiling needs compiler.pipeline, which this version does not have yet; "
                           "run the graphs eagerly with --no-compile (or --set compile.enabled=false)")
    return lower(spec, dtype=compute_dtype(spec, device)).to(device)
