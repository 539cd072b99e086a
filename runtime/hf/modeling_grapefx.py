"""A grapefx model in plain PyTorch for Hugging Face ``transformers`` (``trust_remote_code=True``).

Written into an export folder by ``grapefx export RUN --out DIR --format hf`` from the one template
in grapefx's ``runtime/hf/``; it imports torch and transformers only. The math is grapefx's own
(its MATH.md), step for step, so the logits equal grapefx's in fp32:

    x = embed(ids)                                                     (B, T, C)
    per layer:  x = x + attention(rmsnorm(x));  x = x + ffn(rmsnorm(x))  (ffn: MoE or dense SwiGLU)
    logits = rmsnorm(x) W_head^T, fp32, over vocab_size (the padded vocabulary)

Attention, query slot i and key slot j (slots count the tokens of the sequence from 0):
    q, k, v   GQA: x W_q, x W_k, x W_v per head; TPA: (1/R) A^T B from per-token factors (below)
    [qk_norm] RMSNorm over the head dim, before the rotation
    [GRAPE-M / RoPE] rotate q and k (TPA: the rows of B_Q and B_K) by the angle i * theta_j on the
              half-split pairs (coordinate j pairs with j + D/2); GRAPE-M theta = exp(p / c) with the
              learned p (``grape_m.log_freq``), RoPE theta = base^(-2j/D)
    s = (q k^T) * 1/sqrt(D) in fp32;  [GRAPE-A] s -= m_h (i - j) (ALiBi slopes, after the scaling)
    blocked: j > i; local layers also i - j >= W (W keys including the current one); padding keys
    p = softmax(s) in fp32, cast to the compute dtype;  out = p v, heads concatenated, times W_o
GQA reads KV head h // G for query head h (G = heads / kv_heads). Every position signal here is
relative (a rotation by i - j, a bias in i - j), so slots may start anywhere: a left-padded row
gives the same scores as the unpadded one.

TPA (Tensor Product Attention): per token, A_Q = x W_aq (R_Q, Hq), B_Q = x W_bq (R_Q, D),
Q = (1/R_Q) A_Q^T B_Q; K, V likewise over n heads (n = Hq with head_factors "heads", n = kv_heads
with "kv_groups"); V is never rotated.

MoE (DeepSeek-V3 router): logits = h W_r^T and scores s in fp32 (sigmoid, or softmax); the top-k
experts of s + b (the expert bias steers the choice only; ties go to the lower index; with
num_groups > 1 only the best group_topk groups, a group scored by the sum of its top k/group_topk,
are eligible); gates = the unbiased s of the chosen experts, normalised over them when k > 1,
times topk_scaling_factor (softmax scoring without pre_softmax: top-k of the logits and a softmax
over the chosen k); y = sum_k gate_k SwiGLU_e(h) + SwiGLU_shared(h).

Cache (``generate``): a ``transformers`` dynamic cache, one entry per layer; a local layer needs
only the last W - 1 tokens and gets a sliding-window layer when the config's ``layer_types`` reach
the cache (transformers 4.56 and later), a global layer keeps every token. GQA caches the rotated
keys and the values; TPA caches its factors [A_K | rotated B_K] and [A_V | B_V] and contracts them
when read. Static caches are not supported.

Weights (safetensors, the names of this file; i = 0-based layer):
    model.embed_tokens.weight (V, C)      model.norm.weight (C,)     lm_head.weight (V, C) (not tied)
    model.grape_m.log_freq (D/2,)         (GRAPE-M shared by the model; per layer:
                                           model.layers.i.self_attn.grape_m.log_freq)
    model.layers.i.input_layernorm.weight, .post_attention_layernorm.weight (C,)
    model.layers.i.self_attn.{q,k,v}_proj.weight, o_proj.weight; q_norm.weight, k_norm.weight (D,)
    model.layers.i.self_attn.{aq,bq,ak,bk,av,bv}_proj.weight (TPA, rows rank-major: r * width + j)
    model.layers.i.self_attn.alibi.slope_logit (Hq,)  (learnable GRAPE-A: m_h = softplus(r_h) alibi_h)
    model.layers.i.mlp.router.weight (E, C), mlp.router.expert_bias (E,) fp32
    model.layers.i.mlp.experts.w_gate, w_up (E, C, F), w_down (E, F, C)
    model.layers.i.mlp.shared.{gate,up,down}_proj.weight;  dense: model.layers.i.mlp.{gate,up,down}_proj.weight
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

from .configuration_grapefx import MODELING_VERSION, GrapefxConfig

# transformers 5 renamed the cache argument and output field ``past_key_values`` to ``cache``
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
TPA_CONTRACTION = "brth,brtd->bhtd"          # (B, R, T, heads) x (B, R, T, D) -> (B, heads, T, D)


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * w over the last dim, in fp32, returned in x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def swiglu(h, w_gate, w_up, w_down):
    """(silu(h W_gate^T) * (h W_up^T)) W_down^T; weights in nn.Linear layout (out, in)."""
    return F.linear(F.silu(F.linear(h, w_gate)) * F.linear(h, w_up), w_down)


def rotate(x, theta, start):
    """Turn x (B, H, T, D) at slots start..start+T-1 by slot * theta (D/2,) on the half-split pairs, in fp32."""
    n = torch.arange(start, start + x.shape[-2], device=x.device, dtype=torch.float32)     # (T,)
    angle = n[:, None] * theta.float()[None, :]                                           # (T, D/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def alibi_slopes(n_heads):
    """ALiBi slopes, head 0 steepest: 2^(-8k/n) for a power of two n, else the ALiBi paper's interleave."""
    p = 1 << (n_heads.bit_length() - 1)
    slopes = [2.0 ** (-8.0 * k / p) for k in range(1, p + 1)]
    return slopes + [2.0 ** (-4.0 * (2 * j - 1) / p) for j in range(1, n_heads - p + 1)]


class GrapeM(nn.Module):
    """The learned GRAPE-M log-frequencies p (D/2,); theta = exp(p / c)."""

    def __init__(self, head_dim):
        super().__init__()
        self.log_freq = nn.Parameter(torch.zeros(head_dim // 2))


class Alibi(nn.Module):
    """Learnable GRAPE-A: m_h = softplus(r_h) * alibi_h (fixed slopes need no weight)."""

    def __init__(self, heads):
        super().__init__()
        self.slope_logit = nn.Parameter(torch.zeros(heads))


class GrapefxAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        kind = config.layer_kinds[layer_idx]
        a = config.attention[kind]
        C = config.hidden_size
        self.layer_idx = layer_idx
        self.mechanism, self.Hq, self.D = a["mechanism"], a["heads"], a["head_dim"]
        self.window = a["window"] if kind == "local" else None
        self.position = a["position"]
        self.eps = config.rms_norm_eps
        if self.mechanism == "tpa":
            t = a["tpa"]
            self.n = self.Hq if t["head_factors"] == "heads" else a["kv_heads"]
            self.ranks = {"q": (t["r_q"], self.Hq), "k": (t["r_k"], self.n), "v": (t["r_v"], self.n)}
            for part, (r, width) in self.ranks.items():
                setattr(self, f"a{part}_proj", nn.Linear(C, r * width, bias=False))
                setattr(self, f"b{part}_proj", nn.Linear(C, r * self.D, bias=False))
        else:
            self.n = a["kv_heads"]
            self.q_proj = nn.Linear(C, self.Hq * self.D, bias=False)
            self.k_proj = nn.Linear(C, self.n * self.D, bias=False)
            self.v_proj = nn.Linear(C, self.n * self.D, bias=False)
        self.qk_norm = config.qk_norm and self.mechanism == "gqa"
        if self.qk_norm:
            self.q_norm = _Norm(self.D)
            self.k_norm = _Norm(self.D)
        self.o_proj = nn.Linear(self.Hq * self.D, C, bias=False)
        kind_pos = self.position["kind"]
        if kind_pos == "grape-m" and self.position["share"] == "layer":
            self.grape_m = GrapeM(self.D)
        if kind_pos == "grape-a" and self.position["learnable"]:
            self.alibi = Alibi(self.Hq)

    def theta(self, shared_log_freq, device):
        """The rotation frequencies (D/2,) fp32, or None without a rotation."""
        pos = self.position
        if pos["kind"] == "grape-m":
            p = self.grape_m.log_freq if pos["share"] == "layer" else shared_log_freq
            return torch.exp(p.float() / pos["log_freq_scale"])
        if pos["kind"] == "rope":
            two_j = torch.arange(0, self.D, 2, dtype=torch.float32, device=device)
            return torch.pow(pos["base"], two_j / -float(self.D))
        return None

    def slopes(self, device):
        """ALiBi slopes (Hq,) fp32, or None without GRAPE-A."""
        pos = self.position
        if pos["kind"] != "grape-a":
            return None
        m = torch.tensor(pos["slopes"], dtype=torch.float32, device=device)
        return F.softplus(self.alibi.slope_logit.float()) * m if pos["learnable"] else m

    def _factor(self, x, part, which):
        """(B, R, T, width) factors of x; A already divided by R."""
        r, width = self.ranks[part]
        width = width if which == "a" else self.D
        f = getattr(self, f"{which}{part}_proj")(x)
        f = f.view(x.shape[0], x.shape[1], r, width).transpose(1, 2)
        return f * (1.0 / r) if which == "a" else f

    def forward(self, x, start, shared_log_freq, cache, key_valid):
        B, T, _ = x.shape
        theta = self.theta(shared_log_freq, x.device)
        if self.mechanism == "tpa":
            aq, bq = self._factor(x, "q", "a"), self._factor(x, "q", "b")
            ak, bk = self._factor(x, "k", "a"), self._factor(x, "k", "b")
            av, bv = self._factor(x, "v", "a"), self._factor(x, "v", "b")
            if theta is not None:
                bq, bk = rotate(bq, theta, start), rotate(bk, theta, start)
            q = torch.einsum(TPA_CONTRACTION, aq, bq)                                   # (B, Hq, T, D)
            keys, values = torch.cat([ak, bk], -1), torch.cat([av, bv], -1)            # (B, R, T, n + D)
            if cache is not None:
                keys, values = cache.update(keys, values, self.layer_idx)
            k = torch.einsum(TPA_CONTRACTION, *keys.split([self.n, self.D], -1))       # (B, n, S, D)
            v = torch.einsum(TPA_CONTRACTION, *values.split([self.n, self.D], -1))
        else:
            q = self.q_proj(x).view(B, T, self.Hq, self.D).transpose(1, 2)              # (B, Hq, T, D)
            k = self.k_proj(x).view(B, T, self.n, self.D).transpose(1, 2)               # (B, n, T, D)
            v = self.v_proj(x).view(B, T, self.n, self.D).transpose(1, 2)
            if self.qk_norm:
                q, k = rms_norm(q, self.q_norm.weight, self.eps), rms_norm(k, self.k_norm.weight, self.eps)
            if theta is not None:
                q, k = rotate(q, theta, start), rotate(k, theta, start)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)                               # (B, n, S, D)
        return self.o_proj(self._attend(q, k, v, start, key_valid))

    def _attend(self, q, k, v, start, key_valid):
        """q (B, Hq, T, D) at slots start.., k, v (B, n, S, D) at the S slots ending with the last query."""
        B, _, T, D = q.shape
        S, G = k.shape[2], self.Hq // self.n
        i = torch.arange(start, start + T, device=q.device)                               # (T,) query slots
        j = torch.arange(start + T - S, start + T, device=q.device)                       # (S,) key slots
        rel = i[:, None] - j[None, :]                                                     # (T, S) i - j
        s = torch.matmul(q.reshape(B, self.n, G * T, D), k.transpose(-2, -1)).float() * (1.0 / math.sqrt(D))
        slopes = self.slopes(q.device)
        if slopes is not None:                                                            # -m_h (i - j)
            s = s + (-slopes[:, None, None] * rel.float()).reshape(self.n, G * T, S)
        blocked = rel < 0
        if self.window is not None:
            blocked = blocked | (rel >= self.window)
        blocked = blocked[None, None, None]                                               # (1, 1, 1, T, S)
        if key_valid is not None:                                                         # padding keys, but a
            pad = ~key_valid[:, -S:].bool()                                               # query always sees itself
            blocked = blocked | (pad[:, None, None, None, :] & (rel != 0))
        s = s.view(B, self.n, G, T, S).masked_fill(blocked, float("-inf")).view(B, self.n, G * T, S)
        p = torch.softmax(s, -1).to(v.dtype)
        o = torch.matmul(p, v).reshape(B, self.Hq, T, D)                                  # heads h = kv * G + g
        return o.transpose(1, 2).reshape(B, T, self.Hq * D)


class _Norm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class DenseFFN(nn.Module):
    def __init__(self, C, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(C, hidden, bias=False)
        self.up_proj = nn.Linear(C, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, C, bias=False)

    def forward(self, h):
        return swiglu(h, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class Router(nn.Module):
    def __init__(self, C, E, expert_bias):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(E, C))
        if expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E))


class Experts(nn.Module):
    def __init__(self, E, C, hidden):
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(E, C, hidden))
        self.w_up = nn.Parameter(torch.zeros(E, C, hidden))
        self.w_down = nn.Parameter(torch.zeros(E, hidden, C))


def _topk_lower_index(x, k):
    """Indices of the k largest of each row, ties to the lower index (a stable descending sort)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        m = config.moe
        C, E, Fe = config.hidden_size, m["experts"], m["expert_hidden"]
        self.E, self.K, self.r = E, m["top_k"], m["router"]
        self.router = Router(C, E, self.r["expert_bias"])
        self.experts = Experts(E, C, Fe)
        self.shared = DenseFFN(C, m["shared_experts"] * Fe) if m["shared_experts"] else None

    def route(self, flat):
        """(expert indices (N, K) best first, gates (N, K) fp32) for tokens flat (N, C)."""
        r, K = self.r, self.K
        logits = F.linear(flat.float(), self.router.weight.float())                      # (N, E) fp32
        if r["score_function"] == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, -1) if r["pre_softmax"] else logits
        choice = scores + self.router.expert_bias.float() if r["expert_bias"] else scores
        if r["num_groups"] > 1:
            N, groups = choice.shape[0], r["num_groups"]
            grouped = choice.reshape(N, groups, self.E // groups)
            group_score = torch.topk(grouped, K // r["group_topk"], dim=-1).values.sum(-1)
            allowed = torch.zeros(N, groups, dtype=torch.bool, device=choice.device)
            allowed.scatter_(1, _topk_lower_index(group_score, r["group_topk"]), True)
            choice = grouped.masked_fill(~allowed[..., None], float("-inf")).reshape(N, self.E)
        idx = _topk_lower_index(choice, K)                                               # (N, K)
        gates = torch.gather(scores, 1, idx)
        if r["score_function"] == "softmax" and not r["pre_softmax"]:
            gates = torch.softmax(gates, -1)
        elif K > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        if r["topk_scaling_factor"] != 1.0:
            gates = gates * r["topk_scaling_factor"]
        return idx, gates

    def forward(self, h):
        shape, C = h.shape, h.shape[-1]
        flat = h.reshape(-1, C)                                                          # (N, C)
        idx, gates = self.route(flat)
        N, K = idx.shape
        rows = torch.zeros(N * K, C, dtype=torch.float32, device=h.device)              # (token, slot) rows
        flat_idx, x32, w = idx.reshape(-1), flat.float(), self.experts
        for e in flat_idx.unique().tolist():
            at = (flat_idx == e).nonzero().squeeze(1)                                    # rows routed to e
            xe = x32[at // K]
            he = F.silu(xe @ w.w_gate[e].float()) * (xe @ w.w_up[e].float())
            rows[at] = (he @ w.w_down[e].float()) * gates.reshape(-1)[at, None].to(h.dtype).float()
        y = rows.view(N, K, C).sum(1).to(h.dtype)                                        # (N, C)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(shape)


class GrapefxBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        C = config.hidden_size
        self.eps = config.rms_norm_eps
        self.input_layernorm = _Norm(C)
        self.self_attn = GrapefxAttention(config, layer_idx)
        self.post_attention_layernorm = _Norm(C)
        self.mlp = MoE(config) if config.ffn_kinds[layer_idx] == "moe" else DenseFFN(C, config.ffn_hidden)

    def forward(self, x, start, shared_log_freq, cache, key_valid):
        x = x + self.self_attn(rms_norm(x, self.input_layernorm.weight, self.eps), start, shared_log_freq,
                               cache, key_valid)
        return x + self.mlp(rms_norm(x, self.post_attention_layernorm.weight, self.eps))


class GrapefxPreTrainedModel(PreTrainedModel):
    config_class = GrapefxConfig
    base_model_prefix = "model"
    _no_split_modules = ["GrapefxBlock"]
    supports_gradient_checkpointing = False

    def _keep_fp32(self):
        """The router, GRAPE-M frequencies and ALiBi slope logits stay fp32 (MATH.md §6), where the model has them."""
        names = {name.rsplit(".", 1)[-1] for name, _ in self.named_modules()}
        self._keep_in_fp32_modules = [m for m in ("router", "grape_m", "alibi") if m in names]
        self._keep_in_fp32_modules_strict = list(self._keep_in_fp32_modules)    # bf16 too, not only fp16

    @torch.no_grad()
    def _init_weights(self, module):
        """New models only (loading replaces every value): normal(0.02) matrices, unit norms, zero biases."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, 0.02)
        elif isinstance(module, Experts):
            for w in (module.w_gate, module.w_up, module.w_down):
                w.normal_(0.0, 0.02)
        elif isinstance(module, Router):
            module.weight.normal_(0.0, 0.02)
            if hasattr(module, "expert_bias"):
                module.expert_bias.zero_()
        elif isinstance(module, _Norm):
            module.weight.fill_(1.0)


class GrapefxModel(GrapefxPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        shared = [a for k, a in config.attention.items() if k in config.layer_kinds
                  and a["position"]["kind"] == "grape-m" and a["position"]["share"] == "model"]
        if shared:
            self.grape_m = GrapeM(shared[0]["head_dim"])
        self.layers = nn.ModuleList(GrapefxBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = _Norm(config.hidden_size)
        self._keep_fp32()
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, inputs_embeds=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds           # (B, T, C)
        T = x.shape[1]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = _new_cache(self.config)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask: only a 2-D padding mask (batch, tokens) is supported")
        if attention_mask is not None:
            start = attention_mask.shape[1] - T                                             # slot of x[:, 0]
            key_valid = None if bool(attention_mask.all()) else attention_mask
        else:
            start = int(cache.get_seq_length()) if cache is not None else 0
            key_valid = None
        shared = self.grape_m.log_freq if hasattr(self, "grape_m") else None
        for layer in self.layers:
            x = layer(x, start, shared, cache if use_cache else None, key_valid)
        x = rms_norm(x, self.norm.weight, self.config.rms_norm_eps)
        return BaseModelOutputWithPast(last_hidden_state=x, **{CACHE_FIELD: cache if use_cache else None})


def _new_cache(config):
    """A dynamic cache; sliding-window layers for the local layers where transformers reads layer_types."""
    from transformers import DynamicCache
    try:
        return DynamicCache(config=config)
    except TypeError:                                    # transformers before 4.56: no config argument
        return DynamicCache()


class GrapefxForCausalLM(GrapefxPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = GrapefxModel(config)
        if not config.tied_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._keep_fp32()
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return None if self.config.tied_embeddings else self.lm_head

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, inputs_embeds=None,
                labels=None, past_key_values=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache,
                         inputs_embeds=inputs_embeds, past_key_values=past_key_values)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        w = self.model.embed_tokens.weight if self.config.tied_embeddings else self.lm_head.weight
        logits = F.linear(h, w.to(h.dtype)).float()                                          # (B, T, V) fp32
        loss = None
        if labels is not None:   # next-token cross-entropy, mean over labels != -100
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})


__all__ = ["MODELING_VERSION", "GrapefxForCausalLM", "GrapefxModel", "GrapefxPreTrainedModel"]
