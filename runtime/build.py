"""The one place the trainer gets its model from.

Master weights are fp32; the compute dtype comes from the spec: ``precision.compute`` on CUDA,
``precision.cpu_compute`` on CPU (MATH.md §6).
"""

from __future__ import annotations

from typing import Callable

import torch

from compiler import pipeline
from compiler.lower import GrapeModel
from compiler.pipeline import BuildReport, compute_dtype
from spec.schema import Spec

__all__ = ["compute_dtype", "build_model"]


def build_model(spec: Spec, device: torch.device, *, compile: bool,
                shard: Callable[[GrapeModel], None] | None = None) -> tuple[GrapeModel, BuildReport]:
    """The model of ``spec`` on ``device``: lowered, fused by ``compile.passes``, and its graphs compiled by
    the pipeline (``compiler.pipeline.build_model``), or run eagerly with ``compile=False``; and the
    pipeline's report (which passes matched where; the run folder keeps it as ``passes.json``).

    ``shard`` (FSDP2 per block, ``runtime.distributed``) is applied on ``device`` before compiling.
    """
    return pipeline.build_model(spec, device, compile=compile, shard=shard)   # passes: compile.passes
