"""attention_formation: the explicit chain becomes one grapefx.attention node; same numbers, same
gradients; the mask, scale, GQA and an additive bias are read from the graph; it declines quietly."""

import math
import operator

import pytest
import torch
from torch import fx
from torch._dynamo.utils import counters

from compiler.lower import lower
from compiler.passes import apply_passes
from compiler.passes.attention_formation import attention_formation_pass, explicit_attention, fused_attention
from compiler.passes.match import attention_args, propagate
from pass_testing import ATTENTION, compare_blocks, lowered_and_fused, nodes, rel_err
from spec.schema import NoPE

AF = ["attention_formation"]


def _ops(gm, *targets):
    return [n for n in gm.graph.nodes if n.target in targets]


def test_every_layer_becomes_one_attention_node(make_spec):
    before = counters["grapefx"]["attention_formation"]
    _, fused, report = lowered_and_fused(make_spec(), AF)
    assert counters["grapefx"]["attention_formation"] - before == 4
    e = report.entries["attention_formation"]
    assert (e.matches, e.layers, e.reasons) == (4, [1, 2, 3, 4], {})
    for i, layer in enumerate(fused.layers):
        layer.graph.lint()
        (attn,) = nodes(layer, ATTENTION)
        a = attention_args(attn)
        assert a["window"] == (4 if i < 3 else 0)                       # layer 4 is global: causal only
        assert a["scale"] == pytest.approx(1 / math.sqrt(8))
        assert a["theta"] is None and a["slopes"] is None
        assert (a["bias"] is not None) == (i == 3)                      # the ALiBi bias, still dense
        assert not _ops(layer, torch.softmax, torch.matmul, torch.lt, torch.arange)
        assert not [n for n in layer.graph.nodes if n.op == "call_method" and n.target == "masked_fill"]
        assert attn.meta["val"].shape == (2, 4, 12, 8)                  # (B, Hq, T, D)
        assert attn.meta["grapefx_fused"] == ["attention_formation"]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("passes", [AF, ["attention_formation", "bias_softmax", "rotary_attention"]])
@pytest.mark.parametrize("layer", [0, 3])
def test_same_outputs_and_gradients(make_spec, dtype, tol, passes, layer):
    # dense FFN: the MoE router could pick other experts when bf16 rounding differs
    eager, fused, _ = lowered_and_fused(make_spec(moe=False), passes, dtype=dtype)
    errors = compare_blocks(eager, fused, layer, tol)
    assert {"x", "attn.wq", "attn.wk", "attn.wv", "attn.wo"} <= set(errors)
    if layer == 0:
        assert "log_freq" in errors                                     # GRAPE-M frequencies are learnable


def test_moe_block_fp32(make_spec):
    eager, fused, _ = lowered_and_fused(make_spec(), ["attention_formation", "bias_softmax", "rotary_attention"])
    compare_blocks(eager, fused, 0, 1e-5)
    compare_blocks(eager, fused, 3, 1e-5)


@pytest.mark.parametrize("window", [1, 3, 100])
def test_window_is_read_from_the_mask(make_spec, window):
    eager, fused, _ = lowered_and_fused(make_spec(window=window, moe=False), AF)
    (attn,) = nodes(fused.layers[0], ATTENTION)
    assert attention_args(attn)["window"] == window
    compare_blocks(eager, fused, 0, 1e-5)


def test_gqa_group_size_one(make_spec):
    from dataclasses import replace
    spec = make_spec(moe=False)
    kinds = spec.attention
    spec = replace(spec, attention=replace(kinds, local=replace(kinds.local, kv_heads=4),
                                           global_=replace(kinds.global_, kv_heads=1)))   # G = 1 and G = 4
    eager, fused, report = lowered_and_fused(spec, AF)
    assert report.entries["attention_formation"].matches == 4
    compare_blocks(eager, fused, 0, 1e-5)
    compare_blocks(eager, fused, 3, 1e-5)


# ----------------------------------------------------------------------------- declines
def _edit_both(eager, fused, index, edit):
    """Apply the same graph edit to a layer of both models, then run attention_formation on the fused one."""
    for model in (eager, fused):
        gm = model.layers[index]
        edit(gm)
        gm.graph.lint()
        gm.recompile()
    layer = fused.layers[index]
    propagate(layer, torch.empty(2, 12, 32, device="meta"), *([torch.empty(4, device="meta")]
                                                              if fused.takes_log_freq[index] else []))
    return attention_formation_pass(layer)


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name.endswith(name))


def test_declines_a_mask_that_is_not_causal(make_spec):
    # i - j <= 0 blocks the diagonal too: not the lowering's mask
    eager, fused = lower(make_spec(moe=False)), lower(make_spec(moe=False))

    def edit(gm):
        _node(gm, "attn_future").target = torch.le

    n_before = len(fused.layers[3].graph.nodes)
    result = _edit_both(eager, fused, 3, edit)
    assert result.matches == 0 and [r.code for r in result.declined] == ["mask_comparison"]
    assert len(fused.layers[3].graph.nodes) == n_before                 # untouched
    assert not nodes(fused.layers[3], ATTENTION)


def test_declines_when_probabilities_escape(make_spec):
    eager, fused = lower(make_spec(moe=False)), lower(make_spec(moe=False))

    def edit(gm):                                                       # also return the probabilities
        out = next(n for n in gm.graph.nodes if n.op == "output")
        out.args = (out.args[0], _node(gm, "attn_probs"))

    result = _edit_both(eager, fused, 0, edit)
    assert result.matches == 0 and [r.code for r in result.declined] == ["probs_escape"]


def test_declines_scores_in_low_precision(make_spec):
    # bf16 scores without the fp32 upcast: fusing would compute the softmax in fp32, a change
    eager, fused = lower(make_spec(moe=False), dtype=torch.bfloat16), lower(make_spec(moe=False), dtype=torch.bfloat16)

    def edit(gm):
        cast = _node(gm, "attn_qk_fp32")
        cast.replace_all_uses_with(cast.args[0])
        gm.graph.erase_node(cast)

    for model in (eager, fused):
        edit(model.layers[0])
        model.layers[0].recompile()
    report = apply_passes(fused, AF, seq_len=12)
    assert report.entries["attention_formation"].layers == [2, 3, 4]
    assert report.entries["attention_formation"].codes() == {"scores_dtype": [1]}
    (reason,) = report.entries["attention_formation"].reasons
    assert "bfloat16, not torch.float32" in reason


def _add_bias(gm, shape, name="attn.extra_bias"):
    """scores + a learnable dense bias of ``shape``, before the mask (a NoPE layer has none)."""
    gm.register_parameter(name.split(".")[-1], torch.nn.Parameter(torch.randn(shape) * 0.3))
    scores = _node(gm, "attn_scores")
    masked = next(n for n in scores.users)
    with gm.graph.inserting_before(masked):
        bias = gm.graph.get_attr(name.split(".")[-1])
        biased = gm.graph.call_function(torch.add, (scores, bias))
    masked.replace_input_with(scores, biased)


@pytest.mark.parametrize("shape", [(24, 12), (2, 24, 12), (1, 2, 24, 12), (2, 1, 12), (12,)])
def test_folds_any_additive_bias_into_the_op(make_spec, shape):
    spec = make_spec(moe=False, global_position=NoPE())
    eager, fused = lower(spec), lower(spec)
    torch.manual_seed(0)
    bias = torch.randn(shape) * 0.3
    for model in (eager, fused):
        _add_bias(model.layers[3], shape)
        model.layers[3].extra_bias.data.copy_(bias)
        model.layers[3].recompile()
    report = apply_passes(fused, AF, seq_len=12)
    assert report.entries["attention_formation"].matches == 4
    (attn,) = nodes(fused.layers[3], ATTENTION)
    assert attention_args(attn)["bias"].meta["val"].shape == (4, 12, 12)   # per query head (Hq, T, T)
    errors = compare_blocks(eager, fused, 3, 1e-5)
    assert "extra_bias" in errors                                        # its gradient matches too


def test_declines_a_bias_that_depends_on_the_batch(make_spec):
    spec = make_spec(moe=False, global_position=NoPE())
    eager, fused = lower(spec), lower(spec)
    result = _edit_both(eager, fused, 3, lambda gm: _add_bias(gm, (2, 1, 1, 12)))
    assert result.matches == 0 and [r.code for r in result.declined] == ["bias_shape"]


def test_pattern_and_replacement_functions_agree():
    # the module's side-by-side math: explicit chain == one fused op (GQA G = 2, window 3, a bias)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g) for s in ((2, 4, 7, 8), (2, 2, 7, 8), (2, 2, 7, 8)))
    bias = torch.randn(2, 14, 7, generator=g)                                # (Hkv, G*T, T)
    want = explicit_attention(q, k, v, bias, 3, 0.3)
    assert rel_err(fused_attention(q, k, v, bias, 3, 0.3), want) < 1e-6


def test_graph_without_attention_reports_why(make_spec):
    gm = fx.symbolic_trace(lambda x: operator.add(x, 1))
    propagate(gm, torch.zeros(3))
    result = attention_formation_pass(gm)
    assert result.matches == 0 and result.absent.startswith("no softmax over masked scores")
