"""The attention kernels as traceable ops: what ``grapefx::attention`` runs on CUDA by default.

    out = traced_attention(q, k, v, theta, slopes, window, scale)    # None where the kernels decline

``grapefx::attention_triton_fwd`` -> (out, lse) is a ``torch.library.triton_op`` whose autograd
calls ``grapefx::attention_triton_bwd`` -> (dq, dk, dv, dtheta, dslopes). Under torch.compile
AOTAutograd decomposes both into their bodies (``compiler.kernels.attention``'s launch wrappers),
so Inductor sees the Triton launches (``wrap_triton``) and the small torch ops around them (the
allocations, the dtheta / dslopes reductions) and issues them all from its generated code: no
Python op body runs per call, which is what the opaque custom ops cost (0.56 ms of host time per
forward + backward at B 8, T 4096, bench/RESULTS.md). Eagerly they run as ordinary custom ops.
The backward computes dtheta / dslopes only when autograd asks for them (fixed frequencies or
slopes skip that work).

Imported only where triton is installed (defining a ``triton_op`` inspects triton).
"""

from typing import Optional

import torch
from torch import Tensor

from compiler.kernels import traceable_launches
from compiler.kernels.attention import attention_bwd, attention_fwd, supports

__all__ = ["attention_triton_fwd", "attention_triton_bwd", "traced_attention"]


@torch.library.triton_op("grapefx::attention_triton_fwd", mutates_args=())
def attention_triton_fwd(q: Tensor, k: Tensor, v: Tensor, theta: Optional[Tensor], slopes: Optional[Tensor],
                         window: int, scale: float) -> tuple[Tensor, Tensor]:
    """Traced-path forward: (out, lse) of ``attention_fwd``. Only called where ``supports``."""
    with traceable_launches():
        return attention_fwd(q, k, v, theta, slopes, window, scale)


@torch.library.triton_op("grapefx::attention_triton_bwd", mutates_args=())
def attention_triton_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         theta: Optional[Tensor], slopes: Optional[Tensor], window: int, scale: float,
                         need_dtheta: bool, need_dslopes: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Traced-path backward: (dq, dk, dv, dtheta, dslopes); an empty (0,) tensor stands for a gradient
    not computed (no theta / slopes, or not needed: custom ops cannot return None)."""
    with traceable_launches():
        dq, dk, dv, dtheta, dslopes = attention_bwd(grad_out, q, k, v, out, lse, theta, slopes, window, scale,
                                                    need_dtheta=need_dtheta, need_dslopes=need_dslopes)
    empty = lambda: q.new_empty(0, dtype=torch.float32)     # one each: outputs may not alias
    return dq, dk, dv, empty() if dtheta is None else dtheta, empty() if dslopes is None else dslopes


def _setup_context(ctx, inputs, output):
    q, k, v, theta, slopes, window, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, theta, slopes, out, lse)
    ctx.window, ctx.scale = window, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, theta, slopes, out, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dq, dk, dv, dtheta, dslopes = attention_triton_bwd(                # grad_out in out's layout: no copy
        grad_out, q, k, v, out, lse, theta, slopes, ctx.window, ctx.scale,
        theta is not None and needs[3], slopes is not None and needs[4])
    return (dq, dk, dv, dtheta if theta is not None and needs[3] else None,
            dslopes if slopes is not None and needs[4] else None, None, None)


attention_triton_fwd.register_autograd(_backward, setup_context=_setup_context)


def traced_attention(q, k, v, theta, slopes, window, scale) -> Optional[Tensor]:
    """``grapefx::attention`` through the traced kernels, or None where ``supports`` declines."""
    if not supports(q, k, v, theta, slopes):
        return None
    return attention_triton_fwd(q, k, v, theta, slopes, window, scale)[0]
