"""The DSv3 router and experts as lowered, on crafted cases with hand-computed gates (MATH.md §5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from compiler.lower.builder import GraphBuilder
from compiler.lower.ffn import lower_moe
from compiler.lower.init import Initializer
from spec.schema import MoE, Router, Spec


def _logit(p):
    return math.log(p / (1 - p))


def _moe_graph(scores, *, top_k, bias=None, shared=0, **router):
    """One token h = [1, 0] whose router logits are logit(scores): s = sigmoid(logits) = scores."""
    E, C = len(scores), 2
    moe = MoE(experts=E, top_k=top_k, shared_experts=shared, expert_hidden=3,
              router=Router(expert_bias=bias is not None, **router))
    b = GraphBuilder(prefix="t_")
    h = b.input("h")
    y, counts, aux, _ = lower_moe(b, h, moe, C=C, name="layers.0", init=Initializer(Spec()), cd=torch.float32)
    gm = b.build((y, counts, aux))
    with torch.no_grad():
        gm.moe.router.weight.zero_()
        gm.moe.router.weight[:, 0] = torch.tensor([_logit(s) for s in scores])
        if bias is not None:
            gm.moe.expert_bias.copy_(torch.tensor(bias))
    return gm


def _expert(gm, e, h):
    w = gm.moe.experts
    return (F.silu(h @ w.w_gate[e]) * (h @ w.w_up[e])) @ w.w_down[e]


H = torch.tensor([[[1.0, 0.0]]])      # (B=1, T=1, C=2)


def test_bias_flips_the_choice_but_not_the_gate():
    # s = [.9, .8, .7, .1]; s + b = [.9, .8, .85, .1] -> experts {0, 2}
    # gates from the unbiased s, normalised over k=2: .9/1.6 = .5625, .7/1.6 = .4375
    gm = _moe_graph([0.9, 0.8, 0.7, 0.1], top_k=2, bias=[0.0, 0.0, 0.15, 0.0])
    y, counts, _ = gm(H)
    h = H.view(1, 2)
    expected = 0.5625 * _expert(gm, 0, h) + 0.4375 * _expert(gm, 2, h)
    torch.testing.assert_close(y.view(1, 2), expected, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_without_bias_the_best_scores_win():
    gm = _moe_graph([0.9, 0.8, 0.7, 0.1], top_k=2)
    _, counts, _ = gm(H)
    assert counts.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_k1_gate_is_the_raw_score_times_the_scaling_factor():
    # k = 1 is not normalised (a normalised gate would always be 1): 0.9 * 2.5 = 2.25
    gm = _moe_graph([0.9, 0.2, 0.3, 0.1], top_k=1, topk_scaling_factor=2.5)
    y, counts, _ = gm(H)
    torch.testing.assert_close(y.view(1, 2), 2.25 * _expert(gm, 0, H.view(1, 2)), rtol=1e-5, atol=1e-6)
    assert counts.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_group_limited_routing_keeps_the_best_group():
    # groups {0,1} and {2,3}; group score = sum of the top k // group_topk = 2 scores:
    # 0.9 + 0.1 = 1.0 < 0.6 + 0.6 = 1.2, so the choice is {2, 3} although expert 0 scores best
    gm = _moe_graph([0.9, 0.1, 0.6, 0.6], top_k=2, num_groups=2, group_topk=1)
    y, counts, _ = gm(H)
    assert counts.tolist() == [0.0, 0.0, 1.0, 1.0]
    h = H.view(1, 2)
    torch.testing.assert_close(y.view(1, 2), 0.5 * _expert(gm, 2, h) + 0.5 * _expert(gm, 3, h), rtol=1e-5, atol=1e-6)


def test_ties_go_to_the_lower_expert_index():
    gm = _moe_graph([0.5, 0.7, 0.7, 0.7], top_k=2)
    _, counts, _ = gm(H)
    assert counts.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_no_gradient_reaches_the_bias_and_router_gets_one():
    gm = _moe_graph([0.9, 0.8, 0.7, 0.1], top_k=2, bias=[0.0, 0.0, 0.15, 0.0])
    y, _, _ = gm(H)
    y.sum().backward()
    assert gm.moe.router.weight.grad.abs().sum() > 0
    assert gm.moe.expert_bias.grad is None


def test_seq_aux_loss_by_hand():
    # one row of T = 1 token, E = 4, k = 2, s = [.9, .8, .7, .1] (sum 2.5), unbiased top-2 = {0, 1}
    # f = E/(k T) * hits = 2 * [1, 1, 0, 0];  P = s / sum(s) = [.36, .32, .28, .04]
    # L = alpha * sum f P = 1e-2 * 2 * (.36 + .32) = 0.0136
    gm = _moe_graph([0.9, 0.8, 0.7, 0.1], top_k=2, bias=[0.0, 0.0, 0.15, 0.0],
                    load_balancing="seq_aux", aux_coeff=1e-2)
    _, _, aux = gm(H)
    assert aux.item() == pytest.approx(0.0136, rel=1e-5)
