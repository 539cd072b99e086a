"""The one place the trainer gets its model from.

Master weights are fp32; the compute dtype comes from the spec: ``precision.compute`` on CUDA,
``precision.cpu_compute`` on CPU (MATH.md §6).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import compiler
from compiler import BuildReport, ExpertGroup, GrapeModel, compute_dtype
from spec.schema import Spec

__all__ = ["compute_dtype", "build_model", "cuda_graphs"]


def build_model(spec: Spec, device: torch.device, *, compile: bool,
                shard: Callable[[GrapeModel], None] | None = None,
                experts: ExpertGroup | None = None, cast_once: bool = False) -> tuple[GrapeModel, BuildReport]:
    """The model of ``spec`` on ``device``: lowered, fused by ``compile.passes``, and its graphs compiled by
    the pipeline (``compiler.pipeline.build_model``), or run eagerly with ``compile=False``; and the
    pipeline's report (which passes matched where; the run folder keeps it as ``passes.json``).

    ``shard`` (FSDP2 per block, ``runtime.distributed``) is applied on ``device`` before compiling;
    ``experts``: this rank's expert group with ``parallel.expert`` > 1 (``runtime.distributed.Parallel``);
    ``cast_once``: weights cast to the compute dtype once per optimizer step (``compiler.compute_weights``).
    """
    return compiler.build_model(spec, device, compile=compile, shard=shard, experts=experts,   # passes: compile.passes
                                cast_once=cast_once)


CUDA_GRAPHS = "triton.cudagraphs"     # the Inductor option (compile.inductor_options) that turns them on


def cuda_graphs(spec: Spec, device: torch.device, world_size: int) -> tuple[Spec, bool, str | None]:
    """(the spec to build with, whether Inductor's CUDA graphs run, why they were turned off or None).

    They run where the spec asks for them (``compile.inductor_options: {triton.cudagraphs: true}``)
    and they were verified: a compiled model on CUDA in one process without activation
    checkpointing (bitwise the same losses, 1.15-1.17x tokens/s; bench/RESULTS.md). With several
    ranks or activation checkpointing they are dropped from the options for this run and the
    reason is returned for the log, so a spec written for one GPU trains unchanged on several.
    """
    c = spec.compile
    asked = bool(c.inductor_options.get(CUDA_GRAPHS))
    if not (asked and c.enabled and device.type == "cuda"):
        return spec, False, None
    unverified = [what for what, on in (("several ranks", world_size > 1),
                                        ("activation checkpointing", c.activation_checkpointing)) if on]
    if not unverified:
        return spec, True, None
    options = {k: v for k, v in c.inductor_options.items() if k != CUDA_GRAPHS}
    note = (f"CUDA graphs (compile.inductor_options {CUDA_GRAPHS}) are off for this run: they are verified "
            f"for one process without activation checkpointing, and this run has {' and '.join(unverified)}")
    return dataclasses.replace(spec, compile=dataclasses.replace(c, inductor_options=options)), False, note
