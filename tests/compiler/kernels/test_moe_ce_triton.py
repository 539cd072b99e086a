"""The lean step's Triton kernels (compiler.kernels.moe, compiler.kernels.cross_entropy) against the torch
versions the ops fall back to (same math). CPU: Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported); skipped where triton is missing (CI). fp16 stands in for bf16 on the interpreter."""

import importlib

import pytest
import torch

from triton_interpreter import on_gpu_or_interpreter

ON_GPU = on_gpu_or_interpreter()

from compiler.kernels import cross_entropy, moe  # noqa: E402

experts = importlib.import_module("compiler.ops.experts")
lce = importlib.import_module("compiler.ops.linear_cross_entropy")
DEV = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16 if ON_GPU else torch.float16]


def close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item() < tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_and_gather_sum(dtype):
    g = torch.Generator().manual_seed(0)
    R, F_, K, C = 12, 40, 3, 24                                   # F and C no power of two
    gu = torch.randn(R, 2 * F_, generator=g).to(DEV, dtype)
    u, gate = torch.randn(R, F_, generator=g).to(DEV, dtype), torch.rand(R, generator=g).to(DEV)
    assert close(moe.swiglu_fwd(gu), experts._swiglu_fwd(gu.cpu()).to(DEV), dtype)
    for a, b in zip(moe.swiglu_bwd(gu, u, gate), experts._swiglu_bwd(gu.cpu(), u.cpu(), gate.cpu())):
        assert close(a, b.to(DEV), dtype)
    src, pos = torch.randn(R, C, generator=g).to(DEV, dtype), torch.randperm(R, generator=g).to(DEV)
    gates = torch.rand(R, generator=g).to(DEV, dtype)
    for w in (gates, None):
        want = experts._gather_sum(src.cpu(), pos.cpu(), None if w is None else w.cpu(), K)
        assert close(moe.gather_sum(src, pos, w, K), want.to(DEV), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [50, 4096, 5000])                  # one block, exact blocks, a partial block
def test_cross_entropy_rows(dtype, V):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(7, V, generator=g) * 3).to(DEV, dtype)
    t = torch.randint(0, V, (7,), generator=g).to(DEV)
    t[2] = -100
    scale = torch.tensor(1 / 6.0, device=DEV)
    want_loss, want_dz = lce._rows_torch(z.cpu(), t.cpu(), scale.cpu(), -100, True)
    dz = z.clone()
    assert close(cross_entropy.ce_rows(dz, t, scale, -100, True), want_loss.to(DEV), torch.float32)
    assert close(dz, want_dz.to(DEV), dtype) and dz[2].abs().max() == 0      # an ignored row: no gradient
    kept = z.clone()
    assert close(cross_entropy.ce_rows(kept, t, scale, -100, False), want_loss.to(DEV), torch.float32)
    assert torch.equal(kept, z)                                               # loss only: logits untouched


def test_traced_lean_op_autograd_matches_the_reference():
    """``grapefx::expert_ffn_lean_fwd`` (the triton_op torch.compile decomposes) and its autograd
    against the reference path's forward and gradients, fp32."""
    from compiler.kernels.moe_ops import expert_ffn_lean_fwd

    g = torch.Generator().manual_seed(3)
    N, C, F_, E, K = 12, 16, 8, 4, 2
    x = torch.randn(N, C, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    gates = torch.rand(N, K, generator=g)
    w = [torch.randn(E, C, F_, generator=g) * 0.3, torch.randn(E, C, F_, generator=g) * 0.3,
         torch.randn(E, F_, C, generator=g) * 0.3]
    grad_out = torch.randn(N, C, generator=g)
    leaves = [t.to(DEV, copy=True).requires_grad_() for t in (x, gates, *w)]
    out = expert_ffn_lean_fwd(leaves[0], idx.to(DEV), *leaves[1:])[0]
    out.backward(grad_out.to(DEV))
    ref_leaves = [t.clone().requires_grad_() for t in (x, gates, *w)]
    ref = experts._reference_forward(ref_leaves[0], idx, *ref_leaves[1:])
    ref.backward(grad_out)
    assert close(out.cpu(), ref, torch.float32)
    for a, b in zip(leaves, ref_leaves):
        assert close(a.grad.cpu(), b.grad, torch.float32)
