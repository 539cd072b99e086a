"""Derived facts of a spec: per-layer table, parameter counts, training FLOPs per token, KV cache.

Letters: C d_model, L layers, Hq query heads, Hkv kv heads, D head dim, W window,
E routed experts, K top-k, S shared experts, F expert hidden, Fd dense FFN hidden, V padded
vocab, T training context (data.seq_len).

Parameter counting follows the state-dict layout the lowering builds (``compiler.lower``):

- ``embed.weight`` V*C; ``lm_head.weight`` V*C unless tied; ``final_norm.weight`` C.
- per layer: ``attn_norm`` C and ``ffn_norm`` C; attention GQA: wq C*Hq*D, wk and wv C*Hkv*D
  each, wo Hq*D*C; with qk_norm a q-norm and a k-norm weight of D each.
  TPA (MATH.md §4, factors linear in x): A_Q C*(R_Q*Hq), B_Q C*(R_Q*D), A_K/A_V C*(R*n),
  B_K/B_V C*(R*D), wo Hq*D*C, with n = Hq (head_factors heads) or Hkv (kv_groups).
- GRAPE-M ``log_freq``: D/2 once per model (share: model) or per layer (share: layer), only when
  learnable (otherwise a buffer). Learnable GRAPE-A: ``slope_logit`` Hq per layer. RoPE: none.
- MoE layer: router E*C; routed experts 3*E*C*F (w_gate, w_up, w_down); shared experts one
  SwiGLU of hidden S*F: 3*C*S*F. ``expert_bias`` is a buffer, not a parameter. Dense layer: 3*C*Fd.
- Active parameters: total minus the (E - K) unchosen routed experts of every MoE layer.

Training FLOPs per token (``FLOPS_CONVENTION``), the figure MFU is computed from:

    6 * N_matmul + sum over layers of 12 * Hq * D * ctx  [+ TPA contraction, below]

N_matmul = the active parameters a token multiplies in a matmul: attention projections, router,
the K chosen routed experts and the shared ones, dense FFNs, and the LM head. The embedding is a
lookup, not a matmul, and is excluded (tied or not: when tied, the shared matrix counts once, as
the LM head; torchtitan's rule). Norm weights, GRAPE-M frequencies and ALiBi slopes are excluded.
6 = 2 FLOPs per multiply-add x 3 (forward, backward to inputs, backward to weights).
Attention: QK^T and AV each cost 2*Hq*D FLOPs per (query, key) pair in the forward, x3 for
training; ctx = W keys on local layers and T/2 (the causal half) on global layers. TPA adds its
per-token contraction 6*D*(R_Q*Hq + (R_K + R_V)*n).
For examples/bench-small.yaml this gives 813,662,208 = 813.7 MFLOP/token.

KV cache: per layer and cached token GQA stores K and V, 2*Hkv*D values; TPA stores
(R_K + R_V)*(n + D) (MATH.md §4); bytes = values * 2 in bf16 (4 in fp32, precision.compute).
At context N a local layer caches min(W, N) tokens, a global layer N. The per-token figure is
the total over layers divided by N (amortised).

``attention_costs``: per layer kind in use, the attention projection parameters of one layer and
its bytes per cached token; for TPA also those of GQA with the same heads, kv_heads and head_dim,
so ``describe`` shows the trade beside each other.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from spec.schema import Attention, Spec

__all__ = ["LayerInfo", "ParamCount", "Flops", "KVLayer", "KVCache", "AttentionCost", "ExpertTraffic", "layers",
           "param_counts", "flops_per_token", "kv_cache", "attention_costs", "largest_groups",
           "expert_traffic", "FLOPS_CONVENTION", "TRAIN_STATE_BYTES_PER_PARAM", "GROUP_FIELDS"]

# fp32 master weight + fp32 gradient + AdamW first and second moments (MATH.md §6)
TRAIN_STATE_BYTES_PER_PARAM = 16

# the spec fields that size each parameter group (param_counts), to name when a model is too large
GROUP_FIELDS: dict[str, tuple[str, ...]] = {
    "embedding": ("model.vocab_size", "model.d_model"),
    "lm_head": ("model.vocab_size", "model.d_model", "model.tied_embeddings: true"),
    "attention": ("attention.<kind>.heads", "attention.<kind>.head_dim", "model.n_layers"),
    "norms": ("model.d_model", "model.n_layers"),
    "positions": ("attention.<kind>.head_dim",),
    "router": ("moe.experts", "model.d_model"),
    "routed_experts": ("moe.experts", "moe.expert_hidden", "model.n_layers"),
    "shared_experts": ("moe.shared_experts", "moe.expert_hidden", "model.n_layers"),
    "dense_ffn": ("ffn.hidden", "model.n_layers"),
}

FLOPS_CONVENTION = ("6 x active matmul params (attention projections, router, top-k + shared experts, dense FFN, "
                    "LM head; embedding excluded) + 12 x Hq x D x ctx per layer for attention scores and values "
                    "(ctx = W on local layers, T/2 on global layers)")


@dataclass(frozen=True)
class LayerInfo:
    index: int               # from 1
    kind: str                # local | global
    mechanism: str           # gqa | tpa
    window: int | None       # keys including the current token; None = full causal
    position: str            # grape-m | grape-a | nope | rope
    rotary: bool             # q, k rotated (GRAPE-M or RoPE)
    additive_bias: bool      # GRAPE-A / ALiBi bias on the scores
    ffn: str                 # moe | dense


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    groups: dict[str, int]   # total parameters by group, for the describe table


@dataclass(frozen=True)
class Flops:
    per_token: int
    matmul_params: int       # N_matmul (active)
    attention: int           # attention score/value FLOPs per token (training)
    tpa_contraction: int
    convention: str = FLOPS_CONVENTION


@dataclass(frozen=True)
class KVLayer:
    index: int
    kind: str
    tokens: int              # tokens cached at the context
    bytes_per_cached_token: int
    bytes: int


@dataclass(frozen=True)
class KVCache:
    context: int
    total_bytes: int
    bytes_per_token: float   # total_bytes / context
    layers: tuple[KVLayer, ...]


@dataclass(frozen=True)
class AttentionCost:
    kind: str                        # local | global
    mechanism: str                   # gqa | tpa
    params_per_layer: int            # attention projection parameters of one layer
    kv_bytes_per_cached_token: int   # per layer, in the compute dtype
    gqa: AttentionCost | None        # TPA only: GQA with the same heads, kv_heads and head_dim


@dataclass(frozen=True)
class ExpertTraffic:
    expert: int                      # E = parallel.expert
    forward: float                   # bytes per token per MoE layer leaving its rank, forward
    training: float                  # forward + backward


def _value_bytes(spec: Spec) -> int:
    """Bytes of one activation or cached value in the compute dtype: 2 for bf16, 4 for fp32."""
    return 2 if spec.precision.compute == "bf16" else 4


def expert_traffic(spec: Spec) -> ExpertTraffic | None:
    """Bytes a token sends to other ranks per MoE layer with expert parallelism E (None without MoE).

    Each of its K assignments is a row of C values in the compute dtype (b bytes). With the
    experts split over E ranks and the load balanced (what the expert bias steers to), an
    assignment lands on another rank with probability (E - 1) / E. The dispatch sends the row
    there and the combine brings the expert's output back; the backward sends both gradients
    the reverse ways. Forward 2*K*C*b*(E-1)/E, training twice that; the exchange of counts
    (E*X/E integers per rank and layer) is not per token and is left out.
    """
    if spec.moe is None:
        return None
    E, K, C = spec.parallel.expert, spec.moe.top_k, spec.model.d_model
    b = _value_bytes(spec)
    forward = 2 * K * C * b * (E - 1) / E
    return ExpertTraffic(E, forward, 2 * forward)


def layers(spec: Spec) -> list[LayerInfo]:
    out = []
    for i, kind in enumerate(spec.layer_kinds()):
        a = spec.attention.of(kind)
        out.append(LayerInfo(
            index=i + 1, kind=kind, mechanism=a.mechanism,
            window=a.window if kind == "local" else None,
            position=a.position.kind, rotary=a.rotates(), additive_bias=a.position.adds_bias,
            ffn=spec.ffn_kind(i),
        ))
    return out


def _kv_heads_made(a: Attention) -> int:
    """n: how many key/value heads a TPA layer produces (all Hq for head_factors heads, else Hkv)."""
    return a.heads if a.tpa_ranks()[0] == "heads" else a.kv_heads


def attention_matmul_params(c: int, a: Attention) -> int:
    hq, hkv, d = a.heads, a.kv_heads, a.head_dim
    out_proj = hq * d * c
    if a.mechanism == "gqa":
        return c * hq * d + 2 * c * hkv * d + out_proj
    _, r_q, r_k, r_v = a.tpa_ranks()
    n = _kv_heads_made(a)
    return c * (r_q * (hq + d) + (r_k + r_v) * (n + d)) + out_proj


def _tpa_contraction_flops(a: Attention) -> int:
    if a.mechanism != "tpa":
        return 0
    _, r_q, r_k, r_v = a.tpa_ranks()
    return 6 * a.head_dim * (r_q * a.heads + (r_k + r_v) * _kv_heads_made(a))


def _ffn_params(spec: Spec, ffn: str) -> tuple[int, int]:
    """(total, active) matmul parameters of one layer's FFN."""
    c = spec.model.d_model
    if ffn == "dense":
        p = 3 * c * spec.ffn.hidden
        return p, p
    m = spec.moe
    router, shared = m.experts * c, 3 * c * m.shared_experts * m.expert_hidden
    expert = 3 * c * m.expert_hidden
    return router + m.experts * expert + shared, router + m.top_k * expert + shared


def param_counts(spec: Spec) -> ParamCount:
    c, v = spec.model.d_model, spec.model.padded_vocab_size
    g = {"embedding": v * c, "lm_head": 0 if spec.model.tied_embeddings else v * c, "attention": 0,
         "norms": c, "positions": 0, "router": 0, "routed_experts": 0, "shared_experts": 0, "dense_ffn": 0}
    inactive = 0
    grape_model: set[int] = set()
    for info in layers(spec):
        a = spec.attention.of(info.kind)
        g["attention"] += attention_matmul_params(c, a)
        g["norms"] += 2 * c + (2 * a.head_dim if spec.model.qk_norm else 0)
        g["positions"] += a.position.layer_parameters(a.heads, a.head_dim)
        if a.position.model_parameters(a.head_dim):
            grape_model.add(a.position.model_parameters(a.head_dim))
        if info.ffn == "dense":
            g["dense_ffn"] += 3 * c * spec.ffn.hidden
        else:
            m = spec.moe
            g["router"] += m.experts * c
            g["routed_experts"] += 3 * c * m.expert_hidden * m.experts
            g["shared_experts"] += 3 * c * m.shared_experts * m.expert_hidden
            inactive += 3 * c * m.expert_hidden * (m.experts - m.top_k)
    g["positions"] += sum(grape_model)
    total = sum(g.values())
    return ParamCount(total=total, active=total - inactive, groups=g)


def flops_per_token(spec: Spec) -> Flops:
    c, t = spec.model.d_model, spec.data.seq_len
    n_matmul = spec.model.padded_vocab_size * c  # LM head (tied or not)
    attn = tpa = 0
    for info in layers(spec):
        a = spec.attention.of(info.kind)
        n_matmul += attention_matmul_params(c, a) + _ffn_params(spec, info.ffn)[1]
        tpa += _tpa_contraction_flops(a)
        # 12 * Hq * D * ctx, ctx = W (local) or T/2 (global): written as 6 * ... * T to stay integral
        attn += 12 * a.heads * a.head_dim * info.window if info.kind == "local" else 6 * a.heads * a.head_dim * t
    return Flops(per_token=6 * n_matmul + attn + tpa, matmul_params=n_matmul, attention=attn, tpa_contraction=tpa)


def _cache_values_per_token(a: Attention) -> int:
    if a.mechanism == "gqa":
        return 2 * a.kv_heads * a.head_dim
    _, _, r_k, r_v = a.tpa_ranks()
    return (r_k + r_v) * (_kv_heads_made(a) + a.head_dim)


def kv_cache(spec: Spec, context: int | None = None) -> KVCache:
    n = context if context is not None else spec.data.seq_len
    elem = _value_bytes(spec)
    rows = []
    for info in layers(spec):
        a = spec.attention.of(info.kind)
        tokens = min(info.window, n) if info.kind == "local" else n
        per = _cache_values_per_token(a) * elem
        rows.append(KVLayer(index=info.index, kind=info.kind, tokens=tokens, bytes_per_cached_token=per,
                            bytes=tokens * per))
    total = sum(r.bytes for r in rows)
    return KVCache(context=n, total_bytes=total, bytes_per_token=total / n if n else 0.0, layers=tuple(rows))


def attention_costs(spec: Spec) -> list[AttentionCost]:
    """Per layer kind in use (local first): one layer's attention parameters and cache bytes per token."""
    c, elem = spec.model.d_model, _value_bytes(spec)
    out = []
    for kind in (k for k in ("local", "global") if k in spec.layer_kinds()):
        a = spec.attention.of(kind)
        gqa = replace(a, mechanism="gqa", r_q=None, r_k=None, r_v=None, head_factors=None)
        as_gqa = AttentionCost(kind, "gqa", attention_matmul_params(c, gqa), _cache_values_per_token(gqa) * elem, None)
        out.append(as_gqa if a.mechanism == "gqa" else AttentionCost(
            kind, a.mechanism, attention_matmul_params(c, a), _cache_values_per_token(a) * elem, as_gqa))
    return out


def largest_groups(spec: Spec, n: int = 3) -> list[tuple[str, int, tuple[str, ...]]]:
    """The ``n`` largest parameter groups as ``(group, parameters, spec fields that size it)``, largest first:
    what to lower when a model does not fit."""
    groups = param_counts(spec).groups
    return [(g, groups[g], GROUP_FIELDS[g]) for g in sorted(groups, key=groups.get, reverse=True)[:n] if groups[g]]
