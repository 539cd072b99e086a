"""rotary_attention: q/k rotations feeding a grapefx.attention node fold into the op (theta)."""

from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from compiler.lower import lower
from compiler.passes import apply_passes
from compiler.passes.match import attention_args
from compiler.passes.rotary_attention import in_kernel_rotation_attention, rotated_attention
from pass_testing import ATTENTION, compare_blocks, lowered_and_fused, nodes, rel_err
from spec.schema import RoPE

PASSES = ["attention_formation", "rotary_attention"]
ROTATE = torch.ops.grapefx.grape_m_rotate


def test_matches_exactly_the_local_layers(make_spec):
    before = counters["grapefx"]["rotary_attention"]
    _, fused, report = lowered_and_fused(make_spec(n_layers=8), PASSES)
    e = report.entries["rotary_attention"]
    assert (e.matches, e.layers) == (6, [1, 2, 3, 5, 6, 7])
    assert counters["grapefx"]["rotary_attention"] - before == 6
    assert e.codes() == {"not_rotated": [4, 8]}
    layer = fused.layers[0]
    (attn,) = nodes(layer, ATTENTION)
    a = attention_args(attn)
    assert not nodes(layer, ROTATE)
    assert a["theta"].target is torch.exp                               # theta = exp(p / c) stays in the graph
    assert a["q"].op == "call_method" and a["q"].target == "transpose"  # the unrotated heads
    layer.graph.lint()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("share, learnable", [("model", True), ("layer", True), ("model", False)])
def test_same_outputs_and_gradients(make_spec, dtype, tol, share, learnable):
    spec = make_spec(moe=False, share=share, learnable_freq=learnable)
    eager, fused, report = lowered_and_fused(spec, PASSES, dtype=dtype)
    assert report.entries["rotary_attention"].layers == [1, 2, 3]
    errors = compare_blocks(eager, fused, 0, tol)
    # gradients reach the GRAPE-M frequencies exactly when they are learnable
    assert ("log_freq" in errors or "attn.grape_m.log_freq" in errors) == learnable


def test_rope_layers_fold_too(make_spec):
    spec = make_spec(moe=False)
    spec = replace(spec, attention=replace(spec.attention, local=replace(spec.attention.local, position=RoPE())))
    eager, fused, report = lowered_and_fused(spec, PASSES)
    assert report.entries["rotary_attention"].layers == [1, 2, 3]
    compare_blocks(eager, fused, 0, 1e-5)


def _edit_both(eager, fused, edit):
    for model in (eager, fused):
        edit(model.layers[0])
        model.layers[0].recompile()
    return apply_passes(fused, PASSES, seq_len=12).entries["rotary_attention"]


def test_declines_different_theta_for_q_and_k(make_spec):
    eager, fused = lower(make_spec(moe=False)), lower(make_spec(moe=False))

    def edit(gm):                                                       # k rotated by theta * 1.0: another node
        rot_q, rot_k = nodes(gm, ROTATE)
        with gm.graph.inserting_before(rot_k):
            other = gm.graph.call_function(torch.mul, (rot_k.args[1], 1.0))
        rot_k.replace_input_with(rot_k.args[1], other)

    e = _edit_both(eager, fused, edit)
    assert e.matches == 2 and e.codes()["theta_differs"] == [1]
    assert len(nodes(fused.layers[0], ROTATE)) == 2                     # left as it was
    compare_blocks(eager, fused, 0, 1e-5)


def test_declines_a_position_offset(make_spec):
    eager, fused = lower(make_spec(moe=False)), lower(make_spec(moe=False))

    def edit(gm):
        for rot in nodes(gm, ROTATE):
            rot.args = (*rot.args[:2], 3)

    e = _edit_both(eager, fused, edit)
    assert e.codes()["pos_offset"] == [1]
    compare_blocks(eager, fused, 0, 1e-5)


def test_declines_when_rotated_q_escapes(make_spec):
    eager, fused = lower(make_spec(moe=False)), lower(make_spec(moe=False))

    def edit(gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        out.args = (out.args[0], nodes(gm, ROTATE)[0])

    e = _edit_both(eager, fused, edit)
    assert e.codes()["rotated_escapes"] == [1]


def test_does_nothing_without_attention_formation(make_spec):
    eager, fused = lower(make_spec()), lower(make_spec())
    e = apply_passes(fused, ["rotary_attention"], seq_len=12).entries["rotary_attention"]
    assert e.matches == 0 and e.skipped.code == "prerequisite_off"
    assert fused.layers[0].code == eager.layers[0].code


def test_pattern_and_replacement_functions_agree():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((1, 4, 9, 8), (1, 2, 9, 8), (1, 2, 9, 8)))
    theta = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64)
    assert rel_err(in_kernel_rotation_attention(q, k, v, theta, None, 4, 0.3),
                   rotated_attention(q, k, v, theta, None, 4, 0.3)) < 1e-12
