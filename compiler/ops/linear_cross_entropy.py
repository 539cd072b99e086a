"""LM head + cross-entropy in one op, without the (N, V) fp32 logits (MATH.md §6).

    loss = linear_cross_entropy(x (N, C), weight (V, C), targets (N,) int64, ignore_index=-100)
         = F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)

i.e. the mean over counted targets (targets != ignore_index) of ``lse(z_r) - z_r[t_r]`` with
``z = x W^T`` computed in x's dtype (bf16 on CUDA, as the lowered head's ``F.linear``) and the
logsumexp in fp32 (fp64 for fp64 inputs). No counted target gives NaN, as ``F.cross_entropy``.

Rows are processed in chunks of ``chunk_rows(N, V, itemsize)`` (at most ``CHUNK_BYTES`` of
logits each), so the memory beyond x and W is one chunk of logits in x's dtype, never (N, V) fp32.

Gradients are computed in the forward when they will be needed. The loss is a scalar, so
``dL/dx = g * dx`` and ``dL/dW = g * dW`` with g = the incoming gradient: the forward already has
each chunk's logits, so it turns them into ``dz = (softmax(z) - onehot) / n`` at once and runs
``dx[chunk] = dz W`` and ``dW += dz^T x[chunk]``; the backward only scales by g. Against
``logits -> loss`` under autograd this saves the recompute of the logits (one of the four
N x V x C matmuls) and the memory of the logits saved for backward. Structure (as
``grapefx::attention``): the public op ``grapefx::linear_cross_entropy`` is a
CompositeImplicitAutograd forwarder that calls

- ``grapefx::linear_cross_entropy_fwd_bwd`` -> (loss, dx, dweight) when grad mode is on and x
  or the weight requires grad (its autograd formula scales dx, dweight by the incoming gradient);
- ``grapefx::linear_cross_entropy_fwd`` -> loss otherwise (evaluation: no gradient work).

The decision is taken while tracing, so under torch.compile the training graph holds the first
and a ``no_grad`` graph the second (Dynamo guards on grad mode).

CUDA: the per-chunk logsumexp, target logit and dz are one Triton kernel over the chunk, in place
(``compiler.kernels.cross_entropy``, which registers it through ``register_cuda_impl``: this module
imports no kernels); elsewhere, and where nothing is registered, torch ops do the same math. dW is accumulated over chunks in W's dtype by ``addmm_`` (fp32 accumulation inside each
matmul, one rounding per chunk).
"""

from typing import Callable, Optional

import torch
from torch import Tensor

from compiler.ops._util import compute_dtype

__all__ = ["linear_cross_entropy", "chunk_rows", "CHUNK_BYTES"]

CHUNK_BYTES = 1 << 28        # logits bytes per chunk: 256 MiB (4096 rows of a 32k bf16 vocabulary)


def chunk_rows(N: int, V: int, itemsize: int) -> int:
    """Rows per chunk: as many as fit ``CHUNK_BYTES`` of logits (at least 1, at most N)."""
    return max(1, min(N, CHUNK_BYTES // max(1, V * itemsize)))


def _check(x: Tensor, weight: Tensor, targets: Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: need x (N, C) and weight (V, C); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if targets.shape != (x.shape[0],) or targets.dtype != torch.int64:
        raise ValueError(f"linear_cross_entropy: targets must be int64 (N,) = ({x.shape[0]},); got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    if x.dtype != weight.dtype or not x.is_floating_point():
        raise ValueError(f"linear_cross_entropy: x and weight must share a float dtype; got {x.dtype}, {weight.dtype}")


_cuda_rows: Optional[Callable] = None


def register_cuda_impl(rows: Optional[Callable]) -> None:
    """Route CUDA chunks to a row kernel; None unregisters. ``compiler.kernels`` calls this.

    ``rows(z, targets, scale, ignore_index, grad) -> loss (R,) fp32``: what ``_rows_torch`` computes,
    with dz (scale * (softmax - onehot), 0 on ignored rows) written into z in place when ``grad``
    (z untouched otherwise); ``scale`` is an fp32 () tensor.
    """
    global _cuda_rows
    _cuda_rows = rows


def _rows_torch(z: Tensor, targets: Tensor, scale: Tensor, ignore_index: int, grad: bool) -> tuple[Tensor, Tensor]:
    """Torch version of the row kernel: (loss (R,) in the stats dtype, dz (R, V) in z's dtype or z)."""
    V = z.shape[1]
    valid = targets != ignore_index
    if bool(((targets < 0) | (targets >= V))[valid].any()):
        raise ValueError(f"linear_cross_entropy: targets must lie in [0, {V}) or equal ignore_index ({ignore_index})")
    sd = scale.dtype
    zf = z.to(sd)
    lse = torch.logsumexp(zf, -1)                                                    # (R,)
    t = torch.where(valid, targets, 0)
    loss = torch.where(valid, lse - zf.gather(1, t[:, None])[:, 0], 0.0)
    if not grad:
        return loss, z
    p = torch.exp(zf - lse[:, None])                                                 # softmax, (R, V)
    p.scatter_add_(1, t[:, None], -valid.to(sd)[:, None])                            # - onehot (counted rows)
    return loss, (p * (scale * valid.to(sd))[:, None]).to(z.dtype)


def _run(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, grad: bool):
    """(loss, dx, dweight); dx, dweight are None without ``grad``."""
    N, _ = x.shape
    V = weight.shape[0]
    sd = compute_dtype(x.dtype, weight.dtype)                                        # statistics dtype
    count = (targets != ignore_index).sum()                                          # () int64, stays on device
    scale = 1.0 / count.clamp(min=1).to(sd)                                          # dz scale; 0 counted -> no grads
    rows_kernel = _cuda_rows if x.is_cuda else None
    rows = chunk_rows(N, V, x.element_size())
    buf = x.new_empty(min(rows, N), V) if N else None                               # one chunk of logits, reused
    loss_sum = torch.zeros((), dtype=sd, device=x.device)
    dx = torch.empty_like(x) if grad else None
    dw = None
    wt = weight.t()                                                                  # (C, V) view
    for s in range(0, N, rows):
        e = min(N, s + rows)
        xc, tc = x[s:e], targets[s:e]
        z = torch.mm(xc, wt, out=buf[:e - s])                                        # (r, V) logits in x's dtype
        if rows_kernel is not None:
            loss_rows = rows_kernel(z, tc, scale.float(), ignore_index, grad)        # dz written into z
            dz = z
        else:
            loss_rows, dz = _rows_torch(z, tc, scale, ignore_index, grad)
        loss_sum += loss_rows.sum().to(sd)
        if grad:
            torch.mm(dz, weight, out=dx[s:e])                                        # (r, C)
            if dw is None:
                dw = torch.mm(dz.t(), xc)                                            # (V, C)
            else:
                dw.addmm_(dz.t(), xc)
    if grad and dw is None:                                                          # N == 0
        dw = torch.zeros_like(weight)
    return loss_sum / count.to(sd), dx, dw


@torch.library.custom_op("grapefx::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """The mean cross-entropy of ``x W^T`` (no gradient work); fp32 (fp64 for fp64 inputs) scalar."""
    _check(x, weight, targets)
    return _run(x, weight, targets, ignore_index, grad=False)[0]


@linear_cross_entropy_fwd.register_fake
def _(x, weight, targets, ignore_index):
    _check(x, weight, targets)
    return x.new_empty((), dtype=compute_dtype(x.dtype, weight.dtype))


@torch.library.custom_op("grapefx::linear_cross_entropy_fwd_bwd", mutates_args=())
def linear_cross_entropy_fwd_bwd(x: Tensor, weight: Tensor, targets: Tensor,
                                 ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dloss/dx, dloss/dweight): the forward of the training path, gradients like their inputs."""
    _check(x, weight, targets)
    return _run(x, weight, targets, ignore_index, grad=True)


@linear_cross_entropy_fwd_bwd.register_fake
def _(x, weight, targets, ignore_index):
    _check(x, weight, targets)
    return (x.new_empty((), dtype=compute_dtype(x.dtype, weight.dtype)), torch.empty_like(x),
            torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    _, dx, dw = output
    ctx.save_for_backward(dx, dw)
    ctx.mark_non_differentiable(dx, dw)


def _backward(ctx, grad_loss, _grad_dx, _grad_dw):
    dx, dw = ctx.saved_tensors
    g = grad_loss.to(torch.promote_types(grad_loss.dtype, dx.dtype))
    return (dx * g).to(dx.dtype), (dw * g).to(dw.dtype), None, None


linear_cross_entropy_fwd_bwd.register_autograd(_backward, setup_context=_setup_context)

# The public op: what the head's fusion inserts.
_lib = torch.library.Library("grapefx", "FRAGMENT")
_lib.define("linear_cross_entropy(Tensor x, Tensor weight, Tensor targets, int ignore_index=-100) -> Tensor")


def _linear_cross_entropy_kernel(x, weight, targets, ignore_index=-100):
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return torch.ops.grapefx.linear_cross_entropy_fwd_bwd(x, weight, targets, ignore_index)[0]
    return torch.ops.grapefx.linear_cross_entropy_fwd(x, weight, targets, ignore_index)


_lib.impl("linear_cross_entropy", _linear_cross_entropy_kernel, "CompositeImplicitAutograd")


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """``torch.ops.grapefx.linear_cross_entropy``: mean cross-entropy of ``x W^T`` (module docstring)."""
    return torch.ops.grapefx.linear_cross_entropy(x, weight, targets, ignore_index)
