"""GRAPE-M: multiplicative position encoding by commuting 2-D rotations (MATH.md §2).

Position n turns plane j of a head vector by the angle ``n * theta_j``. The planes use the
half-split (NeoX) pairing: coordinate i pairs with i + D/2, so with x = [x1, x2] (each D/2 wide)

    out1 = x1 cos(n theta) - x2 sin(n theta)
    out2 = x1 sin(n theta) + x2 cos(n theta)

Frequencies are ``theta_j = exp(p_j / c)`` with c = ``log_freq_scale`` (16) and the learnable
``p_j`` initialised at ``c * ln(base^(-2j/D))``, so at init theta is exactly RoPE's spectrum.
p, theta, the angles, cos and sin are fp32; the rotated vector is cast back to x's dtype.
Values are never rotated. Shifting every position by a constant leaves q.k unchanged
(the relative law), because R(a)^T R(b) = R(b - a).
"""

import math

import torch
from torch import Tensor

from compiler.ops._util import compute_dtype


def grape_m_init_log_freq(head_dim: int, base: float, scale: float) -> Tensor:
    """Initial log-frequencies ``p_j = c * ln(base^(-2j/D))``, j = 0..D/2-1, fp32 (D/2,).

    ``scale`` is c (``log_freq_scale``). ``exp(p / c)`` then equals RoPE's ``base^(-2j/D)``.
    Computed in fp64 and rounded once to fp32.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"grape_m_init_log_freq: head_dim must be a positive even number, got {head_dim}")
    j = torch.arange(head_dim // 2, dtype=torch.float64)                   # (D/2,)
    return (scale * (-2.0 * j / head_dim) * math.log(base)).to(torch.float32)


def grape_m_theta(log_freq: Tensor, scale: float) -> Tensor:
    """Frequencies ``theta_j = exp(p_j / c)`` in fp32 (fp64 stays fp64); differentiable in p."""
    return torch.exp(log_freq.to(compute_dtype(log_freq.dtype)) / scale)


def _check(x: Tensor, theta: Tensor) -> None:
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"grape_m_rotate: x must be (..., T, D) with D even (half-split pairs), got shape {tuple(x.shape)}")
    if theta.dim() != 1 or theta.shape[0] * 2 != x.shape[-1]:
        raise ValueError(f"grape_m_rotate: theta must be (D/2,) = ({x.shape[-1] // 2},), got {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise ValueError(f"grape_m_rotate: theta must be floating point (fp32), got {theta.dtype}")


def cos_sin(theta: Tensor, T: int, pos_offset: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Positions n = pos_offset..pos_offset+T-1 (T,), and cos, sin of n * theta, each (T, D/2) in dtype."""
    n = torch.arange(pos_offset, pos_offset + T, device=theta.device, dtype=dtype)   # (T,)
    angle = n[:, None] * theta.to(dtype)[None, :]                                    # (T, D/2)
    return n, torch.cos(angle), torch.sin(angle)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """R(angle) x on the half-split pairs; x (..., T, D) and cos/sin (T, D/2) in one dtype."""
    x1, x2 = x.chunk(2, dim=-1)                                                      # (..., T, D/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def unrotate(g: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """R(angle)^T g = R(-angle) g: the gradient of ``rotate`` with respect to its input."""
    g1, g2 = g.chunk(2, dim=-1)
    return torch.cat([g1 * cos + g2 * sin, g2 * cos - g1 * sin], dim=-1)


def theta_grad(r: Tensor, g: Tensor, n: Tensor) -> Tensor:
    """dL/dtheta_j for r = R(n theta) x and g = dL/dr: sum over all but the last dim of
    ``n * (g2 * r1 - g1 * r2)`` (d r1/d theta = -n r2, d r2/d theta = n r1). Returns (D/2,)."""
    r1, r2 = r.chunk(2, dim=-1)                                                      # (..., T, D/2)
    g1, g2 = g.chunk(2, dim=-1)
    per_pos = (g2 * r1 - g1 * r2).reshape(-1, *r1.shape[-2:]).sum(0)                 # (T, D/2)
    return (n[:, None] * per_pos).sum(0)                                             # (D/2,)


@torch.library.custom_op("grapefx::grape_m_rotate", mutates_args=())
def grape_m_rotate(x: Tensor, theta: Tensor, pos_offset: int = 0) -> Tensor:
    """Rotate x (B, H, T, D) by GRAPE-M at positions pos_offset + n (MATH.md §2).

    theta (D/2,) fp32. Angles, cos, sin and the rotation are computed in fp32 (fp64 for fp64
    inputs); the result has x's shape and dtype. Gradients flow to x and theta.
    """
    _check(x, theta)
    cd = compute_dtype(x.dtype, theta.dtype)
    _, cos, sin = cos_sin(theta, x.shape[-2], pos_offset, cd)                        # (T, D/2)
    return rotate(x.to(cd), cos, sin).to(x.dtype)


@grape_m_rotate.register_fake
def _(x, theta, pos_offset=0):
    _check(x, theta)
    return x.new_empty(x.shape)          # contiguous, like the real kernel's output (not x's strides)


def _setup_context(ctx, inputs, output):
    x, theta, pos_offset = inputs
    ctx.save_for_backward(x, theta)
    ctx.pos_offset = pos_offset


def _backward(ctx, grad):
    # plain aten math, so Inductor can fuse it with its neighbours
    x, theta = ctx.saved_tensors
    cd = compute_dtype(x.dtype, theta.dtype)
    n, cos, sin = cos_sin(theta, x.shape[-2], ctx.pos_offset, cd)                   # (T,), (T, D/2)
    g = grad.to(cd)
    dx = unrotate(g, cos, sin).to(x.dtype) if ctx.needs_input_grad[0] else None
    dtheta = None
    if ctx.needs_input_grad[1]:
        r = rotate(x.to(cd), cos, sin)                                               # fp32 rotation, not the cast output
        dtheta = theta_grad(r, g, n).to(theta.dtype)                                 # (D/2,)
    return dx, dtheta, None


grape_m_rotate.register_autograd(_backward, setup_context=_setup_context)
