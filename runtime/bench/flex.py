"""FlexAttention in place of the fused attention op: the ``flex`` way of ``grapefx bench``.

``use_flex(model)`` rewrites every ``grapefx.attention`` node of the (fused) block graphs into a
call of ``flex_attention_op`` with the same arguments, before the pipeline compiles them. Under
``torch.compile`` that function becomes (MATH.md §1–§3):

    q, k  = rotate(q, theta), rotate(k, theta)      GRAPE-M, separate, traced: Inductor fuses it
    out   = flex_attention(q, k, v, block_mask, score_mod, scale, enable_gqa=True)
            block mask: causal, and q - k < W on local layers (W keys including the current one)
            score_mod:  score - slopes[h] * (q_idx - kv_idx)   (ALiBi, after the scaling, fp32)

Everything else in the graphs stays ours (fused experts, the head's loss). Block masks depend on
T and W only; ``block_mask`` builds each once, outside compiled code (``prepare`` does it ahead
of the first compiled call so Dynamo only reads the cache). CUDA only: FlexAttention has no CPU
backward, and eager FlexAttention is the unfused math fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from compiler.passes.match import ATTENTION_ARGS, ATTENTION_DEFAULTS, is_custom
from compiler.window import visible
from spec.errors import GrapefxError

__all__ = ["rotate", "block_mask", "flex_attention_op", "use_flex", "prepare"]

_BLOCK_MASKS: dict[tuple[int, int], BlockMask] = {}


def rotate(x: Tensor, theta: Tensor) -> Tensor:
    """GRAPE-M rotation at positions 0..T-1 as traceable torch math (= ``grapefx.grape_m_rotate``):
    half-split pairs, angles n * theta_j in fp32, result in x's dtype. x (B, H, T, D), theta (D/2,)."""
    T, half = x.shape[-2], x.shape[-1] // 2
    n = torch.arange(T, device=x.device, dtype=torch.float32)
    angle = n[:, None] * theta.float()[None, :]                                     # (T, D/2) fp32
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def _mask_mod(window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx - kv_idx, window)
    return mask_mod


def block_mask(T: int, window: int, device: torch.device | str = "cuda") -> BlockMask:
    """The causal (window 0) or sliding-window block mask for T queries and keys, built once."""
    w = window if 0 < window < T else 0
    if (T, w) not in _BLOCK_MASKS:
        _BLOCK_MASKS[(T, w)] = create_block_mask(_mask_mod(w), B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    return _BLOCK_MASKS[(T, w)]


def flex_attention_op(q: Tensor, k: Tensor, v: Tensor, theta: Tensor | None, slopes: Tensor | None, window: int,
                      scale: float, bias: Tensor | None = None) -> Tensor:
    """``grapefx.attention``'s semantics through FlexAttention (module docstring); no dense bias."""
    if bias is not None:
        raise GrapefxError("the flex attention way takes no dense score bias; enable the bias_softmax pass")
    if theta is not None:
        q, k = rotate(q, theta), rotate(k, theta)
    score_mod = None
    if slopes is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask(q.shape[-2], window, q.device),
                          scale=scale, enable_gqa=True)


def use_flex(model) -> int:
    """Rewrite the ``grapefx.attention`` nodes of ``model.layers`` into ``flex_attention_op``; returns how many."""
    swapped = 0
    for gm in model.layers:
        for node in list(gm.graph.nodes):
            if is_custom(node, torch.ops.grapefx.attention):
                args = dict(ATTENTION_DEFAULTS)
                args.update(zip(ATTENTION_ARGS, node.args))
                args.update(node.kwargs)
                node.target = flex_attention_op
                node.args, node.kwargs = tuple(args[n] for n in ATTENTION_ARGS), {}
                swapped += 1
        gm.graph.lint()
        gm.recompile()
    return swapped


def prepare(model, seq_len: int, device: torch.device | str) -> None:
    """Build the block masks ``model``'s flex layers will read, before anything is compiled."""
    for gm in model.layers:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is flex_attention_op:
                block_mask(seq_len, node.args[ATTENTION_ARGS.index("window")], device)
