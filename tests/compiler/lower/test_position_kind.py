"""A new position kind, added the way docs/EXTENDING.md says: one class, registered; nothing else.

The toy is a scaled RoPE (position interpolation): theta_j = base^(-2j/D) / factor. It is defined
here, not in spec/schema.py, to show that YAML, validation, lowering, the fusion passes, the
KV-cache decoder, describe and the Megatron export all follow from the class alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
import torch
import torch.nn.functional as F

from compiler import apply_passes, lower, tagged
from runtime.generate import Decoder, subgraph
from spec import spec_from_dict
from spec.derive import param_counts
from spec.errors import SpecError
from spec.megatron import to_megatron
from spec.schema import POSITION_KINDS, PositionKind, position_kind
from spec.validate import SpecProblems


@dataclass(frozen=True, kw_only=True)
class ScaledRoPE(PositionKind):
    """RoPE with every frequency divided by ``factor`` (positions interpolated by that factor)."""
    kind: Literal["scaled-rope"] = "scaled-rope"
    base: float = 10000.0
    factor: float = 4.0
    rotates: ClassVar[bool] = True

    def theta(self, g):
        return g.scale(g.rope(self.base), 1.0 / self.factor)

    def problems(self):
        return [] if self.factor >= 1 else [("factor", f"{self.factor}: an interpolation factor is >= 1")]


@pytest.fixture
def scaled_rope():
    position_kind(ScaledRoPE)
    yield
    del POSITION_KINDS["scaled-rope"]


def _spec(**position):
    return spec_from_dict({
        "model": {"vocab_size": 257, "pad_vocab_to": 1, "d_model": 32, "n_layers": 2, "global_every": 2},
        "attention": {"local": {"heads": 4, "kv_heads": 2, "head_dim": 8, "window": 4,
                                "position": {"kind": "scaled-rope", **position}},
                      "global": {"heads": 4, "kv_heads": 2, "head_dim": 8, "position": "nope"}},
        "moe": None, "ffn": {"hidden": 32}, "precision": {"cpu_compute": "fp32"},
        "data": {"seq_len": 8, "tokenizer": {"kind": "byte"}},
    })


def test_yaml_and_validation_come_from_the_class(scaled_rope):
    assert _spec(factor=2).attention.local.position == ScaledRoPE(factor=2.0)
    assert _spec().attention.local.rotates()                                     # local layers rotate: the rule holds
    with pytest.raises(SpecProblems, match=r"attention\.local\.position\.factor: 0\.5: an interpolation factor"):
        _spec(factor=0.5)
    with pytest.raises(SpecError, match=r"attention\.local\.position\.share: `share` does not apply to position "
                                        r"kind scaled-rope .* it belongs to kind grape-m"):
        _spec(share="layer")
    assert param_counts(_spec()).groups["positions"] == 0                         # no learnable parameters
    with pytest.raises(SpecError, match=r"attention\.local\.position\.kind: position kind scaled-rope "
                                        r"\(Megatron-LM has no flag for it\)"):
        to_megatron(_spec())


def test_lowered_theta_is_rope_over_the_factor(scaled_rope):
    model = lower(_spec(factor=4))
    layer = model.layers[0]
    theta_node = tagged(layer)["attention.q"].args[1]                            # grape_m_rotate(q, theta)
    (theta,) = subgraph(layer, {}, [theta_node])(x=torch.zeros(1, 8, 32))
    # D = 8: base^(-2j/8) = 1, 0.1, 0.01, 0.001 for j = 0..3, over 4
    assert torch.allclose(theta, torch.tensor([0.25, 0.025, 0.0025, 0.00025]), rtol=1e-6, atol=0)


def test_passes_fold_it_and_the_decoder_caches_it(scaled_rope):
    fused = lower(_spec())
    report = apply_passes(fused, ["attention_formation", "rotary_attention"])
    assert report.entries["rotary_attention"].layers == [1]                       # theta folded into the kernel
    model = lower(_spec()).double()
    tokens = torch.randint(0, 257, (1, 7), generator=torch.Generator().manual_seed(0))
    x = model.embed(tokens)
    for layer in model.layers:
        x = layer(x)
    h = F.rms_norm(x, (32,), model.head.norm.weight, model.spec.model.norm_eps)
    ref = h @ model.head.lm_head.weight.T                                         # (1, 7, V)
    decoder = Decoder(model)
    inc = torch.stack([decoder.step(tokens[:, t]) for t in range(7)], 1)
    assert torch.allclose(inc, ref, rtol=0, atol=1e-12 * ref.abs().max().item())
