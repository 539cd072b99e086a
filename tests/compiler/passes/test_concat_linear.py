"""concat_linear: the linear maps of one input become one GEMM over the stacked weights, split back;
same outputs and gradients; the report says where; it declines quietly."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch._dynamo.utils import counters

from compiler.passes.concat_linear import concat_linear_pass, separate_linears, stacked_linear
from compiler.passes.match import propagate
from pass_testing import ALL, compare_blocks, lowered_and_fused
from test_tpa_rotation_commute import WITH_COMMUTE, tpa_spec

WITH = [*ALL, "concat_linear"]


def linears(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]


def test_pattern_and_replacement_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    w1 = torch.tensor([[1.0, 0.0]])                      # y1 = x_0
    w2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])          # y2 = (x_1, x_0 + x_1)
    expected = [torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0, 3.0], [-1.0, 2.0]])]
    for way in (separate_linears, stacked_linear):
        got = way(x, w1, w2)
        assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_q_k_v_and_the_shared_experts_gate_up_become_one_gemm_each(make_spec):
    before = counters["grapefx"]["concat_linear"]
    _, fused, report = lowered_and_fused(make_spec(), WITH)
    e = report.entries["concat_linear"]
    assert (e.matches, e.layers) == (8, [1, 2, 3, 4])                  # q|k|v and shared gate|up, each layer
    assert counters["grapefx"]["concat_linear"] - before == 8
    layer = fused.layers[0]
    widths = sorted(tuple(n.meta["val"].shape)[-1] for n in linears(layer))
    # the router reads the same tokens as the shared experts but is no linear (ops.router.router_logits,
    # fp32 out of bf16 GEMMs): left alone. o, gate|up = 16 + 16, shared down: 32 each; q|k|v = 4*8 + 2*8 + 2*8
    assert widths == [32, 32, 32, 64]
    qkv = next(n for n in linears(layer) if n.meta["val"].shape[-1] == 64)
    assert qkv.meta["grapefx_fused"] == ["concat_linear"]
    split = next(iter(qkv.users))
    assert split.target is torch.split and split.args[1] == [32, 16, 16]
    assert sorted(u.args[1] for u in split.users if u.target is operator.getitem) == [0, 1, 2]
    layer.graph.lint()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("index", [0, 3])                                 # a local and the global layer
def test_same_outputs_and_gradients(make_spec, dtype, tol, index):
    eager, fused, _ = lowered_and_fused(make_spec(), ["concat_linear"], dtype=dtype)
    errors = compare_blocks(eager, fused, index, tol)
    assert {"attn.wq", "attn.wk", "attn.wv", "moe.shared.w_gate", "moe.shared.w_up"} <= set(errors)


def test_dense_ffn_and_tpa_layers(make_spec):
    _, _, report = lowered_and_fused(make_spec(first_k_dense=1), WITH)
    assert report.entries["concat_linear"].layers == [1, 2, 3, 4]
    eager, fused, report = lowered_and_fused(tpa_spec(make_spec), [*WITH_COMMUTE, "concat_linear"])
    assert report.entries["concat_linear"].matches > 0
    compare_blocks(eager, fused, 0, 1e-5)


def _graph(bias: bool) -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    root = torch.nn.Module()
    for name, n in (("w1", 3), ("w2", 5)):
        root.register_parameter(name, torch.nn.Parameter(torch.randn(n, 4)))
    root.register_parameter("b1", torch.nn.Parameter(torch.randn(3)))
    w1, w2, b1 = g.get_attr("w1"), g.get_attr("w2"), g.get_attr("b1")
    y1 = g.call_function(F.linear, (x, w1, b1 if bias else None))
    y2 = g.call_function(F.linear, (x, w2))
    g.output(g.call_function(torch.cat, ([y1, y2], -1)))
    gm = fx.GraphModule(root, g)
    propagate(gm, torch.randn(2, 4))
    return gm


def test_declines_a_linear_with_a_bias_and_says_why():
    gm = _graph(bias=True)
    result = concat_linear_pass(gm)
    assert result.matches == 0 and [r.code for r in result.declined] == ["bias"]
    assert len(linears(gm)) == 2


def test_rewrites_once_then_finds_no_candidate():
    gm = _graph(bias=False)
    x = torch.randn(2, 4)
    expected = gm(x)
    assert concat_linear_pass(gm).matches == 1
    assert torch.allclose(gm(x), expected, atol=1e-6)
    again = concat_linear_pass(gm)                                         # one linear per input now
    assert again.matches == 0 and again.absent.code == "absent"
