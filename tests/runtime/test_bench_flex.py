"""runtime.bench.flex (the flex way of grapefx bench): the fused attention nodes swapped for
FlexAttention (block masks, ALiBi score_mod, separate rotation) compute the same model. CPU: forward
only (FlexAttention has no CPU backward)."""

import warnings
from pathlib import Path

import pytest
import torch

from compiler.passes.match import is_custom
from compiler.pipeline import build_model
from runtime.bench import flex
from spec import load_spec

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
# 4 layers (layer 4 global, GRAPE-A), C=32, Hq=4/Hkv=2, D=8, W=4, 4 experts top-2
SMALL = ["model.d_model=32", "attention.local.head_dim=8", "attention.local.window=4", "attention.global.head_dim=8",
         "moe.experts=4", "moe.expert_hidden=16", "ffn.hidden=24", "data.seq_len=12"]


def test_rotate_matches_grape_m_rotate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 8, generator=g)
    theta = torch.rand(4, generator=g)
    assert torch.allclose(flex.rotate(x, theta), torch.ops.grapefx.grape_m_rotate(x, theta, 0), atol=1e-6)


@pytest.mark.parametrize("window", [4, 0])
def test_block_mask_is_the_window_rule(window):
    T = 300
    mask = flex.block_mask(T, window, "cpu").to_dense()              # (1, 1, blocks, blocks) of 128
    i = torch.arange(T)
    rel = i[:, None] - i[None, :]
    visible = (rel >= 0) & ((rel < window) if window else True)
    assert mask.shape[-2:] == ((T + 127) // 128, (T + 127) // 128)
    for qb in range(mask.shape[-2]):
        for kb in range(mask.shape[-1]):
            tile = visible[qb * 128:(qb + 1) * 128, kb * 128:(kb + 1) * 128]
            assert bool(mask[0, 0, qb, kb]) == bool(tile.any())


def test_swapped_model_computes_the_same_loss():
    spec = load_spec(TINY, SMALL)
    model, _ = build_model(spec, "cpu", compile=False)
    g = torch.Generator().manual_seed(0)
    V = spec.model.vocab_size
    tokens = torch.randint(0, V, (2, 12), generator=g)
    targets = torch.randint(0, V, (2, 12), generator=g)
    with torch.no_grad():
        fused = model(tokens, targets).loss
        assert flex.use_flex(model) == spec.model.n_layers
        assert not any(is_custom(n, torch.ops.grapefx.attention) for layer in model.layers for n in layer.graph.nodes)
        flex.prepare(model, 12, "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                          # eager flex on CPU warns that it is slow
            swapped = model(tokens, targets).loss
    assert abs(fused.item() - swapped.item()) < 1e-5
