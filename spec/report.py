"""Text rendering of ``grapefx describe`` and ``grapefx validate`` (tables via tabulate)."""

from __future__ import annotations

import textwrap

from tabulate import tabulate

from typing import Any

from spec.convert import to_dict
from spec.derive import (
    TRAIN_STATE_BYTES_PER_PARAM,
    AttentionCost,
    ExpertTraffic,
    attention_costs,
    expert_traffic,
    flops_per_token,
    kv_cache,
    layers,
    param_counts,
)
from spec.load import dump_spec
from spec.schema import Spec

__all__ = ["describe_text", "summary_line", "human"]


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; bytes with unit 'B' use binary prefixes (KiB, MiB, GiB)."""
    if unit == "B":
        for p in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
            if abs(n) < 1024 or p == "EiB":
                return f"{n:.0f} {p}" if p == "B" else f"{n:.2f} {p}"
            n /= 1024
    for p, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= p:
            return f"{n / p:.2f}{s}"
    return f"{n:g}"


def summary_line(spec: Spec) -> str:
    kinds = spec.layer_kinds()
    n_loc, n_glo = kinds.count("local"), kinds.count("global")
    parts = [f"{len(kinds)} layers: {n_loc} local (W={spec.attention.local.window}), {n_glo} global"]
    if spec.moe is not None:
        m = spec.moe
        shared = f" + {m.shared_experts} shared" if m.shared_experts else ""
        parts.append(f"MoE {m.experts} experts top-{m.top_k}{shared}")
    pc = param_counts(spec)
    parts.append(f"{human(pc.total)} params, {human(pc.active)} active; training state "
                 f"{human(pc.total * TRAIN_STATE_BYTES_PER_PARAM, 'B')}")
    return "; ".join(parts)


def _mechanism(a) -> str:
    if a.mechanism == "gqa":
        return f"gqa Hq {a.heads}, Hkv {a.kv_heads}, D {a.head_dim}"
    hf, r_q, r_k, r_v = a.tpa_ranks()
    return f"tpa {hf}, R_Q {r_q}, R_K {r_k}, R_V {r_v}, Hq {a.heads}, D {a.head_dim}"


def describe_text(spec: Spec, file: str, context: int | None = None) -> str:
    kv = kv_cache(spec, context)
    rows = []
    for info, cache in zip(layers(spec), kv.layers, strict=False):
        rows.append([info.index, info.kind, info.mechanism, info.window or "full", info.position,
                     "yes" if info.rotary else "no", "alibi" if info.additive_bias else "-", info.ffn,
                     cache.tokens, human(cache.bytes, "B")])
    out = [f"{file}: {spec.name}", f"  {summary_line(spec)}", ""]
    out.append(tabulate(rows, headers=["layer", "kind", "mech", "window", "position", "rotary", "bias", "ffn",
                                       f"KV tokens@{kv.context}", "KV bytes"], tablefmt="simple"))
    pc = param_counts(spec)
    out += ["", f"parameters: total {pc.total:,} ({human(pc.total)}), active per token {pc.active:,} "
                f"({human(pc.active)})"]
    out.append(tabulate([[k.replace("_", " "), f"{v:,}"] for k, v in pc.groups.items() if v],
                        tablefmt="plain", colalign=("left", "right")))
    rows = []
    for a in attention_costs(spec):
        att = spec.attention.of(a.kind)
        rows.append([a.kind, _mechanism(att), f"{a.params_per_layer:,}", f"{a.kv_bytes_per_cached_token:,}"])
        if a.gqa is not None:
            rows.append(["", f"(gqa Hq {att.heads}, Hkv {att.kv_heads}, D {att.head_dim} instead)",
                         f"{a.gqa.params_per_layer:,}", f"{a.gqa.kv_bytes_per_cached_token:,}"])
    out += ["", tabulate(rows, headers=["attention", "mechanism", "params/layer",
                                        f"KV B/cached token ({spec.precision.compute})"],
                         tablefmt="simple", colalign=("left", "left", "right", "right")), ""]
    state = pc.total * TRAIN_STATE_BYTES_PER_PARAM
    out.append(f"training state (fp32 weights + grads + AdamW m, v = {TRAIN_STATE_BYTES_PER_PARAM} B/param): "
               f"{human(state, 'B')}, activations not included")
    fl = flops_per_token(spec)
    out += ["", f"training FLOPs per token: {fl.per_token:,} ({human(fl.per_token)}) at T = {spec.data.seq_len}",
            f"  = 6 x {fl.matmul_params:,} active matmul params + {fl.attention:,} attention"
            + (f" + {fl.tpa_contraction:,} TPA contraction" if fl.tpa_contraction else ""),
            *textwrap.wrap("convention: " + fl.convention, 100, initial_indent="  ", subsequent_indent="    ")]
    dtype = spec.precision.compute
    out += ["", f"KV cache at context {kv.context} ({dtype}): {kv.bytes_per_token:,.1f} B/token amortised, "
                f"{human(kv.total_bytes, 'B')} per sequence (local layers keep min(W, context) tokens)"]
    if spec.moe is not None:
        out += ["", spec.moe.router.summary(spec.moe.top_k)]
        t = expert_traffic(spec)
        out.append(f"expert parallelism E = {t.expert}: {t.forward:,.0f} B per token per MoE layer to other ranks "
                   f"in the forward, {t.training:,.0f} B with the backward ({spec.precision.compute} rows, "
                   "balanced load; docs/distributed.md)")
    out += ["", "resolved spec:", textwrap.indent(dump_spec(spec), "  ")]
    return "\n".join(out)


def describe(spec: Spec, context: int | None = None) -> dict[str, Any]:
    """The ``grapefx describe --json`` document: everything the text shows. Keys: name, summary, layers (with
    each layer's KV tokens and bytes), params (total, active, groups), training_state_bytes, flops_per_token,
    flops (its terms, the context T and the convention), kv_cache_bytes_per_token, kv_cache (context, total),
    router, attention (per layer kind, with GQA beside TPA), expert_parallel (bytes per token per MoE
    layer at parallel.expert) and spec (the resolved spec)."""
    pc, fl, kv = param_counts(spec), flops_per_token(spec), kv_cache(spec, context)
    return {
        "name": spec.name,
        "summary": summary_line(spec),
        "layers": [dict(index=r.index, kind=r.kind, mechanism=r.mechanism, window=r.window, position=r.position,
                        rotary=r.rotary, additive_bias=r.additive_bias, ffn=r.ffn, kv_tokens=c.tokens,
                        kv_bytes=c.bytes) for r, c in zip(layers(spec), kv.layers, strict=True)],
        "params": {"total": pc.total, "active": pc.active, "groups": dict(pc.groups)},
        "training_state_bytes": pc.total * TRAIN_STATE_BYTES_PER_PARAM,
        "flops_per_token": fl.per_token,
        "flops": {"matmul_params": fl.matmul_params, "attention": fl.attention, "tpa_contraction": fl.tpa_contraction,
                  "seq_len": spec.data.seq_len, "convention": fl.convention},
        "kv_cache_bytes_per_token": kv.bytes_per_token,
        "kv_cache": {"context": kv.context, "total_bytes": kv.total_bytes, "dtype": spec.precision.compute},
        "router": to_dict(spec.moe.router) if spec.moe is not None else None,
        "attention": {a.kind: _cost_dict(a) for a in attention_costs(spec)},
        "expert_parallel": _traffic_dict(expert_traffic(spec)),
        "spec": to_dict(spec),
    }


def _traffic_dict(t: ExpertTraffic | None) -> dict[str, Any] | None:
    return None if t is None else {"expert": t.expert, "bytes_per_token_per_moe_layer": {
        "forward": t.forward, "training": t.training}}


def _cost_dict(a: AttentionCost) -> dict[str, Any]:
    """One layer kind's attention cost, with GQA's beside it for TPA (``gqa``: None for GQA itself)."""
    def plain(c: AttentionCost) -> dict[str, int]:
        return {"params_per_layer": c.params_per_layer, "kv_bytes_per_cached_token": c.kv_bytes_per_cached_token}
    return {"mechanism": a.mechanism, **plain(a), "gqa": None if a.gqa is None else plain(a.gqa)}
