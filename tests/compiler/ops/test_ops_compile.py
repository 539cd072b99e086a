"""Every op traces under torch.compile(fullgraph=True) with Inductor on CPU, forward and backward.

One compile serves all op families (a cold CPU compile costs tens of seconds): the module-scoped
fixture compiles a small block that uses every op, runs it and its backward, and each test
compares one family's outputs and gradients with eager. fullgraph=True turns any graph break
into an error, so a passing fixture is the no-graph-break check.
"""

import pytest
import torch

import compiler.ops as ops
from ops_testing import rel_err

pytestmark = pytest.mark.inductor

B, HQ, HKV, T, D, N, C, F_, E, K = 2, 4, 2, 12, 8, 24, 8, 16, 4, 2


def block(q, k, v, log_freq, slopes, x, w_router, w_gate, w_up, w_down):
    theta = ops.grape_m_theta(log_freq, 16.0)                                         # (D/2,) fp32
    rotated = ops.grape_m_rotate(q, theta, 0)                                         # (B, Hq, T, D)
    bias = ops.alibi_bias(slopes, T, T)                                               # (Hq, T, T)
    local = ops.attention(q, k, v, theta, None, 4, D ** -0.5)                         # (B, Hq, T, D)
    glob = torch.ops.grapefx.attention(q, k, v, None, slopes, 0, D ** -0.5)
    scores = torch.sigmoid(x @ w_router.t())                                          # (N, E) fp32
    indices, counts = ops.router_topk(scores, K, 2, 1)                                # (N, K), (E,)
    gates = torch.gather(scores, 1, indices)
    gates = gates / gates.sum(-1, keepdim=True)
    moe = ops.expert_ffn(x, indices, gates, w_gate, w_up, w_down)                     # (N, C)
    return {"grape_m": rotated, "alibi": bias, "attention_local": local, "attention_global": glob,
            "router_indices": indices, "router_counts": counts, "experts": moe}


def make_inputs():
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: (torch.randn(*shape, generator=g) * 0.5).requires_grad_(True)
    return [t(B, HQ, T, D), t(B, HKV, T, D), t(B, HKV, T, D),
            ops.grape_m_init_log_freq(D, 10000.0, 16.0).requires_grad_(True),
            torch.tensor(ops.alibi_slopes(HQ)).requires_grad_(True),
            t(N, C), t(E, C), t(E, C, F_), t(E, C, F_), t(E, F_, C)]


def run(fn):
    inputs = make_inputs()
    outs = fn(*inputs)
    loss = sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum()
               for name, o in outs.items() if o.is_floating_point() and name != "router_counts")
    loss.backward()
    return outs, [x.grad for x in inputs]


@pytest.fixture(scope="module")
def eager_and_compiled():
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="inductor", dynamic=False)
    return run(block), run(compiled)


GRADS = dict(q=0, k=1, v=2, log_freq=3, slopes=4, x=5, w_router=6, w_gate=7, w_up=8, w_down=9)


def check(pair, outputs, grads):
    (eager_out, eager_grads), (comp_out, comp_grads) = pair
    for name in outputs:
        assert rel_err(comp_out[name], eager_out[name]) < 1e-5, name
    for name in grads:
        assert rel_err(comp_grads[GRADS[name]], eager_grads[GRADS[name]]) < 1e-5, name


def test_grape_m_compiles(eager_and_compiled):
    check(eager_and_compiled, ["grape_m"], ["log_freq"])


def test_alibi_compiles(eager_and_compiled):
    check(eager_and_compiled, ["alibi"], ["slopes"])


def test_attention_compiles(eager_and_compiled):
    check(eager_and_compiled, ["attention_local", "attention_global"], ["q", "k", "v"])


def test_router_compiles(eager_and_compiled):
    (eager_out, _), (comp_out, _) = eager_and_compiled
    assert torch.equal(comp_out["router_indices"], eager_out["router_indices"])
    assert torch.equal(comp_out["router_counts"], eager_out["router_counts"])
    check(eager_and_compiled, [], ["w_router"])


def test_experts_compile(eager_and_compiled):
    check(eager_and_compiled, ["experts"], ["x", "w_gate", "w_up", "w_down"])
