"""The lean expert path (sort once, grouped GEMMs on [W_gate | W_up], fused SwiGLU, gather-sum with the
gates) run on CPU (``LEAN_ON_CPU``) against a per-token loop: output, every gradient, idle experts,
top-1 and top-3, the saved-activation and the recompute backward, and AOTAutograd tracing.

On CUDA the same code runs in bf16 with Triton for the elementwise steps (bench/experts_loss_check.py)."""

import importlib

import pytest
import torch

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.ops import expert_ffn
from ops_testing import assert_opcheck, rel_err
from test_ops_experts import per_token_loop

experts = importlib.import_module("compiler.ops.experts")
F64 = torch.float64

pytestmark = pytest.mark.skipif(not experts._grouped_mm_works(), reason="this torch has no CPU torch._grouped_mm")


@pytest.fixture
def lean(monkeypatch):
    monkeypatch.setattr(experts, "LEAN_ON_CPU", True)


def make(N=21, C=16, F_=24, E=5, K=2, idle=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: (torch.randn(*s, generator=g, dtype=F64) * 0.5).to(dtype).requires_grad_(True)
    scores = torch.rand(N, E, generator=g)
    if idle is not None:
        scores[:, idle] = -1.0
    idx = torch.topk(scores, K).indices
    return t(N, C), idx, t(N, K), t(E, C, F_), t(E, C, F_), t(E, F_, C)


def grads_of(fn, args, g):
    leaves = [a for a in args if a.dtype != torch.int64]
    return torch.autograd.grad(fn(*args), leaves, g)


def test_lean_applies_only_where_it_should(lean, monkeypatch):
    x, idx, gates, wg, wu, wd = make()
    assert experts._lean_applies(x, wg, wu, wd)
    assert not experts._lean_applies(x.double(), wg.double(), wu.double(), wd.double())   # fp64: reference
    x6, _, _, wg6, wu6, wd6 = make(C=6, F_=10)
    assert not experts._lean_applies(x6, wg6, wu6, wd6)                                      # unaligned strides
    xb = x.bfloat16()
    assert experts._lean_applies(xb, wg, wu, wd)                                              # fp32 masters
    assert not experts._lean_applies(xb, wg, wu.bfloat16(), wd)                               # mixed weights
    monkeypatch.setattr(experts, "LEAN_ON_CPU", False)
    assert not experts._lean_applies(x, wg, wu, wd)                                           # CPU default


@pytest.mark.parametrize("K, idle", [(2, 3), (1, 0), (3, None)])
def test_matches_per_token_loop(lean, K, idle):
    args = make(K=K, idle=idle)
    out = expert_ffn(*args)
    ref = per_token_loop(*(a.detach().double() for a in args))
    assert rel_err(out, ref) < 1e-6
    g = torch.randn(out.shape, dtype=torch.float32)
    got = grads_of(expert_ffn, args, g)
    a64 = [a.detach().double().requires_grad_(a.dtype != torch.int64) if a.dtype != torch.int64 else a for a in args]
    want = grads_of(per_token_loop, a64, g.double())
    for name, a, b in zip(("x", "gates", "w_gate", "w_up", "w_down"), got, want):
        assert rel_err(a, b) < 1e-5, name
    if idle is not None:
        assert all(got[i][idle].abs().max() == 0 for i in (2, 3, 4))        # an idle expert gets no gradient


def test_forward_saves_what_the_backward_reuses(lean):
    x, idx, gates, wg, wu, wd = make(idle=1)
    out, gu, order, offs = torch.ops.grapefx.expert_ffn_fwd(x, idx, gates, wg, wu, wd)
    assert gu.shape == (21 * 2, 2 * 24) and order.shape == (42,) and offs.dtype == torch.int32
    assert offs.tolist() == torch.cumsum(torch.bincount(idx.flatten(), minlength=5), 0).tolist()
    assert offs[1] == offs[0]                                               # expert 1 is an empty group
    g = torch.randn(21, 16)
    det = [a.detach() for a in (x, gates, wg, wu, wd)]
    saved = torch.ops.grapefx.expert_ffn_backward(g, det[0], idx, *det[1:], gu, order, offs)
    recomputed = torch.ops.grapefx.expert_ffn_backward(g, det[0], idx, *det[1:])
    for a, b in zip(saved, recomputed):
        assert torch.equal(a, b)


def test_reference_path_saves_nothing():
    x, idx, gates, wg, wu, wd = make()
    _, gu, order, offs = torch.ops.grapefx.expert_ffn_fwd(x, idx, gates, wg, wu, wd)
    assert gu.numel() == order.numel() == offs.numel() == 0


def test_bf16(lean):
    args = make(N=32, C=16, F_=32, dtype=torch.bfloat16)
    out = expert_ffn(*args)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, per_token_loop(*(a.detach().double() for a in args))) < 2e-2


@pytest.mark.parametrize("lean_path", [True, False])
def test_fp32_master_weights_give_the_numbers_of_casting_outside_the_op(monkeypatch, lean_path):
    """bf16 rows with the fp32 masters: the output and every gradient equal, bit for bit, those of the
    weights cast to bf16 before the op and their gradients cast back after it; the weights' gradients
    come back in fp32, rounded to bf16 values."""
    monkeypatch.setattr(experts, "LEAN_ON_CPU", lean_path)
    x, idx, gates, wg, wu, wd = make(N=32, C=16, F_=32)
    x, gates = (t.detach().bfloat16().requires_grad_(True) for t in (x, gates))
    masters = [w.detach().clone().requires_grad_(True) for w in (wg, wu, wd)]               # fp32
    cast = [w.detach().clone().requires_grad_(True) for w in (wg, wu, wd)]
    assert experts._lean_applies(x, *masters) == lean_path
    out_m = expert_ffn(x, idx, gates, *masters)
    out_c = expert_ffn(x, idx, gates, *(w.bfloat16() for w in cast))
    assert torch.equal(out_m, out_c)
    g = torch.randn(out_m.shape).bfloat16()
    got = torch.autograd.grad(out_m, [x, gates, *masters], g)
    want = torch.autograd.grad(out_c, [x, gates, *cast], g)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))
    assert all(d.dtype == torch.float32 and torch.equal(d, d.bfloat16().float()) for d in got[2:])
    assert all(d.abs().sum() > 0 for d in got)


def test_opcheck(lean):
    x, idx, gates, wg, wu, wd = make(N=6, E=3)
    assert_opcheck(torch.ops.grapefx.expert_ffn_fwd.default, (x, idx, gates, wg, wu, wd))
    assert_opcheck(torch.ops.grapefx.expert_ffn.default, (x, idx, gates, wg, wu, wd))


def test_aot_autograd_trace(lean):
    """Traced as Inductor would see it (fake tensors: the fake kernel must agree with the real one)."""
    args = make()
    f = torch.compile(expert_ffn, backend="aot_eager", fullgraph=True)
    g = torch.randn(21, 16)
    got = grads_of(f, args, g)
    want = grads_of(expert_ffn, args, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("E", [5, 256, 300])          # uint8 keys, the last uint8 id, int16 keys
def test_route_sorts_narrow_keys_as_the_int64_ids(E):
    ids = torch.randint(0, E, (97, 6), generator=torch.Generator().manual_seed(E))
    ids[0, 0] = E - 1
    order, offs = experts._lean_route(ids, E)
    assert torch.equal(order, torch.argsort(ids.reshape(-1), stable=True))
    assert torch.equal(offs, torch.cumsum(torch.bincount(ids.reshape(-1), minlength=E), 0).to(torch.int32))
