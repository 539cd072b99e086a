"""grapefx::linear_cross_entropy against F.cross_entropy(F.linear(x, W).float()): loss and gradients,
across chunk boundaries, with ignored targets, the no-grad path, and under AOTAutograd tracing."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)
from compiler.ops import linear_cross_entropy
from ops_testing import assert_opcheck, rel_err

lce = importlib.import_module("compiler.ops.linear_cross_entropy")
F64 = torch.float64


def make(N=37, C=16, V=50, dtype=torch.float32, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    w = (torch.randn(V, C, generator=g, dtype=F64) * 0.3).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return x, w, t


def reference(x, w, t):
    return F.cross_entropy(F.linear(x, w).to(torch.promote_types(x.dtype, torch.float32)), t, ignore_index=-100)


def test_chunk_rows_fits_the_budget(monkeypatch):
    monkeypatch.setattr(lce, "CHUNK_BYTES", 1000)
    assert lce.chunk_rows(37, 50, 4) == 5          # 1000 // 200
    assert lce.chunk_rows(3, 50, 4) == 3           # never more than N
    assert lce.chunk_rows(37, 1000, 4) == 1        # at least one row


@pytest.mark.parametrize("rows", [37, 10, 7, 1])    # one chunk, several with a partial last one, single rows
def test_matches_cross_entropy_across_chunks(monkeypatch, rows):
    x, w, t = make()
    monkeypatch.setattr(lce, "CHUNK_BYTES", rows * 50 * 4)
    got = linear_cross_entropy(x, w, t)
    gx, gw = torch.autograd.grad(got * 1.5, (x, w))
    want = reference(x, w, t)
    rx, rw = torch.autograd.grad(want * 1.5, (x, w))
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - want.item()) < 1e-6 * abs(want.item())
    assert rel_err(gx, rx) < 1e-6 and rel_err(gw, rw) < 1e-6


def test_fp64_exact_and_gradcheck(monkeypatch):
    monkeypatch.setattr(lce, "CHUNK_BYTES", 4 * 7 * 8)
    x, w, t = make(N=9, C=3, V=7, dtype=F64, ignore_every=4)
    got, want = linear_cross_entropy(x, w, t), reference(x, w, t)
    assert got.dtype == F64 and abs(got.item() - want.item()) < 1e-14
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, t), (x, w))


def test_no_grad_path_gives_the_same_loss():
    x, w, t = make()
    with torch.no_grad():
        assert torch.equal(linear_cross_entropy(x, w, t), linear_cross_entropy(x, w, t).detach())
        assert abs(linear_cross_entropy(x, w, t).item() - reference(x, w, t).item()) < 1e-6


def test_bf16_inputs_compute_logits_in_bf16_like_the_head():
    x, w, t = make(N=20, C=32, V=64)
    xb, wb = x.detach().bfloat16().requires_grad_(True), w.detach().bfloat16().requires_grad_(True)
    got = linear_cross_entropy(xb, wb, t)
    want = F.cross_entropy(F.linear(xb, wb).float(), t, ignore_index=-100)     # the lowered head in bf16
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 1e-5
    gx, gw = torch.autograd.grad(got, (xb, wb))
    rx, rw = torch.autograd.grad(want, (xb, wb))
    assert gx.dtype == torch.bfloat16 and rel_err(gx, rx) < 2e-2 and rel_err(gw, rw) < 2e-2


def test_every_target_ignored_gives_nan_loss_and_zero_gradients():
    x, w, t = make(N=6)
    t[:] = -100
    got = linear_cross_entropy(x, w, t)
    assert torch.isnan(got) and torch.isnan(reference(x, w, t))
    gx, gw = torch.autograd.grad(got, (x, w))
    assert gx.abs().max() == 0 and gw.abs().max() == 0


def test_ignored_rows_get_no_gradient():
    x, w, t = make(N=10, ignore_every=3)
    gx, = torch.autograd.grad(linear_cross_entropy(x, w, t), (x,))
    assert gx[::3].abs().max() == 0 and gx[1].abs().max() > 0


def test_rejects_out_of_range_targets_and_bad_shapes():
    x, w, t = make(N=4, ignore_every=0)
    with pytest.raises(ValueError, match=r"lie in \[0, 50\)"):
        linear_cross_entropy(x, w, t + 50)
    with pytest.raises(ValueError, match="targets must be int64"):
        linear_cross_entropy(x, w, t[:3])
    with pytest.raises(ValueError, match="share a float dtype"):
        linear_cross_entropy(x, w.double(), t)


def test_opcheck():
    x, w, t = make(N=8, C=4, V=6)
    assert_opcheck(torch.ops.grapefx.linear_cross_entropy_fwd_bwd.default, (x, w, t, -100))
    assert_opcheck(torch.ops.grapefx.linear_cross_entropy_fwd.default, (x.detach(), w.detach(), t, -100))
    assert_opcheck(torch.ops.grapefx.linear_cross_entropy.default, (x, w, t, -100))


def test_traced_training_graph_takes_the_gradient_path():
    """Under AOTAutograd (what Inductor compiles) the training graph holds the fwd_bwd op and the
    gradients match; under no_grad the traced graph holds the loss-only op."""
    x, w, t = make()
    seen = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        def record(g, _):
            seen.extend(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    f = torch.compile(lambda a, b, c: linear_cross_entropy(a * 2.0, b, c), backend=backend, fullgraph=True)
    got = f(x, w, t)
    gx, gw = torch.autograd.grad(got, (x, w))
    want = reference(x * 2.0, w, t)
    rx, rw = torch.autograd.grad(want, (x, w))
    assert any("linear_cross_entropy_fwd_bwd" in s for s in seen)
    assert abs(got.item() - want.item()) < 1e-6 and rel_err(gx, rx) < 1e-6 and rel_err(gw, rw) < 1e-6
    seen.clear()
    with torch.no_grad():
        f(x, w, t)
    assert any(s.endswith("linear_cross_entropy_fwd.default") for s in seen)
    assert not any("fwd_bwd" in s for s in seen)
