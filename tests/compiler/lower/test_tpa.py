"""TPA lowering (MATH.md §4): factors, pre-rotated B, head mapping, parameter count, window."""

import dataclasses
import math

import pytest
import torch
from torch import fx

from compiler.lower import lower
from spec.derive import param_counts
from spec.errors import GrapefxError
from spec.schema import RoPE


def tpa_spec(make_spec, head_factors="heads", position=None, **overrides):
    """The shared small spec with TPA on the local layers (Hq 4, Hkv 2, D 8, W 4)."""
    s = make_spec(**overrides)
    local = dataclasses.replace(s.attention.local, mechanism="tpa", head_factors=head_factors,
                                position=position or s.attention.local.position)
    return dataclasses.replace(s, attention=dataclasses.replace(s.attention, local=local))


class Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's value by name."""

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n.name] = out
        return out

    def record(self, *args):
        self.values = {}
        self.run(*args)
        return self.values


def _rotate(x, theta):
    """Reference GRAPE-M, written out: position t turns pair (j, j + D/2) by t * theta_j. x (..., T, D)."""
    T, half = x.shape[-2], x.shape[-1] // 2
    ang = torch.arange(T, dtype=x.dtype)[:, None] * theta.to(x.dtype)[None, :]      # (T, D/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1)


def _reference(block, h, *, Hq, n, D, ranks, window, theta):
    """Contraction first, rotation after (per head), then masked softmax attention and W_o. h (B, T, C)."""
    B, T, _ = h.shape
    at = block.attn

    def contract(wa, wb, R, heads):
        a = (h @ wa.T).view(B, T, R, heads)                                         # A(x_t): (R, heads) per token
        b = (h @ wb.T).view(B, T, R, D)                                             # B(x_t): (R, D)
        out = torch.zeros(B, heads, T, D, dtype=h.dtype)
        for r in range(R):                                                          # (1/R) sum_r a_r (x) b_r
            out += a[:, :, r, :].transpose(1, 2)[..., None] * b[:, :, r, None, :].transpose(1, 2)
        return out / R

    q = _rotate(contract(at.wa_q, at.wb_q, ranks[0], Hq), theta)                    # (B, Hq, T, D)
    k = _rotate(contract(at.wa_k, at.wb_k, ranks[1], n), theta)                     # (B, n, T, D)
    v = contract(at.wa_v, at.wb_v, ranks[2], n)
    k, v = k.repeat_interleave(Hq // n, 1), v.repeat_interleave(Hq // n, 1)          # query head h reads h // G
    s = q @ k.transpose(-1, -2) / math.sqrt(D)                                      # (B, Hq, T, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    s = s.masked_fill((j > i) | (i - j >= window), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, Hq * D)
    return s, o @ at.wo.T


@pytest.mark.parametrize("head_factors,ranks", [("heads", (6, 2, 2)), ("kv_groups", (4, 2, 2))])
def test_pre_rotated_factors_equal_contraction_then_rotation_fp64(make_spec, head_factors, ranks):
    """Rotating the rows of B_Q, B_K before contracting = rotating q, k after, to fp64 rounding."""
    model = lower(tpa_spec(make_spec, head_factors, moe=False)).double()
    block = model.layers[0]
    x = torch.randn(2, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    values = Recorder(block).record(x, model.grape_m.log_freq)
    theta = torch.exp(model.grape_m.log_freq / 16.0)
    n = 4 if head_factors == "heads" else 2
    s_ref, out_ref = _reference(block, values["layer1_attn_norm"], Hq=4, n=n, D=8, ranks=ranks, window=4,
                                theta=theta)
    G = 4 // n
    s = values["layer1_attn_scores_masked"].view(2, n, G, 9, 9).reshape(2, 4, 9, 9)  # rows g*T + i -> head n*G + g
    finite = torch.isfinite(s_ref)
    assert torch.equal(finite, torch.isfinite(s))
    assert torch.allclose(s[finite], s_ref[finite], rtol=0, atol=1e-12)
    assert torch.allclose(values["layer1_attn_out"], out_ref, rtol=0, atol=1e-12)
    # K and V have one head per query head (heads) or per KV group (kv_groups)
    assert values["layer1_attn_k"].shape == values["layer1_attn_v"].shape == (2, n, 9, 8)


def test_state_dict_keys_and_shapes(make_spec):
    sd = lower(tpa_spec(make_spec, "kv_groups")).state_dict()
    # C 32, Hq 4, Hkv 2, D 8, R_Q 4, R_K = R_V = 2 (kv_groups defaults)
    assert {k: tuple(v.shape) for k, v in sd.items() if k.startswith("layers.0.attn.")} == {
        "layers.0.attn.wa_q": (16, 32), "layers.0.attn.wb_q": (32, 32), "layers.0.attn.wa_k": (4, 32),
        "layers.0.attn.wb_k": (16, 32), "layers.0.attn.wa_v": (4, 32), "layers.0.attn.wb_v": (16, 32),
        "layers.0.attn.wo": (32, 32)}
    assert "layers.3.attn.wq" in sd        # the global layers stay GQA


@pytest.mark.parametrize("head_factors", ["heads", "kv_groups"])
@pytest.mark.parametrize("overrides", [{}, {"share": "layer", "moe": False}])
def test_parameter_count_matches_describe(make_spec, head_factors, overrides):
    spec = tpa_spec(make_spec, head_factors, **overrides)
    assert sum(p.numel() for p in lower(spec).parameters()) == param_counts(spec).total


def test_parameter_count_by_hand(make_spec):
    # heads: C (R_Q (Hq + D) + (R_K + R_V)(Hq + D)) + Hq D C = 32 (6*12 + 4*12) + 1024 = 4864 per local layer;
    # GQA wq, wk, wv, wo: 32*32 + 2*32*16 + 32*32 = 3072
    gqa = sum(p.numel() for k, p in lower(make_spec()).named_parameters() if k.startswith("layers.0.attn."))
    tpa = sum(p.numel() for k, p in lower(tpa_spec(make_spec)).named_parameters() if k.startswith("layers.0.attn."))
    assert (gqa, tpa) == (3072, 4864)


@pytest.mark.parametrize("window", [1, 3])
def test_local_tpa_query_sees_exactly_its_window(make_spec, window):
    T = 8
    model = lower(tpa_spec(make_spec, window=window, moe=False))
    x = torch.randn(1, T, 32, requires_grad=True)
    out = model.layers[0](x, model.grape_m.log_freq)
    for i in range(T):
        (g,) = torch.autograd.grad(out[0, i].sum(), x, retain_graph=True)
        assert [j for j in range(T) if g[0, j].abs().sum() > 0] == list(range(max(0, i - window + 1), i + 1))


def test_values_are_never_rotated_and_rope_rotates_b(make_spec):
    model = lower(tpa_spec(make_spec, position=RoPE()))
    rotated = [n.args[0].name for n in model.layers[0].graph.nodes if "grape_m_rotate" in str(n.target)]
    assert rotated == ["layer1_attn_bq", "layer1_attn_bk"]


def test_training_steps_lower_the_loss(make_spec):
    torch.manual_seed(0)
    model = lower(tpa_spec(make_spec))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = model(tokens, torch.roll(tokens, -1, 1))
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_qk_norm_is_refused(make_spec):
    s = tpa_spec(make_spec)
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, qk_norm=True))
    with pytest.raises(GrapefxError, match="QK-norm is not supported with attention mechanism tpa"):
        lower(s)
