"""bias_softmax: a dense ALiBi bias in a grapefx.attention node becomes in-kernel slopes."""

import pytest
import torch
from torch._dynamo.utils import counters

from compiler.lower import lower
from compiler.passes import apply_passes
from compiler.passes.bias_softmax import bias_softmax_pass, biased_attention, slope_attention
from compiler.passes.match import attention_args, propagate
from pass_testing import ATTENTION, compare_blocks, lowered_and_fused, nodes, rel_err
from spec.schema import GrapeA, NoPE

PASSES = ["attention_formation", "bias_softmax"]
ALIBI = torch.ops.grapefx.alibi_bias


def test_matches_exactly_the_global_layers(make_spec):
    before = counters["grapefx"]["bias_softmax"]
    _, fused, report = lowered_and_fused(make_spec(n_layers=8), PASSES)
    e = report.entries["bias_softmax"]
    assert (e.matches, e.layers) == (2, [4, 8])
    assert counters["grapefx"]["bias_softmax"] - before == 2
    assert e.codes() == {"no_dense_bias": [1, 2, 3, 5, 6, 7]}
    layer = fused.layers[3]
    (attn,) = nodes(layer, ATTENTION)
    a = attention_args(attn)
    assert a["bias"] is None and a["slopes"].op == "get_attr" and a["slopes"].target == "attn.alibi.slopes"
    assert not nodes(layer, ALIBI)                                      # no T x T bias left
    assert attn.meta["grapefx_fused"] == ["attention_formation", "bias_softmax"]
    layer.graph.lint()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("learnable", [False, True])
def test_same_outputs_and_gradients(make_spec, dtype, tol, learnable):
    spec = make_spec(moe=False, global_position=GrapeA(learnable=learnable))
    eager, fused, report = lowered_and_fused(spec, PASSES, dtype=dtype)
    assert report.entries["bias_softmax"].layers == [4]
    errors = compare_blocks(eager, fused, 3, tol)
    assert ("attn.alibi.slope_logit" in errors) == learnable            # learnable slopes still learn


def test_learnable_slopes_stay_computed_in_the_graph(make_spec):
    _, fused, _ = lowered_and_fused(make_spec(global_position=GrapeA(learnable=True)), PASSES)
    (attn,) = nodes(fused.layers[3], ATTENTION)
    slopes = attention_args(attn)["slopes"]
    assert slopes.target is torch.mul                                   # softplus(r) * alibi slopes


def test_nope_global_layers_match_nothing_and_say_why(make_spec):
    _, _, report = lowered_and_fused(make_spec(global_position=NoPE()), PASSES)
    e = report.entries["bias_softmax"]
    assert e.matches == 0 and e.layers == []
    assert e.codes() == {"no_dense_bias": [1, 2, 3, 4]}
    assert "no dense bias" in e.why_nothing() and "layers 1-4" in e.why_nothing()


def test_does_nothing_without_attention_formation(make_spec):
    eager, fused = lower(make_spec()), lower(make_spec())
    report = apply_passes(fused, ["bias_softmax"], seq_len=12)
    e = report.entries["bias_softmax"]
    assert e.matches == 0 and "attention_formation is off" in e.skipped
    assert e.why_nothing() == e.skipped
    assert fused.layers[3].code == eager.layers[3].code                 # untouched
    # listed after its prerequisite does not count either: the attention nodes do not exist yet
    report = apply_passes(lower(make_spec()), ["bias_softmax", "attention_formation"], seq_len=12)
    assert report.entries["bias_softmax"].skipped and report.entries["attention_formation"].matches == 4


def test_declines_a_bias_that_is_not_alibi(make_spec):
    # the ALiBi bias transposed (keys x queries): a valid dense bias, but not alibi_bias's layout
    eager, fused = lower(make_spec(moe=False)), lower(make_spec(moe=False))
    for model in (eager, fused):
        gm = model.layers[3]
        alibi = nodes(gm, ALIBI)[0]
        with gm.graph.inserting_after(alibi):
            t = gm.graph.call_method("transpose", (alibi, 1, 2))
        alibi.replace_all_uses_with(t)
        t.args = (alibi, 1, 2)
        gm.recompile()
    report = apply_passes(fused, PASSES, seq_len=12)
    e = report.entries["bias_softmax"]
    assert e.matches == 0 and e.codes()["bias_not_alibi"] == [4]
    (attn,) = nodes(fused.layers[3], ATTENTION)
    assert attention_args(attn)["bias"] is not None                     # folded by attention_formation, kept dense
    compare_blocks(eager, fused, 3, 1e-5)


def test_pass_on_a_graph_without_attention(make_spec):
    model = lower(make_spec())
    propagate(model.layers[0], torch.empty(2, 12, 32, device="meta"), torch.empty(4, device="meta"))
    result = bias_softmax_pass(model.layers[0])
    assert result.matches == 0 and "attention_formation makes them" in result.absent


def test_pattern_and_replacement_functions_agree():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((1, 4, 9, 8), (1, 2, 9, 8), (1, 2, 9, 8)))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    assert rel_err(slope_attention(q, k, v, None, slopes, 0, 0.3), biased_attention(q, k, v, None, slopes, 0, 0.3)) < 1e-12
