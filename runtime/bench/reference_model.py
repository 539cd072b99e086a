"""The `reference` way of ``grapefx bench``: the same model written by hand, the way a strong PyTorch
user would, with none of grapefx's lowering, passes or ops.

- attention: FlexAttention with block masks (causal; ``q - k < W`` on local layers, W keys counting
  the current one) and an ALiBi ``score_mod`` on global layers; the GRAPE-M rotation of q and k as
  separate torch code (compiled with the block); GQA through ``enable_gqa``;
- experts: DeepSeek-V3 sigmoid router with expert bias (top-k of s + b, gates from s, normalised),
  tokens sorted by expert, ``torch._grouped_mm`` for gate, up and down (torchtitan's layout, counts
  by ``histc`` so nothing syncs), SwiGLU, weighted ``index_add`` back in fp32, one shared expert;
- precision: fp32 master weights cast to bf16 at use, norms / router / softmax statistics in fp32;
- compilation: every block with ``torch.compile(fullgraph=True)`` (torchtitan's per-block compile;
  blocks of one kind share the compiled code) and the head's norm + LM head + cross-entropy.

Parameters and buffers carry the same names as grapefx's state dict (``layers.3.attn.wq``,
``layers.3.moe.experts.w_gate``, ...), so ``ReferenceModel.from_state_dict(spec, model.state_dict())``
starts from exactly the weights of a grapefx model and the two losses can be compared.

``attention="dense"`` replaces FlexAttention by explicit masked-softmax math (FlexAttention has no
CPU backward): the CPU tests check, in fp32, that this model computes the lowered model's loss.
Supported: GQA attention (GRAPE-M / RoPE / GRAPE-A / NoPE, optional qk-norm), the DSv3 sigmoid
(or softmax) router without group limits, ``load_balancing: none``, dense FFN layers, tied or
untied embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from compiler.window import blocked as window_blocked
from compiler.window import visible
from spec.errors import GrapefxError
from spec.schema import Attention, GrapeA, GrapeM, RoPE, Spec

__all__ = ["ReferenceModel", "rotate", "experts_grouped_mm"]


# ----------------------------------------------------------------------------- the pieces
def _p(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


def _holder(**tensors: Tensor) -> nn.Module:
    m = nn.Module()
    for name, t in tensors.items():
        if isinstance(t, nn.Parameter):
            m.register_parameter(name, t)
        else:
            m.register_buffer(name, t)
    return m


def rms_norm(x: Tensor, w: Tensor, eps: float, dt: torch.dtype) -> Tensor:
    """RMSNorm reduced in fp32, returned in the compute dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(dt)


def rotate(x: Tensor, theta: Tensor) -> Tensor:
    """Half-split rotation of (B, H, T, D) at positions 0..T-1, angles in fp32, result in x's dtype."""
    T, half = x.shape[-2], x.shape[-1] // 2
    angle = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * theta.float()[None, :]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def swiglu(x: Tensor, wg: Tensor, wu: Tensor, wd: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def experts_grouped_mm(x: Tensor, idx: Tensor, gates: Tensor, wg: Tensor, wu: Tensor, wd: Tensor) -> Tensor:
    """sum_k gates[t,k] SwiGLU_{idx[t,k]}(x_t) with tokens sorted by expert and grouped GEMMs.

    x (N, C), idx (N, K), gates (N, K) fp32, wg/wu (E, C, F), wd (E, F, C) in x's dtype -> (N, C).
    """
    N, C = x.shape
    K, E = idx.shape[1], wg.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)                                       # (N*K,) rows by expert
    counts = torch.histc(flat.float(), bins=E, min=0, max=E)                       # no host sync
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tok = order // K
    xs = x[tok]                                                                    # (N*K, C)
    h = F.silu(torch._grouped_mm(xs, wg, offs=offs)) * torch._grouped_mm(xs, wu, offs=offs)
    y = torch._grouped_mm(h, wd, offs=offs).float() * gates.reshape(-1)[order, None]
    return torch.zeros(N, C, dtype=torch.float32, device=x.device).index_add_(0, tok, y).to(x.dtype)


def alibi_slopes(n: int) -> list[float]:
    """ALiBi slopes (Press et al.): 2^(-8k/p) for the largest power of two p <= n, then the odd
    steps of the 2p sequence for the rest."""
    p = 2 ** math.floor(math.log2(n))
    slopes = [2.0 ** (-8.0 * k / p) for k in range(1, p + 1)]
    slopes += [2.0 ** (-4.0 * (2 * j - 1) / p) for j in range(1, n - p + 1)]
    return slopes


# ----------------------------------------------------------------------------- the model
class Block(nn.Module):
    def __init__(self, spec: Spec, index: int, attention: str):
        super().__init__()
        kind = spec.layer_kinds()[index]
        a: Attention = spec.attention.of(kind)
        if a.mechanism != "gqa":
            raise GrapefxError(f"the reference model implements GQA attention only (layer {index + 1}: {a.mechanism})")
        C, self.eps = spec.model.d_model, spec.model.norm_eps
        self.Hq, self.Hkv, self.D = a.heads, a.kv_heads, a.head_dim
        self.window = a.window or 0
        self.flex = attention == "flex"
        self.qk_norm = spec.model.qk_norm
        pos = a.position
        self.rotary = pos.rotates
        self.shared_freq = isinstance(pos, GrapeM) and pos.share == "model"
        self.freq_scale = pos.log_freq_scale if isinstance(pos, GrapeM) else None
        self.rope_base = pos.base if isinstance(pos, RoPE) else None
        self.alibi = isinstance(pos, GrapeA)
        self.alibi_learnable = self.alibi and pos.learnable

        self.attn_norm = _holder(weight=_p(C))
        attn = _holder(wq=_p(self.Hq * self.D, C), wk=_p(self.Hkv * self.D, C), wv=_p(self.Hkv * self.D, C),
                       wo=_p(C, self.Hq * self.D))
        if self.qk_norm:
            attn.q_norm, attn.k_norm = _holder(weight=_p(self.D)), _holder(weight=_p(self.D))
        if isinstance(pos, GrapeM) and pos.share == "layer":
            attn.grape_m = _holder(log_freq=_p(self.D // 2) if pos.learnable_freq else torch.empty(self.D // 2))
        if self.alibi:
            attn.alibi = _holder(slopes=torch.empty(self.Hq))
            if self.alibi_learnable:
                attn.alibi.slope_logit = _p(self.Hq)
        self.attn = attn
        self.ffn_norm = _holder(weight=_p(C))
        self.moe_block = spec.ffn_kind(index) == "moe"
        if self.moe_block:
            m = spec.moe
            r = m.router
            if r.load_balancing != "none" or r.z_loss_coeff or r.num_groups > 1:
                raise GrapefxError("the reference model implements load_balancing: none, no z-loss and no "
                                   "group-limited routing")
            E, F_ = m.experts, m.expert_hidden
            self.E, self.K, self.router = E, m.top_k, r
            moe = nn.Module()
            moe.router = _holder(weight=_p(E, C))
            if r.expert_bias:
                moe.register_buffer("expert_bias", torch.empty(E))
            moe.experts = _holder(w_gate=_p(E, C, F_), w_up=_p(E, C, F_), w_down=_p(E, F_, C))
            if m.shared_experts:
                Fs = m.shared_experts * F_
                moe.shared = _holder(w_gate=_p(Fs, C), w_up=_p(Fs, C), w_down=_p(C, Fs))
            self.moe = moe
        else:
            H = spec.ffn.hidden
            self.ffn = _holder(w_gate=_p(H, C), w_up=_p(H, C), w_down=_p(C, H))

    def _attention(self, h: Tensor, log_freq: Tensor | None, block_mask) -> Tensor:
        B, T, _ = h.shape
        dt, a = h.dtype, self.attn
        q = F.linear(h, a.wq.to(dt)).view(B, T, self.Hq, self.D).transpose(1, 2)     # (B, Hq, T, D)
        k = F.linear(h, a.wk.to(dt)).view(B, T, self.Hkv, self.D).transpose(1, 2)    # (B, Hkv, T, D)
        v = F.linear(h, a.wv.to(dt)).view(B, T, self.Hkv, self.D).transpose(1, 2)
        if self.qk_norm:
            q, k = rms_norm(q, a.q_norm.weight, self.eps, dt), rms_norm(k, a.k_norm.weight, self.eps, dt)
        if self.rotary:
            if self.rope_base is not None:
                j2 = torch.arange(0, self.D, 2, device=h.device, dtype=torch.float32)
                theta = torch.pow(self.rope_base, j2 / -float(self.D))
            else:
                p = log_freq if self.shared_freq else a.grape_m.log_freq
                theta = torch.exp(p.float() / self.freq_scale)
            q, k = rotate(q, theta), rotate(k, theta)
        slopes = None
        if self.alibi:
            slopes = a.alibi.slopes
            if self.alibi_learnable:
                slopes = F.softplus(a.alibi.slope_logit) * slopes
        scale = 1.0 / math.sqrt(self.D)
        if self.flex:
            score_mod = None
            if slopes is not None:
                def score_mod(score, b, hh, q_idx, kv_idx):
                    return score - slopes[hh] * (q_idx - kv_idx)
            o = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True)
        else:
            G = self.Hq // self.Hkv
            kr, vr = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)     # (B, Hq, T, D)
            s = torch.matmul(q, kr.transpose(-1, -2)).float() * scale                  # (B, Hq, T, T) fp32
            i = torch.arange(T, device=h.device)
            dist = (i[:, None] - i[None, :]).float()                                   # i - j
            if slopes is not None:
                s = s - slopes[:, None, None] * dist
            s = s.masked_fill(window_blocked(dist, self.window), float("-inf"))
            o = torch.matmul(torch.softmax(s, -1).to(dt), vr)
        o = o.transpose(1, 2).reshape(B, T, self.Hq * self.D)
        return F.linear(o, a.wo.to(dt))

    def _moe(self, h: Tensor) -> Tensor:
        shape, dt, m, r = h.shape, h.dtype, self.moe, self.router
        flat = h.reshape(-1, shape[-1])                                                # (N, C)
        logits = F.linear(flat.float(), m.router.weight)                               # (N, E) fp32
        if r.score_function == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, -1) if r.pre_softmax else logits
        choice = scores + m.expert_bias if r.expert_bias else scores
        idx = torch.topk(choice, self.K, dim=-1).indices                              # (N, K)
        gates = scores.gather(1, idx)
        if r.score_function == "softmax" and not r.pre_softmax:
            gates = torch.softmax(gates, -1)
        elif self.K > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        gates = gates * r.topk_scaling_factor
        e = m.experts
        y = experts_grouped_mm(flat, idx, gates.to(dt).float(), e.w_gate.to(dt), e.w_up.to(dt), e.w_down.to(dt))
        if hasattr(m, "shared"):
            s = m.shared
            y = y + swiglu(flat, s.w_gate.to(dt), s.w_up.to(dt), s.w_down.to(dt))
        return y.view(shape)

    def forward(self, x: Tensor, log_freq: Tensor | None = None, block_mask=None) -> Tensor:
        dt = x.dtype
        x = x + self._attention(rms_norm(x, self.attn_norm.weight, self.eps, dt), log_freq, block_mask)
        h = rms_norm(x, self.ffn_norm.weight, self.eps, dt)
        if self.moe_block:
            return x + self._moe(h)
        f = self.ffn
        return x + swiglu(h, f.w_gate.to(dt), f.w_up.to(dt), f.w_down.to(dt))


def head_loss(x: Tensor, norm_w: Tensor, lm_w: Tensor, targets: Tensor, eps: float) -> Tensor:
    """final RMSNorm -> LM head -> mean cross-entropy over targets != -100, logits in fp32."""
    h = rms_norm(x, norm_w, eps, x.dtype)
    logits = F.linear(h, lm_w.to(x.dtype)).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


class ReferenceModel(nn.Module):
    """``model(tokens, targets) -> loss``; ``attention``: ``flex`` (CUDA) or ``dense`` (any device)."""

    def __init__(self, spec: Spec, *, attention: str = "flex", dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if attention not in ("flex", "dense"):
            raise GrapefxError(f"reference attention must be flex or dense, got {attention!r}")
        self.spec, self.dtype, self.attention = spec, dtype, attention
        V, C = spec.model.padded_vocab_size, spec.model.d_model
        self.embed = _holder(weight=_p(V, C))
        kinds = [spec.attention.of(k).position for k in set(spec.layer_kinds())]
        shared = next((p for p in kinds if isinstance(p, GrapeM) and p.share == "model"), None)
        if shared is not None:
            D = next(spec.attention.of(k).head_dim for k in ("local", "global")
                     if spec.attention.of(k).position == shared)
            self.grape_m = _holder(log_freq=_p(D // 2) if shared.learnable_freq else torch.empty(D // 2))
        self.layers = nn.ModuleList(Block(spec, i, attention) for i in range(spec.model.n_layers))
        self.head = nn.Module()
        self.head.norm = _holder(weight=_p(C))
        if not spec.model.tied_embeddings:
            self.head.lm_head = _holder(weight=_p(V, C))
        self.block_masks: list = [None] * len(self.layers)
        self._blocks = list(self.layers)
        self._head_loss = head_loss

    @classmethod
    def from_state_dict(cls, spec: Spec, state: dict[str, Tensor], **kwargs) -> "ReferenceModel":
        """A reference model holding exactly ``state`` (a grapefx model's state dict: same keys)."""
        model = cls(spec, **kwargs)
        model.load_state_dict(state, strict=True)
        return model

    def prepare(self, seq_len: int) -> None:
        """Build the flex block masks for sequences of ``seq_len`` on the model's device."""
        if self.attention != "flex":
            return
        device, masks = self.embed.weight.device, {}
        for i, block in enumerate(self.layers):
            w = block.window if 0 < block.window < seq_len else 0
            if w not in masks:
                def mask_mod(b, h, q_idx, kv_idx, w=w):
                    return visible(q_idx - kv_idx, w)
                masks[w] = create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)
            self.block_masks[i] = masks[w]

    def compile_blocks(self, **options) -> "ReferenceModel":
        """Compile every block (``fullgraph``; same-kind blocks share code) and the head's loss."""
        kw = dict(fullgraph=True, dynamic=False, **options)
        self._blocks = [torch.compile(b, **kw) for b in self.layers]
        self._head_loss = torch.compile(head_loss, **kw)
        return self

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        if self.attention == "flex" and self.block_masks[0] is None and len(self.layers):
            self.prepare(tokens.shape[1])
        x = F.embedding(tokens, self.embed.weight).to(self.dtype)                      # (B, T, C)
        log_freq = self.grape_m.log_freq if hasattr(self, "grape_m") else None
        for block, mask in zip(self._blocks, self.block_masks):
            x = block(x, log_freq, mask)
        lm = self.embed.weight if self.spec.model.tied_embeddings else self.head.lm_head.weight
        return self._head_loss(x, self.head.norm.weight, lm, targets, self.spec.model.norm_eps)
