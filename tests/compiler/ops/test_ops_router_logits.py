"""The router's fp32 logits from bf16 tokens as bf16 GEMMs over a three-way split (ops.router.router_logits)."""

import torch
import torch.nn.functional as F

from compiler.ops.router import _split_bf16, _SplitLogits, router_logits

W = 1 + 2**-10 + 2**-20         # fp32 needs 21 significant bits; bf16 keeps 8: it rounds to 1.0


def test_split_by_hand():
    # 1 + 2^-8 + 2^-9 is 0.75 of a bf16 step above 1: rounding would give 1 + 2^-7, cutting gives 1
    hi, mid, lo = _split_bf16(torch.tensor([W, -W, 3.0, 1 + 2**-8 + 2**-9]))
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    assert hi.tolist() == [1.0, -1.0, 3.0, 1.0]
    assert mid.tolist() == [2**-10, -2**-10, 0.0, 2**-8 + 2**-9]
    assert lo.tolist() == [2**-20, -2**-20, 0.0, 0.0]


def test_split_survives_inductor():
    # Inductor drops x.to(bf16).to(fp32) inside a kernel: a split by rounding casts came out as (hi, 0, 0)
    w = torch.tensor([W, -W, 0.1, -3e-5])
    compiled = torch.compile(_split_bf16, backend="inductor", fullgraph=True)(w)
    assert all(torch.equal(a, b) for a, b in zip(compiled, _split_bf16(w)))
    assert compiled[2].tolist()[:2] == [2**-20, -2**-20]


def test_split_is_exact():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    hi, mid, lo = _split_bf16(w)
    assert torch.equal(hi.double() + mid.double() + lo.double(), w.double())


def test_forward_keeps_the_fp32_weight_by_hand():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    w = torch.tensor([[W, 0.5], [-W, 0.0]])
    out = _SplitLogits.apply(x, w)
    assert out.dtype == torch.float32
    assert out.tolist() == [[W + 1.0, -W]]                      # exact: 2 + 2^-10 + 2^-20, -(1 + 2^-10 + 2^-20)
    assert F.linear(x, w.bfloat16()).float().tolist() == [[2.0, -1.0]]   # what a bf16 GEMM would give


def test_weight_gradient_by_hand():
    x = torch.tensor([[1.0], [2.0]], dtype=torch.bfloat16, requires_grad=True)
    w = torch.tensor([[0.25]], requires_grad=True)
    _SplitLogits.apply(x, w).backward(torch.tensor([[W], [W]]))
    assert w.grad.dtype == torch.float32
    assert w.grad.item() == 3 * W                              # 1*W + 2*W, exact in fp32
    assert x.grad.dtype == torch.bfloat16
    assert x.grad.tolist() == [[0.25], [0.25]]                 # W * 0.25 rounded to bf16


def _random(n=256, c=128, e=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(e, c, generator=g) * 0.02).requires_grad_()
    grad = torch.randn(n, e, generator=g)
    return x, w, grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_matches_fp64_to_fp32_accuracy():
    x, w, grad = _random()
    out = _SplitLogits.apply(x, w)
    out.backward(grad)
    x64, w64 = x.detach().double(), w.detach().double()
    assert _rel(out, x64 @ w64.t()) < 1e-6                      # a bf16 weight would give ~2e-3
    assert _rel(w.grad, grad.double().t() @ x64) < 1e-6
    dx = grad.double() @ w64
    assert _rel(x.grad, dx) < 4e-3                              # bf16 rounding (2^-9 per element)
    # element by element: within one bf16 step of the exact dx, plus the dropped terms' bound, 2^-14 of
    # sum_k |g_k| |w_k| (they matter where the sum cancels)
    step = dx.abs().to(torch.bfloat16).double() * 2**-7
    dropped = 2**-14 * (grad.double().abs() @ w64.abs())
    assert ((x.grad.double() - dx).abs() <= step + dropped).all()


def test_the_fp32_path_elsewhere():
    # on CPU (and for fp32 tokens) router_logits is F.linear of the fp32 tokens, its gradients autograd's
    x, w, grad = _random(seed=2)
    out = router_logits(x, w)
    out.backward(grad)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.linear(x2.float(), w2)
    ref.backward(grad)
    assert torch.equal(out, ref) and torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)


def test_traces_whole_under_compile():
    # Dynamo traces the autograd.Function into one graph (fullgraph) with its backward
    x, w, grad = _random(seed=3)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    _SplitLogits.apply(x, w).backward(grad)
    compiled = torch.compile(lambda a, b: _SplitLogits.apply(a, b), backend="aot_eager", fullgraph=True)
    compiled(x2, w2).backward(grad)
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)


def test_fp64_stays_fp64():
    # models run in fp64 (the decoding and gradient checks) keep the router in fp64
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    out = router_logits(x, w)
    assert out.dtype == torch.float64 and torch.equal(out, F.linear(x, w))
