"""spec -> GrapeModel: one fx.GraphModule per layer, plus graphs for the embedding and the head.

    tokens ─► embed ─► layers[0] ─► … ─► layers[L-1] ─► head(norm → LM head → cross-entropy) ─► loss

Each block is ``x ─► norm ─► attention (local | global) ─► + ─► norm ─► MoE | dense FFN ─► +``.
Blocks of one *graph kind* (attention kind × FFN kind, e.g. ``local/moe``) are structurally
identical, so later stages compile each kind once, shard per block (FSDP2) and checkpoint per
block. Calling conventions:

    embed(tokens)                         -> x            (B, T, C)
    layers[i](x [, grape_m_log_freq])     -> x            dense FFN blocks
                                          -> (x, counts (E,) fp32, aux_loss () fp32)   MoE blocks
                                             [+ dropped () fp32 with parallel.capacity_factor]
    head(x, targets [, embed_weight])     -> ce_loss      mean over targets != -100

The model-wide GRAPE-M vector (``share: model``) lives at ``grape_m.log_freq`` and is passed
to every local block that rotates; the tied embedding is passed to the head.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from compiler.lower.attention import lower_attention
from compiler.lower.builder import GraphBuilder, tag
from compiler.lower.common import rmsnorm, weight
from compiler.lower.ffn import ExpertGroup, lower_dense_ffn, lower_moe
from compiler.lower.init import Initializer
from compiler.ops.grape_m import grape_m_init_log_freq
from spec.errors import GrapefxError
from spec.schema import GrapeM, Spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ModelOutput(NamedTuple):
    loss: torch.Tensor              # ce_loss + aux_loss, the training objective
    ce_loss: torch.Tensor           # mean next-token cross-entropy
    aux_loss: torch.Tensor          # router auxiliary terms summed over MoE layers (0 when off)
    counts: torch.Tensor | None     # (n_moe_layers, E) fp32 tokens per expert, or None (dense)
    dropped: torch.Tensor | None = None   # () fp32 assignments over capacity (parallel.capacity_factor), or None


def graph_kind(spec: Spec, index: int) -> str:
    """``local/moe``, ``global/dense``, …: layers of one graph kind share one graph structure."""
    return f"{spec.layer_kinds()[index]}/{spec.ffn_kind(index)}"


def _shared_grape_m(spec: Spec) -> GrapeM | None:
    """The GRAPE-M settings whose vector is owned by the model (``share: model``), if any."""
    found = {kind: spec.attention.of(kind) for kind in set(spec.layer_kinds())
             if spec.attention.of(kind).position.model_wide}
    if len({a.head_dim for a in found.values()}) > 1 or len({a.position for a in found.values()}) > 1:
        raise GrapefxError("attention.local.position / attention.global.position: a model-wide GRAPE-M vector "
                           "(share: model) needs the same head_dim and GRAPE-M settings on both kinds; "
                           "use share: layer on one of them")
    return next(iter(found.values())).position if found else None


def build_block(spec: Spec, index: int, cd: torch.dtype, init: Initializer,
                group: ExpertGroup | None = None) -> fx.GraphModule:
    """The graph of layer ``index`` (0-based); node names carry the 1-based layer number."""
    kind = spec.layer_kinds()[index]
    attn = spec.attention.of(kind)
    C, eps, name = spec.model.d_model, spec.model.norm_eps, f"layers.{index}"
    b = GraphBuilder(prefix=f"layer{index + 1}_")
    x = b.input("x")                                                                      # (B, T, C)
    pos = attn.position
    log_freq = b.input("grape_m_log_freq") if pos.model_wide else None

    h = rmsnorm(b, "attn_norm", x, b.param("attn_norm.weight", Initializer.ones((C,))), C, eps, cd)
    a = lower_attention(b, h, attn, C=C, eps=eps, qk_norm=spec.model.qk_norm, log_freq=log_freq,
                        name=name, init=init, cd=cd)
    x = b("attn_residual", torch.add, x, a)
    h = rmsnorm(b, "ffn_norm", x, b.param("ffn_norm.weight", Initializer.ones((C,))), C, eps, cd)
    if spec.ffn_kind(index) == "moe":
        y, counts, aux, dropped = lower_moe(b, h, spec.moe, C=C, name=name, init=init, cd=cd,
                                            parallel=spec.parallel, group=group)
        out = b("ffn_residual", torch.add, x, y)
        return b.build((out, counts, aux) + ((dropped,) if dropped is not None else ()), class_name=f"Layer{index + 1}")
    y = lower_dense_ffn(b, h, C=C, hidden=spec.ffn.hidden, name=name, init=init, cd=cd)
    return b.build((b("ffn_residual", torch.add, x, y),), class_name=f"Layer{index + 1}")


def build_embed(spec: Spec, cd: torch.dtype, init: Initializer) -> fx.GraphModule:
    b = GraphBuilder(prefix="embed_")
    tokens = b.input("tokens")                                                            # (B, T) int64
    w = b.param("weight", init.normal("embed.weight", (spec.model.padded_vocab_size, spec.model.d_model)))
    x = b("tokens", F.embedding, tokens, w)                                               # (B, T, C) fp32
    return b.build((x if cd == torch.float32 else b.method("out", "to", x, cd),), class_name="Embed")


def build_head(spec: Spec, cd: torch.dtype, init: Initializer) -> fx.GraphModule:
    """final RMSNorm -> LM head -> cross-entropy in fp32 over the padded vocabulary."""
    C, V = spec.model.d_model, spec.model.padded_vocab_size
    b = GraphBuilder(prefix="head_")
    x = b.input("x")                                                                      # (B, T, C)
    targets = b.input("targets")                                                          # (B, T) int64
    if spec.model.tied_embeddings:
        w = b.input("embed_weight")
        w = w if cd == torch.float32 else b.method("embed_weight_c", "to", w, cd)
    else:
        w = weight(b, "lm_head.weight", init.normal("head.lm_head.weight", (V, C)), cd)
    h = rmsnorm(b, "norm", x, b.param("norm.weight", Initializer.ones((C,))), C, spec.model.norm_eps, cd)
    logits = tag(b("logits", F.linear, h, w), "head.logits")                              # (B, T, V)
    logits = logits if cd == torch.float32 else b.method("logits_fp32", "float", logits)
    flat = b.method("logits_flat", "reshape", logits, -1, V)                              # (N, V)
    loss = b("ce_loss", F.cross_entropy, flat, b.method("targets_flat", "reshape", targets, -1), ignore_index=-100)
    return b.build((loss,), class_name="Head")


class GrapeModel(nn.Module):
    """The lowered model: runs the embedding, each layer's graph in order, then the head."""

    def __init__(self, spec: Spec, cd: torch.dtype, experts: ExpertGroup | None = None):
        super().__init__()
        self.spec = spec
        self.compute_dtype = cd
        init = Initializer(spec)
        shared = _shared_grape_m(spec)
        if shared is not None:
            self.grape_m = nn.Module()
            D = next(spec.attention.of(k).head_dim for k in ("local", "global")
                     if spec.attention.of(k).position == shared)
            p0 = grape_m_init_log_freq(D, shared.base, shared.log_freq_scale)        # (D/2,) fp32
            if shared.learnable_freq:
                self.grape_m.log_freq = nn.Parameter(p0)
            else:
                self.grape_m.register_buffer("log_freq", p0)
        self.embed = build_embed(spec, cd, init)
        self.layers = nn.ModuleList(build_block(spec, i, cd, init, experts) for i in range(spec.model.n_layers))
        self.head = build_head(spec, cd, init)
        self.graph_kinds = [graph_kind(spec, i) for i in range(spec.model.n_layers)]
        self.moe_layers = [i for i in range(spec.model.n_layers) if spec.ffn_kind(i) == "moe"]
        self.takes_log_freq = ["grape_m_log_freq" in _inputs(layer) for layer in self.layers]
        # how each layer and the head run: the graphs themselves (eager), or compiled / checkpointed
        # runners the pipeline installs (compiler.pipeline); state stays in the modules above
        self.runners: list[Callable] = list(self.layers)
        self.head_runner: Callable | None = None          # None: the head graph itself
        self.compute_weights = None      # compiler.compute_weights, when the pipeline installs it

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> ModelOutput:
        if self.compute_weights is not None:          # re-cast the weights changed since the last forward
            self.compute_weights.refresh()
        x = self.embed(tokens)                                                            # (B, T, C)
        counts, aux, dropped = [], [], []
        for i, run in enumerate(self.runners):
            args = (x, self.grape_m.log_freq) if self.takes_log_freq[i] else (x,)
            if i in self.moe_layers:
                x, c, a, *d = run(*args)                  # d: [dropped] with a capacity factor
                counts.append(c)
                aux.append(a)
                dropped += d
            else:
                x = run(*args)
        head = self.head_runner or self.head
        ce = head(x, targets, self.embed.weight) if self.spec.model.tied_embeddings else head(x, targets)
        aux_loss = torch.stack(aux).sum() if aux else ce.new_zeros(())
        return ModelOutput(ce + aux_loss, ce, aux_loss, torch.stack(counts) if counts else None,
                           torch.stack(dropped).sum() if dropped else None)


def _inputs(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def lower(spec: Spec, *, dtype: torch.dtype | str = torch.float32, experts: ExpertGroup | None = None) -> GrapeModel:
    """Build the reference model of ``spec`` with compute dtype ``dtype`` (fp32 master weights).

    ``experts``: this process's expert group, to split the experts as ``parallel.expert`` says
    (``compiler.lower.ffn``); None (generation, export, one process): every expert here."""
    cd = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if cd not in DTYPES.values():
        raise GrapefxError(f"compute dtype {cd} is not supported; use fp32 or bf16")
    return GrapeModel(spec, cd, experts)
