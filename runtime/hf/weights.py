"""grapefx state-dict keys -> the weight names of ``modeling_grapefx.py`` (its docstring lists them).

Every grapefx tensor is renamed, unchanged in value, except the fixed ALiBi slopes
(``layers.{i}.attn.alibi.slopes``), which the config carries. A key with no rule is an error naming
it: the modeling file would not know the weight.
"""

from __future__ import annotations

import re

import torch

from spec.errors import GrapefxError

__all__ = ["hf_state_dict"]

# grapefx name inside layer i -> name inside model.layers.i (None: not stored)
LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq": "self_attn.q_proj.weight",
    "attn.wk": "self_attn.k_proj.weight",
    "attn.wv": "self_attn.v_proj.weight",
    "attn.wo": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    **{f"attn.w{ab}_{part}": f"self_attn.{ab}{part}_proj.weight" for ab in "ab" for part in "qkv"},
    "attn.grape_m.log_freq": "self_attn.grape_m.log_freq",
    "attn.alibi.slope_logit": "self_attn.alibi.slope_logit",
    "attn.alibi.slopes": None,
    "ffn.w_gate": "mlp.gate_proj.weight",
    "ffn.w_up": "mlp.up_proj.weight",
    "ffn.w_down": "mlp.down_proj.weight",
    "moe.router.weight": "mlp.router.weight",
    "moe.expert_bias": "mlp.router.expert_bias",
    "moe.experts.w_gate": "mlp.experts.w_gate",
    "moe.experts.w_up": "mlp.experts.w_up",
    "moe.experts.w_down": "mlp.experts.w_down",
    "moe.shared.w_gate": "mlp.shared.gate_proj.weight",
    "moe.shared.w_up": "mlp.shared.up_proj.weight",
    "moe.shared.w_down": "mlp.shared.down_proj.weight",
}
MODEL = {
    "embed.weight": "model.embed_tokens.weight",
    "grape_m.log_freq": "model.grape_m.log_freq",
    "head.norm.weight": "model.norm.weight",
    "head.lm_head.weight": "lm_head.weight",
}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def hf_name(key: str) -> str | None:
    """The modeling file's name for grapefx key ``key`` (None: not stored); GrapefxError if unknown."""
    if key in MODEL:
        return MODEL[key]
    m = _LAYER_KEY.fullmatch(key)
    if m and m.group(2) in LAYER:
        rest = LAYER[m.group(2)]
        return None if rest is None else f"model.layers.{m.group(1)}.{rest}"
    raise GrapefxError(f"the model has a weight the Hugging Face modeling file does not know: {key!r}; "
                       "export without --format hf (grapefx's own format keeps every weight)")


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The grapefx state dict under the modeling file's names (values untouched)."""
    out = {}
    for key, value in state.items():
        name = hf_name(key)
        if name is not None:
            out[name] = value
    return out
