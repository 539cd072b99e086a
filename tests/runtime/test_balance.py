"""DeepSeek-V3 expert-bias update and MaxVio, against hand-computed numbers (MATH.md §5)."""

import pytest
import torch
from torch import nn

from runtime.balance import ExpertBalancer, bias_delta, max_vio
from spec.schema import Router


class _Moe(nn.Module):
    def __init__(self, E):
        super().__init__()
        self.register_buffer("expert_bias", torch.zeros(E))


class _Layer(nn.Module):
    def __init__(self, E):
        super().__init__()
        self.moe = _Moe(E)


class _Model(nn.Module):
    """The two things the balancer reads: ``moe_layers`` and ``layers.{i}.moe.expert_bias``."""

    def __init__(self, E=4, moe_layers=(1, 3)):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(E) for _ in range(4))
        self.moe_layers = list(moe_layers)


def _bias(model, i):
    return model.layers[i].moe.expert_bias


def test_update_moves_underloaded_up_and_overloaded_down():
    # counts [3, 1, 2, 2]: mean 2 -> sign(mean - c) = [-1, +1, 0, 0]
    delta = bias_delta(torch.tensor([[3.0, 1.0, 2.0, 2.0]]), 1e-3, centering=False)
    assert delta.dtype == torch.float32
    assert torch.equal(delta, torch.tensor([[-1e-3, 1e-3, 0.0, 0.0]]))


def test_centering_subtracts_the_mean_step():
    # counts [4, 1, 1, 2]: mean 2 -> signs [-1, +1, +1, 0], mean 0.25 -> [-1.25, 0.75, 0.75, -0.25] x 1e-3
    delta = bias_delta(torch.tensor([[4.0, 1.0, 1.0, 2.0]]), 1e-3, centering=True)
    assert torch.allclose(delta, torch.tensor([[-1.25e-3, 0.75e-3, 0.75e-3, -0.25e-3]]), atol=0, rtol=1e-6)
    assert abs(float(delta.sum())) < 1e-9


def test_ties_with_the_mean_are_exact_at_large_counts():
    # counts [2^24+1, 2^24-1, 2^24, 2^24]: mean 2^24 exactly, so the last two are ties; an fp32 sum (2^26 + 0,
    # with 2^24 + 1 not representable) would blur them
    c = torch.tensor([[2**24 + 1, 2**24 - 1, 2**24, 2**24]], dtype=torch.float64)
    assert bias_delta(c, 1.0, centering=False).tolist() == [[-1.0, 1.0, 0.0, 0.0]]


def test_max_vio_by_hand():
    # layer A [3, 1, 2, 2]: (3 - 2) / 2 = 0.5;  layer B [8, 0, 0, 0]: (8 - 2) / 2 = 3;  no tokens: 0
    v = max_vio(torch.tensor([[3.0, 1.0, 2.0, 2.0], [8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert v.tolist() == [0.5, 3.0, 0.0]


def test_counts_sum_over_micro_batches_and_update_once_per_step():
    model = _Model()
    bal = ExpertBalancer(model, Router(bias_update_rate=1e-3))
    bal.add(torch.tensor([[2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert _bias(model, 1).tolist() == [0.0] * 4                      # nothing moves before the step ends
    bal.add(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0]]))
    counts = bal.step(1, tokens_before=0)
    # layer 2 (index 1): [3, 1, 2, 2] -> [-1, +1, 0, 0]; layer 4 (index 3): [1, 3, 2, 2] -> [+1, -1, 0, 0]
    assert counts.tolist() == [[3.0, 1.0, 2.0, 2.0], [1.0, 3.0, 2.0, 2.0]]
    assert torch.equal(_bias(model, 1), torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))
    assert torch.equal(_bias(model, 3), torch.tensor([1e-3, -1e-3, 0.0, 0.0]))
    assert bal.step(2, tokens_before=0) is None                       # no new counts: no second update
    assert torch.equal(_bias(model, 1), torch.tensor([-1e-3, 1e-3, 0.0, 0.0]))


def test_all_reduce_hook_sees_the_summed_counts():
    seen = []

    def twice(t):  # a stand-in for two ranks with identical counts
        seen.append(t.clone())
        return t.mul_(2)

    model = _Model(moe_layers=(0,))
    bal = ExpertBalancer(model, Router(), all_reduce=twice)
    bal.add(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    bal.add(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    assert bal.step(1, 0).tolist() == [[4.0, 0.0, 2.0, 2.0]]
    assert [t.tolist() for t in seen] == [[[2.0, 0.0, 1.0, 1.0]]]     # one reduction per step, after the sum


@pytest.mark.parametrize("limit, updated", [(dict(bias_freeze_after_steps=2), [1, 2]),
                                            (dict(bias_freeze_after_tokens=200), [1, 2])])
def test_freeze_after_steps_or_tokens(limit, updated):
    # 100 tokens per step: tokens before step n are 100 (n - 1); a limit of 2 steps / 200 tokens updates steps 1, 2
    model = _Model(moe_layers=(0,))
    bal = ExpertBalancer(model, Router(bias_update_rate=1.0, **limit))
    moved = []
    for n in range(1, 5):
        before = _bias(model, 0).clone()
        bal.add(torch.tensor([[3.0, 1.0, 2.0, 2.0]]))
        bal.step(n, tokens_before=100 * (n - 1))
        if not torch.equal(before, _bias(model, 0)):
            moved.append(n)
    assert moved == updated
    assert _bias(model, 0).tolist() == [-2.0, 2.0, 0.0, 0.0]


def test_no_expert_bias_means_counts_and_metrics_only():
    model = _Model(moe_layers=(0,))
    bal = ExpertBalancer(model, Router(expert_bias=False, score_function="sigmoid"))
    bal.add(torch.tensor([[3.0, 1.0, 2.0, 2.0]]))
    assert bal.step(1, 0) is not None
    assert _bias(model, 0).tolist() == [0.0] * 4
    assert bal.bias_stats() == {}


def test_balance_report_names_the_worst_layer_from_one():
    model = _Model(moe_layers=(1, 3))
    bal = ExpertBalancer(model, Router())
    r = bal.balance(torch.tensor([[3.0, 1.0, 2.0, 2.0], [8.0, 0.0, 0.0, 0.0]]))
    assert r == {"max_vio": 1.75, "max_vio_worst": 3.0, "max_vio_worst_layer": 4}


def test_bias_stats_and_zero_token_experts_over_the_window():
    model = _Model(moe_layers=(1, 3))
    bal = ExpertBalancer(model, Router(bias_update_rate=1.0))
    bal.add(torch.tensor([[2.0, 0.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]]))
    bal.step(1, 0)
    bal.add(torch.tensor([[2.0, 0.0, 1.0, 1.0], [2.0, 2.0, 0.0, 0.0]]))
    bal.step(2, 0)
    # layer 2: expert 1 got nothing in either step; layer 4: expert 1 got 2 in step 2, experts 2 and 3 nothing
    assert bal.take_window() == {"2": [1], "4": [2, 3]}
    assert bal.take_window() == {}                                    # the window restarts
    # layer 2 bias after two identical steps: c [2,0,1,1] mean 1 -> [-1, +1, 0, 0] twice -> [-2, 2, 0, 0]
    stats = bal.bias_stats()["2"]
    assert stats == {"min": -2.0, "max": 2.0, "mean": 0.0, "std": pytest.approx(2.0 ** 0.5, rel=1e-6)}
