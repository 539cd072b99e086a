"""tpa_rotation_commute: a TPA layer's B-factor rotation moves after the contraction, exactly, so
rotary_attention folds it into the kernel; the report shows it; it declines quietly."""

import dataclasses

import pytest
import torch
from torch import fx
from torch._dynamo.utils import counters

from compiler.lower.tpa import TPA_CONTRACTION
from compiler.passes.match import attention_args, propagate
from compiler.passes.tpa_rotation_commute import (contract_then_rotate, rotate_then_contract,
                                                  tpa_rotation_commute_pass)
from pass_testing import ALL, ATTENTION, compare_blocks, lowered_and_fused, nodes

ROTATE = torch.ops.grapefx.grape_m_rotate
WITH_COMMUTE = ["tpa_rotation_commute", *ALL]


def tpa_spec(make_spec, head_factors="kv_groups", **overrides):
    s = make_spec(**overrides)
    local = dataclasses.replace(s.attention.local, mechanism="tpa", head_factors=head_factors)
    return dataclasses.replace(s, attention=dataclasses.replace(s.attention, local=local))


@pytest.mark.parametrize("pos_offset", [0, 5])
def test_pattern_and_replacement_are_the_same_math_fp64(pos_offset):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64)                 # (B, R, T, heads)
    b = torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64)                 # (B, R, T, D)
    theta = torch.rand(4, generator=g, dtype=torch.float64)
    expected = rotate_then_contract(a, b, theta, pos_offset)
    assert expected.shape == (2, 4, 7, 8)
    assert torch.allclose(contract_then_rotate(a, b, theta, pos_offset), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("head_factors", ["heads", "kv_groups"])
def test_tpa_rotations_end_in_the_kernel_and_the_report_says_so(make_spec, head_factors):
    before = counters["grapefx"]["tpa_rotation_commute"]
    _, fused, report = lowered_and_fused(tpa_spec(make_spec, head_factors), WITH_COMMUTE)
    e = report.entries["tpa_rotation_commute"]
    assert (e.matches, e.layers) == (6, [1, 2, 3])                  # q and k of each TPA local layer
    assert counters["grapefx"]["tpa_rotation_commute"] - before == 6
    assert e.codes() == {"absent": [4]}
    assert report.entries["rotary_attention"].layers == [1, 2, 3]
    assert "tpa_rotation_commute: 6 matches in layers 1-3" in "\n".join(report.summary_lines())
    for layer in fused.layers[:3]:
        (attn,) = nodes(layer, ATTENTION)
        assert attention_args(attn)["theta"] is not None            # rotated in-kernel
        assert not nodes(layer, ROTATE)


def test_without_it_tpa_rotations_stay_outside_the_kernel(make_spec):
    _, fused, report = lowered_and_fused(tpa_spec(make_spec), ALL)
    assert report.entries["rotary_attention"].layers == []
    assert report.entries["tpa_rotation_commute"].why_nothing() == "off (not in compile.passes)"
    assert len(nodes(fused.layers[0], ROTATE)) == 2                 # B_Q and B_K, before the contraction


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("passes", [["tpa_rotation_commute"], WITH_COMMUTE])
def test_same_outputs_and_gradients(make_spec, dtype, tol, passes):
    eager, fused, _ = lowered_and_fused(tpa_spec(make_spec, moe=False), passes, dtype=dtype)
    errors = compare_blocks(eager, fused, 0, tol)
    assert {"x", "log_freq", "attn.wa_q", "attn.wb_q", "attn.wa_k", "attn.wb_k", "attn.wb_v"} <= set(errors)


def test_gqa_layers_have_no_candidate(make_spec):
    _, _, report = lowered_and_fused(make_spec(), ["tpa_rotation_commute"])
    e = report.entries["tpa_rotation_commute"]
    assert e.matches == 0
    assert e.why_nothing() == "layers 1-4: no contraction of a rotated factor (no TPA layer that rotates)"


def _graph(equation: str, escape: bool) -> fx.GraphModule:
    """a, b, theta -> einsum(equation, a, grape_m_rotate(b, theta)) [, and the rotated b itself]."""
    g = fx.Graph()
    a, b, theta = g.placeholder("a"), g.placeholder("b"), g.placeholder("theta")
    rot = g.call_function(ROTATE, (b, theta))
    out = g.call_function(torch.einsum, (equation, a, rot))
    g.output((out, rot) if escape else out)
    gm = fx.GraphModule(torch.nn.Module(), g)
    propagate(gm, torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 8), torch.rand(4))
    return gm


@pytest.mark.parametrize("equation, escape, code", [
    (TPA_CONTRACTION, True, "factor_escapes"),
    ("brth,brtd->bthd", False, "einsum_not_tpa"),
])
def test_declines_quietly(equation, escape, code):
    gm = _graph(equation, escape)
    before = gm.code
    result = tpa_rotation_commute_pass(gm)
    assert (result.matches, [r.code for r in result.declined]) == (0, [code])
    assert gm.code == before
