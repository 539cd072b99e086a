"""The lowered model's meaning: windows, positions, gradients, init, loss."""

import math

import pytest
import torch

from compiler.lower import lower
from spec.schema import GrapeA, NoPE


def _targets(tokens):
    return torch.roll(tokens, -1, dims=1)


def _tokens(B=2, T=12, V=64, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_state_dict_keys_follow_pytorch(make_spec):
    sd = lower(make_spec()).state_dict()
    for key in ["embed.weight", "grape_m.log_freq", "layers.0.attn.wq", "layers.0.attn.wo",
                "layers.0.attn_norm.weight", "layers.3.moe.router.weight", "layers.3.moe.expert_bias",
                "layers.3.moe.experts.w_gate", "layers.3.moe.shared.w_down", "layers.3.attn.alibi.slopes",
                "head.norm.weight", "head.lm_head.weight"]:
        assert key in sd, key
    assert "layers.0.attn.grape_m.log_freq" not in sd        # shared by the model (share: model)
    per_layer = lower(make_spec(share="layer")).state_dict()
    assert "layers.0.attn.grape_m.log_freq" in per_layer and "grape_m.log_freq" not in per_layer


def test_node_names_carry_the_layer_from_one(make_spec):
    model = lower(make_spec())
    names = {n.name for n in model.layers[3].graph.nodes}
    assert "layer4_attn_scores" in names and "layer4_moe_router_logits" in names
    assert all(not n.startswith("layer1_") for n in names)


def test_layers_of_one_kind_have_identical_structure(make_spec):
    model = lower(make_spec(n_layers=8))
    def shape(gm):
        return [(n.op, str(n.target)) for n in gm.graph.nodes]
    assert model.graph_kinds == ["local/moe"] * 3 + ["global/moe"] + ["local/moe"] * 3 + ["global/moe"]
    assert shape(model.layers[0]) == shape(model.layers[5])
    assert shape(model.layers[3]) == shape(model.layers[7])
    assert shape(model.layers[0]) != shape(model.layers[3])


def test_global_layers_never_rotate_and_carry_alibi(make_spec):
    model = lower(make_spec())
    targets = lambda gm: {str(n.target) for n in gm.graph.nodes}
    assert any("grape_m_rotate" in t for t in targets(model.layers[0]))
    assert not any("grape_m_rotate" in t for t in targets(model.layers[3]))
    assert any("alibi_bias" in t for t in targets(model.layers[3]))
    assert not any("alibi_bias" in t for t in targets(model.layers[0]))
    # 4 query heads, a power of two: m_k = 2^(-8k/4) = 1/4, 1/16, 1/64, 1/256
    assert model.layers[3].attn.alibi.slopes.tolist() == [0.25, 0.0625, 0.015625, 0.00390625]


def test_theta_at_init_is_the_rope_spectrum(make_spec):
    model = lower(make_spec())
    theta = torch.exp(model.grape_m.log_freq.double() / 16.0)
    # D = 8: theta_j = 10000^(-2j/8), j = 0..3 = 1, 0.1, 0.01, 0.001
    assert torch.allclose(theta, torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64), rtol=1e-6)


@pytest.mark.parametrize("window", [1, 4, 64])
def test_local_layer_query_sees_exactly_its_window(make_spec, window):
    """d out_i / d x_j != 0 iff i - W + 1 <= j <= i: only attention mixes positions."""
    T = 10
    model = lower(make_spec(window=window, moe=False))
    block = model.layers[0]
    x = torch.randn(1, T, 32, dtype=torch.float32, requires_grad=True)
    out = block(x, model.grape_m.log_freq)
    for i in range(T):
        (g,) = torch.autograd.grad(out[0, i].sum(), x, retain_graph=True)
        seen = [j for j in range(T) if g[0, j].abs().sum() > 0]
        assert seen == list(range(max(0, i - window + 1), i + 1)), (i, seen)


def test_global_layer_is_causal(make_spec):
    T = 9
    model = lower(make_spec(moe=False))
    x = torch.randn(1, T, 32, requires_grad=True)
    out = model.layers[3](x)
    for i in range(T):
        (g,) = torch.autograd.grad(out[0, i].sum(), x, retain_graph=True)
        assert [j for j in range(T) if g[0, j].abs().sum() > 0] == list(range(i + 1))


def test_gradients_reach_every_trainable_parameter_but_not_the_bias(make_spec):
    model = lower(make_spec())
    tokens = _tokens()
    model(tokens, _targets(tokens)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not model.layers[3].moe.expert_bias.requires_grad


def test_fixed_frequencies_get_no_gradient(make_spec):
    model = lower(make_spec(learnable_freq=False))
    assert "grape_m.log_freq" in dict(model.named_buffers())
    assert "grape_m.log_freq" not in dict(model.named_parameters())


def test_loss_at_init_is_near_log_vocab(make_spec):
    model = lower(make_spec())
    tokens = _tokens(B=4, T=16)
    loss = model(tokens, _targets(tokens)).ce_loss.item()
    assert abs(loss - math.log(64)) < 0.3, loss


def test_a_few_steps_on_a_repeated_batch_drive_the_loss_down(make_spec):
    torch.manual_seed(0)
    model = lower(make_spec())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = _tokens(B=4, T=16)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = model(tokens, _targets(tokens))
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_counts_are_an_output_summing_to_tokens_times_k(make_spec):
    model = lower(make_spec())
    tokens = _tokens(B=2, T=12)
    out = model(tokens, _targets(tokens))
    assert out.counts.shape == (4, 4) and out.counts.dtype == torch.float32
    assert out.counts.sum(-1).tolist() == [2 * 12 * 2] * 4


def test_fp32_and_bf16_graphs_agree_within_bf16_tolerance(make_spec):
    spec = make_spec(moe=False)     # no routing: near-ties could flip an expert between dtypes
    tokens = _tokens(B=2, T=12)
    loss32 = lower(spec, dtype="fp32")(tokens, _targets(tokens)).loss
    loss16 = lower(spec, dtype="bf16")(tokens, _targets(tokens)).loss
    assert abs(loss32.item() - loss16.item()) / loss32.item() < 2e-2


def test_variants_share_identical_initial_values(make_spec):
    a = lower(make_spec(global_position=GrapeA())).state_dict()
    b = lower(make_spec(global_position=NoPE())).state_dict()
    shared = set(a) & set(b)
    assert "layers.3.attn.wq" in shared and "layers.3.attn.alibi.slopes" not in b
    for key in shared:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("overrides", [{}, {"share": "layer", "first_k_dense": 1}, {"moe": False}])
def test_parameter_count_matches_describe(make_spec, overrides):
    """spec.derive counts parameters from the spec alone; the lowered model must agree exactly."""
    from spec.derive import param_counts
    spec = make_spec(**overrides)
    assert sum(p.numel() for p in lower(spec).parameters()) == param_counts(spec).total
