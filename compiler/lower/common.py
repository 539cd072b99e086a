"""Lowering helpers every sub-graph uses: fp32 master weights cast where used, RMSNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from compiler.lower.builder import GraphBuilder


def rmsnorm(b: GraphBuilder, name: str, x: fx.Node, weight: fx.Node, dim: int, eps: float,
            cd: torch.dtype) -> fx.Node:
    """y = x / sqrt(mean(x^2) + eps) * w, reduced in fp32 (MATH.md §6), returned in cd."""
    x32 = x if cd == torch.float32 else b.method(f"{name}_x32", "float", x)
    y = b(name, F.rms_norm, x32, (dim,), weight, eps)
    return y if cd == torch.float32 else b.method(f"{name}_out", "to", y, cd)


def weight(b: GraphBuilder, qualname: str, value: torch.Tensor, cd: torch.dtype) -> fx.Node:
    """A fp32 master parameter, cast to the compute dtype where it is used."""
    w = b.param(qualname, value)
    return w if cd == torch.float32 else b.method(qualname.replace(".", "_") + "_c", "to", w, cd)
