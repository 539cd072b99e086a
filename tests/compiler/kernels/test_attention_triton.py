"""The Triton attention kernels (compiler/kernels) against a dense fp64 reference written here:
causal + sliding window (MATH.md §1), GRAPE-M rotation in-kernel (§2), ALiBi (§3), GQA; the
forward (out, lse) and every gradient (dq, dk, dv, dtheta, dslopes).

Runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set here before the kernels are
imported) when triton is installed, on the GPU when there is one; skipped where triton is missing
(CI). Small shapes: T = 37 and 70 (not multiples of any tile), D = 16 and 32, tiles of 16/32 rows
so every phase of the tile loops runs (window-edge tiles, fully visible tiles, diagonal tiles).
Tile configurations: "small" (16-row tiles, three-phase loops), "mixed" (q and k/v tiles of
different sizes), "atomic" (dq accumulated by atomics in the dkdv kernel), "one_loop" (one masked
loop per kernel), "default" (Hopper's defaults), "table" / "table_atomic" (cos and sin read from the
wrapper's per-call table). fp16 stands in for bf16: the interpreter's dot
mishandles bf16 operands.
"""

import pytest
import torch

from triton_interpreter import on_gpu_or_interpreter

ON_GPU = on_gpu_or_interpreter()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from compiler.kernels import _attention_triton as tk  # noqa: E402
from compiler.kernels.attention import AttnConfig, Tiles, attention_bwd, attention_fwd  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
F64 = torch.float64

CONFIGS = {
    "small": AttnConfig(fwd=Tiles(16, 16, 4, 1), dkdv=Tiles(16, 16, 4, 1), dq=Tiles(16, 16, 4, 1)),
    "one_loop": AttnConfig(fwd=Tiles(32, 16, 4, 1, True), dkdv=Tiles(16, 32, 4, 1, True), dq=Tiles(32, 16, 4, 1, True)),
    "mixed": AttnConfig(fwd=Tiles(32, 16, 4, 1), dkdv=Tiles(16, 32, 4, 1), dq=Tiles(32, 16, 4, 1)),
    "atomic": AttnConfig(fwd=Tiles(32, 16, 4, 1), dkdv=Tiles(16, 32, 4, 1), dq=Tiles(32, 16, 4, 1), atomic_dq=True),
    "default": None,
    # cos/sin read from the wrapper's table; the forward in one loop, dkdv and dq in three phases
    "table": AttnConfig(fwd=Tiles(32, 16, 4, 1, True, True), dkdv=Tiles(16, 32, 4, 1, False, True),
                        dq=Tiles(32, 16, 4, 1, False, True)),
    "table_atomic": AttnConfig(fwd=Tiles(16, 16, 4, 1, False, True), dkdv=Tiles(16, 32, 4, 1, True, True),
                               dq=Tiles(32, 16, 4, 1, False, True), atomic_dq=True),
}


def dense_reference(q, k, v, theta, slopes, window, scale):
    """(out, lse) of softmax(scale (R q)(R k)^T - m_h (i - j), masked) v in fp64, K/V repeated per
    query head. The angle has the value fl32(n * theta_j) (the contract: fp32 angles) and the
    derivative n, so autograd gives the exact dtheta of the function the kernels compute."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    if theta is not None:
        n = torch.arange(T, device=q.device)
        exact = n.double()[:, None] * theta.double()[None, :]                        # (T, D/2)
        fp32 = (n.float()[:, None] * theta.detach().float()[None, :]).double()
        angle = fp32 + (exact - exact.detach())
        cos, sin = angle.cos(), angle.sin()

        def rot(x):
            x1, x2 = x.chunk(2, -1)
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
        q, k = rot(q), rot(k)
    dist = (torch.arange(T, device=q.device)[:, None] - torch.arange(T, device=q.device)[None, :]).double()
    s = scale * q @ k.transpose(-1, -2)                                               # (B, Hq, T, T)
    if slopes is not None:
        s = s - slopes.double()[:, None, None] * dist
    visible = dist >= 0
    if window:
        visible &= dist <= window - 1
    s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def check(name, got, want, tol):
    """||got - want|| / ||want|| <= tol. An all-zero reference (W = 1: dq, dk, dtheta vanish) needs
    got ~ 0: dS = P (dP - delta) with P = 1 leaves only the rounding of two fp32 dot products."""
    assert got is not None and got.shape == want.shape, f"{name}: {None if got is None else got.shape}"
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    ref = want.norm().item()
    if ref == 0.0:
        assert got.abs().max().item() <= 1e-5, f"{name}: expected zeros, max |got| = {got.abs().max().item()}"
        return
    err = (got - want).norm().item() / ref
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


CASES = [
    # T, D, Hq, Hkv, window, rotate, alibi, dtype, config
    (37, 16, 4, 2, 8, True, True, torch.float32, "small"),
    (37, 16, 4, 2, 8, True, True, torch.float32, "atomic"),
    (70, 32, 4, 2, 8, True, False, torch.float32, "mixed"),
    (70, 32, 2, 1, 1, True, True, torch.float32, "small"),
    (70, 16, 2, 1, 40, True, False, torch.float32, "small"),       # fully visible tiles inside the window
    (70, 16, 4, 2, 20, True, True, torch.float32, "mixed"),
    (70, 16, 4, 2, 0, False, True, torch.float32, "small"),        # global: causal + ALiBi
    (70, 16, 4, 2, 100, False, True, torch.float32, "atomic"),     # W >= T is full causal
    (70, 16, 4, 2, 0, True, False, torch.float32, "mixed"),
    (70, 16, 2, 1, 0, False, False, torch.float32, "small"),
    (37, 32, 2, 1, 37, True, True, torch.float32, "default"),
    (70, 16, 4, 2, 20, True, True, torch.float32, "one_loop"),
    (70, 16, 4, 2, 0, False, True, torch.float32, "one_loop"),
    (37, 16, 2, 1, 1, True, True, torch.float32, "one_loop"),
    (70, 32, 4, 2, 8, True, True, torch.float16, "one_loop"),
    (70, 32, 4, 2, 0, False, True, torch.float16, "atomic"),
    (70, 16, 4, 2, 20, True, True, torch.float32, "table"),
    (37, 32, 2, 1, 8, True, False, torch.float32, "table_atomic"),
    (70, 32, 4, 2, 8, True, False, torch.float16, "table"),
]


@pytest.mark.parametrize("T, D, Hq, Hkv, window, rotate, alibi, dtype, config", CASES)
def test_forward_and_gradients_match_dense_reference(T, D, Hq, Hkv, window, rotate, alibi, dtype, config):
    g = torch.Generator().manual_seed(T * 1000 + D * 10 + window)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)
    B = 2
    q, k, v = rand(B, Hq, T, D), rand(B, Hkv, T, D), rand(B, Hkv, T, D)
    theta = (torch.rand(D // 2, generator=g) * 0.9 + 0.1).to(DEVICE) if rotate else None   # fp32
    slopes = (torch.rand(Hq, generator=g) * 0.5).to(DEVICE) if alibi else None             # fp32
    scale = D ** -0.5
    cfg = CONFIGS[config]

    out, lse = attention_fwd(q, k, v, theta, slopes, window, scale, cfg)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    theta_r = theta.clone().requires_grad_() if rotate else None
    slopes_r = slopes.double().requires_grad_() if alibi else None
    ref_out, ref_lse = dense_reference(*leaves, theta_r, slopes_r, window, scale)
    grad_out = rand(B, Hq, T, D)
    ref_out.backward(grad_out.double())
    dq, dk, dv, dtheta, dslopes = attention_bwd(grad_out, q, k, v, out, lse, theta, slopes, window, scale, cfg)

    tol = 2e-5 if dtype == torch.float32 else 5e-3
    assert out.dtype == dtype and lse.dtype == torch.float32
    check("out", out, ref_out, tol)
    check("lse", lse, ref_lse, 2e-6 if dtype == torch.float32 else 1e-3)
    for name, got, leaf in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves):
        assert got.dtype == dtype
        check(name, got, leaf.grad, tol)
    if rotate:
        check("dtheta", dtheta, theta_r.grad, 2 * tol if dtype == torch.float32 else 2e-2)
    else:
        assert dtheta is None
    if alibi:
        check("dslopes", dslopes, slopes_r.grad, tol)
    else:
        assert dslopes is None


@pytest.mark.parametrize("rotate, alibi, window", [(True, False, 8), (False, True, 0)])
def test_projection_layouts_are_read_in_place_and_kept(rotate, alibi, window):
    """q, k as (B, T, H, D) projections viewed as (B, H, T, D), v contiguous: the same numbers as with
    contiguous inputs, and out / dq in q's layout, dk / dv in k's (no copies on either side)."""
    g = torch.Generator().manual_seed(5)
    B, T, Hq, Hkv, D = 2, 37, 4, 2, 16
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)
    q, k = rand(B, T, Hq, D).transpose(1, 2), rand(B, T, Hkv, D).transpose(1, 2)
    v, go = rand(B, Hkv, T, D), rand(B, T, Hq, D).transpose(1, 2)
    theta = (torch.rand(D // 2, generator=g) + 0.1).to(DEVICE) if rotate else None
    slopes = (torch.rand(Hq, generator=g) * 0.5).to(DEVICE) if alibi else None
    cfg = CONFIGS["small"]
    out, lse = attention_fwd(q, k, v, theta, slopes, window, 0.25, cfg)
    grads = attention_bwd(go, q, k, v, out, lse, theta, slopes, window, 0.25, cfg)
    c = lambda x: x.contiguous()
    out_c, lse_c = attention_fwd(c(q), c(k), v, theta, slopes, window, 0.25, cfg)
    grads_c = attention_bwd(c(go), c(q), c(k), v, out_c, lse_c, theta, slopes, window, 0.25, cfg)
    assert out.stride() == q.stride() and grads[0].stride() == q.stride()
    assert grads[1].stride() == k.stride() and grads[2].stride() == k.stride()
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    for a, b in zip(grads, grads_c):
        assert (a is None and b is None) or torch.equal(a, b)


def test_gradients_not_asked_for_are_none():
    q = torch.randn(1, 2, 20, 16).to(DEVICE)
    k, v = torch.randn(1, 1, 20, 16).to(DEVICE), torch.randn(1, 1, 20, 16).to(DEVICE)
    theta, slopes = torch.rand(8).to(DEVICE), torch.rand(2).to(DEVICE)
    cfg = CONFIGS["small"]
    out, lse = attention_fwd(q, k, v, theta, slopes, 8, 0.25, cfg)
    full = attention_bwd(out, q, k, v, out, lse, theta, slopes, 8, 0.25, cfg)
    some = attention_bwd(out, q, k, v, out, lse, theta, slopes, 8, 0.25, cfg, need_dtheta=False, need_dslopes=False)
    assert some[3] is None and some[4] is None
    for a, b in zip(full[:3], some[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@triton.jit
def _sincos_kernel(X, C, S, N: tl.constexpr):
    offs = tl.arange(0, N)
    c, s = tk._sincos(tl.load(X + offs))
    tl.store(C + offs, c)
    tl.store(S + offs, s)


@pytest.mark.parametrize("limit, tol", [(10.0, 1.5e-7), (1.0e3, 1.5e-7), (1.3e4, 4e-7)])
def test_sincos_matches_fp64_on_fp32_angles(limit, tol):
    """The in-kernel cos/sin of an fp32 angle (range reduction + polynomials), |angle| <= limit."""
    g = torch.Generator().manual_seed(1)
    x = ((torch.rand(4096, generator=g, dtype=F64) * 2 - 1) * limit).float()
    x[:4] = torch.tensor([0.0, 1.5707963705062866, -3.141592653589793, limit])   # quadrant edges
    x = x.to(DEVICE)
    c, s = torch.empty_like(x), torch.empty_like(x)
    _sincos_kernel[(1,)](x, c, s, 4096)
    assert (c.double() - x.double().cos()).abs().max().item() <= tol
    assert (s.double() - x.double().sin()).abs().max().item() <= tol


def test_bad_tiles_are_refused():
    with pytest.raises(ValueError, match="block_m .* multiple of block_n"):
        AttnConfig(fwd=Tiles(16, 32, 4, 1), dkdv=Tiles(16, 16, 4, 1), dq=Tiles(16, 16, 4, 1)).check()
    with pytest.raises(ValueError, match="dkdv: block_n"):
        AttnConfig(fwd=Tiles(16, 16, 4, 1), dkdv=Tiles(32, 16, 4, 1), dq=Tiles(16, 16, 4, 1)).check()


@pytest.mark.parametrize("theta_grad, slopes_grad", [(True, False), (False, True)])
def test_traced_op_autograd_matches_reference(theta_grad, slopes_grad):
    """``grapefx::attention_triton_fwd`` (the triton_op torch.compile decomposes) with its autograd,
    theta or slopes frozen (the backward then skips that gradient): every gradient asked for
    against the dense reference."""
    from compiler.kernels.attention_ops import attention_triton_fwd

    g = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)
    q, k, v = (x.requires_grad_() for x in (rand(2, 4, 37, 16), rand(2, 2, 37, 16), rand(2, 2, 37, 16)))
    theta = (torch.rand(8, generator=g) * 0.9 + 0.1).to(DEVICE).requires_grad_(theta_grad)
    slopes = (torch.rand(4, generator=g) * 0.5).to(DEVICE).requires_grad_(slopes_grad)
    out, lse = attention_triton_fwd(q, k, v, theta, slopes, 8, 0.25)
    grad_out = rand(*out.shape)
    out.backward(grad_out)

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    theta_r, slopes_r = theta.detach().clone().requires_grad_(), slopes.detach().double().requires_grad_()
    ref_out, ref_lse = dense_reference(*leaves, theta_r, slopes_r, 8, 0.25)
    ref_out.backward(grad_out.double())
    check("out", out, ref_out, 2e-5)
    check("lse", lse, ref_lse, 2e-6)
    for name, x, leaf in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        check(name, x.grad, leaf.grad, 2e-5)
    assert (theta.grad is not None) == theta_grad and (slopes.grad is not None) == slopes_grad
    if theta_grad:
        check("dtheta", theta.grad, theta_r.grad, 4e-5)
    if slopes_grad:
        check("dslopes", slopes.grad, slopes_r.grad, 2e-5)
