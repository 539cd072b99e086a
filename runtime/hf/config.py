"""A spec as the Hugging Face ``config.json`` of ``configuration_grapefx.py``, and what it cannot carry.

``unsupported(spec)`` lists each architecture setting the modeling file does not implement, as
``key.path: value``. Known settings are listed per section below; a setting of a section that is
not listed (one grapefx gained after this modeling version) is unsupported unless it keeps its
default. Training-only settings (router balancing, bias updates, initialisation, GRAPE-M's
``learnable_freq`` and ``base``, which only set the starting point) do not change the forward pass.
``hf_config`` writes the fields documented in ``configuration_grapefx.py``.
"""

from __future__ import annotations

import dataclasses

from compiler import alibi_slopes
from spec.convert import yaml_key
from spec.schema import Spec

__all__ = ["hf_config", "unsupported"]

# the fields of each section the modeling file reads or may ignore (training-only)
KNOWN = {
    "Model": {"vocab_size", "pad_vocab_to", "d_model", "n_layers", "global_every", "layer_kinds", "norm_eps",
              "tied_embeddings", "qk_norm", "init"},
    "Attention": {"mechanism", "heads", "kv_heads", "head_dim", "window", "position", "r_q", "r_k", "r_v",
                  "head_factors"},
    "GrapeM": {"kind", "base", "learnable_freq", "log_freq_scale", "share", "weight_decay"},
    "GrapeA": {"kind", "learnable"},
    "NoPE": {"kind"},
    "RoPE": {"kind", "base"},
    "FFN": {"hidden"},
    "MoE": {"experts", "top_k", "shared_experts", "expert_hidden", "first_k_dense", "router"},
    "DeepSeekV3Router": {"kind", "score_function", "load_balancing", "aux_coeff", "z_loss_coeff", "expert_bias",
                         "bias_update_rate", "bias_freeze_after_steps", "bias_freeze_after_tokens", "bias_centering",
                         "topk_scaling_factor", "num_groups", "group_topk", "pre_softmax", "dtype"},
}
VALUES = {"mechanism": ("gqa", "tpa"), "score_function": ("sigmoid", "softmax"),
          "head_factors": (None, "heads", "kv_groups")}


def _default(fl: dataclasses.Field):
    return fl.default_factory() if fl.default is dataclasses.MISSING else fl.default


def _section(obj, path: str, found: list[str]) -> None:
    """Add to ``found`` the settings of dataclass ``obj`` (at ``path``) the modeling file does not implement."""
    known = KNOWN.get(type(obj).__name__)
    if known is None:                       # a kind of position or router this modeling version does not know
        found.append(f"{path}.kind: {obj.kind!r}" if hasattr(obj, "kind") else f"{path}: {type(obj).__name__}")
        return
    for fl in dataclasses.fields(obj):
        value, key = getattr(obj, fl.name), f"{path}.{yaml_key(fl.name)}"
        if fl.name not in known:
            if value != _default(fl):
                found.append(f"{key}: {value!r}")
        elif fl.name in VALUES and value not in VALUES[fl.name]:
            found.append(f"{key}: {value!r}")


def unsupported(spec: Spec) -> list[str]:
    """``key.path: value`` of every setting of ``spec`` the Hugging Face modeling file cannot run."""
    found: list[str] = []
    _section(spec.model, "model", found)
    for kind in sorted(set(spec.layer_kinds())):
        attn = spec.attention.of(kind)
        _section(attn, f"attention.{kind}", found)
        _section(attn.position, f"attention.{kind}.position", found)
    _section(spec.ffn, "ffn", found)
    if spec.moe is not None:
        _section(spec.moe, "moe", found)
        _section(spec.moe.router, "moe.router", found)
    return found


def _position(attn) -> dict:
    pos = attn.position
    if pos.kind == "grape-m":
        return {"kind": "grape-m", "share": pos.share, "log_freq_scale": pos.log_freq_scale, "base": pos.base}
    if pos.kind == "grape-a":
        return {"kind": "grape-a", "learnable": pos.learnable, "slopes": alibi_slopes(attn.heads)}
    if pos.kind == "rope":
        return {"kind": "rope", "base": pos.base}
    return {"kind": pos.kind}


def _attention(attn) -> dict:
    tpa = None
    if attn.mechanism == "tpa":
        head_factors, r_q, r_k, r_v = attn.tpa_ranks()
        tpa = {"head_factors": head_factors, "r_q": r_q, "r_k": r_k, "r_v": r_v}
    return {"mechanism": attn.mechanism, "heads": attn.heads, "kv_heads": attn.kv_heads, "head_dim": attn.head_dim,
            "window": attn.window, "position": _position(attn), "tpa": tpa}


def hf_config(spec: Spec, *, tokenizer_vocab_size: int, eod_id: int | None, source: dict,
              modeling_version: str) -> dict:
    """The ``config.json`` mapping (``source``: {name, version, run, step}, no machine paths)."""
    m, kinds = spec.model, list(spec.layer_kinds())
    moe = None
    if spec.moe is not None:
        r = spec.moe.router
        moe = {"experts": spec.moe.experts, "top_k": spec.moe.top_k, "shared_experts": spec.moe.shared_experts,
               "expert_hidden": spec.moe.expert_hidden,
               "router": {"kind": r.kind, "score_function": r.score_function, "pre_softmax": r.pre_softmax,
                          "expert_bias": r.expert_bias, "topk_scaling_factor": r.topk_scaling_factor,
                          "num_groups": r.num_groups, "group_topk": r.group_topk}}
    return {
        "architectures": ["GrapefxForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_grapefx.GrapefxConfig",
                     "AutoModelForCausalLM": "modeling_grapefx.GrapefxForCausalLM"},
        "model_type": "grapefx",
        "grapefx_modeling_version": modeling_version,
        "vocab_size": m.padded_vocab_size,
        "tokenizer_vocab_size": tokenizer_vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "layer_kinds": kinds,
        "layer_types": ["sliding_attention" if k == "local" else "full_attention" for k in kinds],
        "sliding_window": spec.attention.local.window if "local" in kinds else None,
        "attention": {k: _attention(spec.attention.of(k)) for k in ("local", "global") if k in kinds},
        "qk_norm": m.qk_norm,
        "rms_norm_eps": m.norm_eps,
        "tied_embeddings": m.tied_embeddings,
        "ffn_kinds": [spec.ffn_kind(i) for i in range(m.n_layers)],
        "ffn_hidden": spec.ffn.hidden,
        "moe": moe,
        "max_position_embeddings": spec.data.seq_len,
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "pad_token_id": eod_id,
        "torch_dtype": "float32",
        "use_cache": True,
        "grapefx": source,
    }
