"""Text generation with KV caches: eager, one token at a time, on the lowered model's own graphs.

    trained = runtime.trained.load_trained(RUN_OR_EXPORT, device)
    decoder = Decoder(trained.model)                       # slices the lowered graphs, empty caches
    ids = sample(decoder, prompt_ids, tokens=N, temperature=T, top_k=K, seed=S, vocab_size=V, stop=eod)

The decoder runs exactly the lowered model's math (MATH.md §1–§4), cut at the attention.
Each block graph is sliced three ways at the nodes the lowering tags with a role
(``compiler.tagged``: ``attention.q``, ``.k``, ``.v``, ``.slopes``, ``.out``, ``moe.expert_index``):

    project  (x [, grape_m_log_freq], pos) -> q, what the cache keeps, [ALiBi slopes]
             every ``grape_m_rotate`` is given ``pos_offset = pos``: a token at absolute position
             p is rotated once, on arrival, at p (GQA: q and k; TPA: the rows of B_Q and B_K)
    (attention over the cache, here: the one step of the lowering's chain that changes)
    finish   (x, attn_out_tokens) -> the block's outputs: W_o, residual, norm, MoE/FFN, residual

and the head graph is sliced to ``x -> logits`` (``head.logits``). So projections, norms, casts, router and experts
are the graphs' own nodes (with the model's parameters), not a second implementation.

Caches, per layer and sequence (B sequences decode in lock-step):
- GQA: the rotated keys k (B, Hkv, S, D) and values v (B, Hkv, S, D).
- TPA: the factors (MATH.md §4): A_K (B, R_K, S, n) with the 1/R_K folded in, pre-rotated B_K
  (B, R_K, S, D), A_V, B_V; K and V are contracted from them when read (``TPA_CONTRACTION``).
- Local layers: a ring buffer of S = W slots; token p goes to slot p % W, so the buffer always
  holds exactly the keys query p may see (p - W + 1 .. p; the window rule of MATH.md §1).
- Global layers: every token, in order (the buffer doubles when full); the GRAPE-A bias
  ``-m_h (p - j)`` is recomputed from the stored positions at each step, no key is rewritten.
Slots hold their token's absolute position (-1 when empty); empty slots are masked.

One step's attention, query p (B, Hq, 1, D), keys/values (B, Hkv, S, D), G = Hq / Hkv: query
head h reads KV head h // G (the G query heads stacked per KV head, as in the lowering); scores
(q k^T) * scale in fp32 (fp64 for fp64 models; the scale is the one of the layer's
``attention.scores`` node, 1/sqrt(D) as lowered), plus the bias, masked, softmax in fp32,
probabilities cast to the compute dtype, times v.

Not here: a compiled decoder (it would need static cache shapes to avoid recompiling per step)
and batched prefill (the prompt is fed one token at a time).
"""

from __future__ import annotations

import time
from typing import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx

from compiler import TPA_CONTRACTION, GrapeModel, tagged, window
from spec.errors import GrapefxError

__all__ = ["Decoder", "LayerCache", "sample", "subgraph", "head_logits", "Generation", "generate_text"]

ROTATE = torch.ops.grapefx.grape_m_rotate


# ----------------------------------------------------------------------------- graph slicing
def subgraph(gm: fx.GraphModule, cuts: dict[fx.Node, str], outputs: list[fx.Node]) -> fx.GraphModule:
    """The part of ``gm`` that computes ``outputs`` from the nodes in ``cuts``.

    Each cut node becomes a placeholder named by ``cuts``; placeholders of ``gm`` the outputs still
    need are kept under their own names. The new module shares ``gm``'s parameters (no copies).
    Call it with keyword arguments; it returns a tuple in the order of ``outputs``.
    """
    needed: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in needed or node in cuts:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    g = fx.Graph()
    env = {node: g.placeholder(name) for node, name in cuts.items()}
    for node in gm.graph.nodes:                        # topological order
        if node in needed:
            env[node] = g.placeholder(node.target) if node.op == "placeholder" else g.node_copy(node, env.__getitem__)
    g.output(tuple(env[o] for o in outputs))
    g.lint()
    return fx.GraphModule(gm, g, class_name=type(gm).__name__ + "Slice")


def _with_position(gm: fx.GraphModule) -> fx.GraphModule:
    """Every ``grape_m_rotate(x, theta)`` of ``gm`` becomes ``grape_m_rotate(x, theta, pos)``, pos a new input."""
    rotations = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (ROTATE, ROTATE.default)]
    if rotations:
        last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        with gm.graph.inserting_after(last):
            pos = gm.graph.placeholder("pos")
        for n in rotations:
            n.args = (n.args[0], n.args[1], pos)
            n.kwargs = {}
        gm.graph.lint()
        gm.recompile()
    return gm


# ----------------------------------------------------------------------------- caches
class LayerCache:
    """The cached tensors of one layer: each (B, heads or rank, S, width), plus positions (S,).

    ``window`` W: a ring buffer of W slots (local layers); None: all tokens in order (global).
    """

    def __init__(self, window: int | None):
        self.window = window
        self.tensors: list[Tensor] = []
        self.pos: Tensor | None = None                  # (S,) int64 absolute positions, -1 = empty

    def write(self, p: int, parts: list[Tensor]) -> None:
        """Store token p's tensors, each (B, H, 1, width)."""
        if not self.tensors:
            slots = self.window or 16
            self.tensors = [t.new_zeros(t.shape[0], t.shape[1], slots, t.shape[3]) for t in parts]
            self.pos = torch.full((slots,), -1, dtype=torch.int64, device=parts[0].device)
        if self.window is None and p >= self.pos.shape[0]:  # global: double the capacity
            self.tensors = [torch.cat([t, torch.zeros_like(t)], 2) for t in self.tensors]
            self.pos = torch.cat([self.pos, torch.full_like(self.pos, -1)])
        slot = p % self.window if self.window else p
        for buf, t in zip(self.tensors, parts):
            buf[:, :, slot] = t[:, :, 0]
        self.pos[slot] = p

    def read(self) -> tuple[list[Tensor], Tensor]:
        """The filled part: global layers hold tokens 0..p in slots 0..p; a local ring is read whole."""
        n = self.pos.shape[0] if self.window else int((self.pos >= 0).sum())
        return [t[:, :, :n] for t in self.tensors], self.pos[:n]

    def bytes_used(self) -> int:
        """Bytes of the slots that hold a token (what the cache needs, not what was allocated)."""
        if not self.tensors:
            return 0
        filled = int((self.pos >= 0).sum())
        return filled * sum(t.element_size() * t.shape[0] * t.shape[1] * t.shape[3] for t in self.tensors)


@dataclass
class _Layer:
    """How one block decodes: its three slices and the shape facts of its attention."""
    project: fx.GraphModule          # -> (q, *key parts, *value parts[, slopes])
    finish: fx.GraphModule           # -> the block's outputs [+ routed expert indices]
    mechanism: str                   # gqa | tpa
    n_key: int                       # how many of project's outputs after q are key parts
    n_value: int
    has_slopes: bool
    moe: bool
    takes_log_freq: bool
    rotates: bool                    # project takes ``pos`` (the token's absolute position)
    Hq: int
    D: int
    scale: float                     # the scores' scale, read from the graph
    window: int | None
    cache: LayerCache = field(init=False)

    def __post_init__(self):
        self.cache = LayerCache(self.window)


def _plan_layer(model: GrapeModel, index: int) -> _Layer:
    spec, gm = model.spec, model.layers[index]
    kind = spec.layer_kinds()[index]
    attn = spec.attention.of(kind)
    nodes = tagged(gm)
    q = nodes["attention.q"]                                                # (B, Hq, T, D), rotated
    if attn.mechanism == "tpa":
        k_parts = list(nodes["attention.k"].args[1:])                       # A_K (scaled), rotated B_K
        v_parts = list(nodes["attention.v"].args[1:])                       # A_V (scaled), B_V
    else:
        k_parts = [nodes["attention.k"]]                                    # k (B, Hkv, T, D), rotated
        v_parts = [nodes["attention.v"]]                                    # v (B, Hkv, T, D)
    slopes = [nodes["attention.slopes"]] if "attention.slopes" in nodes else []
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    x = inputs[0]
    project = _with_position(subgraph(gm, {}, [q, *k_parts, *v_parts, *slopes]))
    moe = spec.ffn_kind(index) == "moe"
    outputs = list(next(n for n in gm.graph.nodes if n.op == "output").args[0]) if moe else \
        [next(n for n in gm.graph.nodes if n.op == "output").args[0]]
    routes = [nodes["moe.expert_index"]] if moe else []
    finish = subgraph(gm, {x: "x", nodes["attention.out"]: "attn"}, [*outputs, *routes])
    scale = nodes["attention.scores"].args[1]                               # (q k^T) * scale
    return _Layer(project, finish, attn.mechanism, len(k_parts), len(v_parts), bool(slopes), moe,
                  model.takes_log_freq[index], "pos" in _placeholders(project), attn.heads, attn.head_dim,
                  float(scale), attn.window if kind == "local" else None)


def head_logits(model: GrapeModel) -> Callable[[Tensor], Tensor]:
    """``x (B, L, C) -> logits (B, L, V)``: the head graph cut at ``head.logits`` (no targets, no loss),
    given the tied embedding weight when the head takes it."""
    head = subgraph(model.head, {}, [tagged(model.head)["head.logits"]])
    takes_embed = "embed_weight" in _placeholders(head)

    def run(x: Tensor) -> Tensor:
        (logits,) = head(x, model.embed.weight) if takes_embed else head(x)
        return logits
    return run


# ----------------------------------------------------------------------------- the decoder
class Decoder:
    """Incremental decoding of a lowered model with per-layer KV caches (see the module docstring).

    ``step(tokens)`` feeds one token per sequence (B,) at the next position and returns the
    logits (B, V) fp32 (fp64 for an fp64 model) over the padded vocabulary. ``routes[i]`` holds the
    last step's chosen experts (B, K) of MoE layer i (None for dense layers).
    """

    def __init__(self, model: GrapeModel):
        self.model = model
        self.layers = [_plan_layer(model, i) for i in range(len(model.layers))]
        self.head = head_logits(model)
        self.position = 0
        self.routes: list[Tensor | None] = [None] * len(self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.cache = LayerCache(layer.window)
        self.position = 0

    def cache_bytes(self) -> int:
        """Bytes held by all layers' caches for the tokens fed so far."""
        return sum(layer.cache.bytes_used() for layer in self.layers)

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        p = self.position
        x = self.model.embed(tokens[:, None])                                       # (B, 1, C)
        for i, layer in enumerate(self.layers):
            extra = {"grape_m_log_freq": self.model.grape_m.log_freq} if layer.takes_log_freq else {}
            if layer.rotates:
                extra["pos"] = p
            q, *rest = layer.project(x=x, **extra)
            parts, slopes = rest[:layer.n_key + layer.n_value], (rest[-1] if layer.has_slopes else None)
            layer.cache.write(p, parts)
            o = _attend(layer, q, p, slopes)                                         # (B, 1, Hq*D)
            out = layer.finish(x=x, attn=o)
            x = out[0]
            self.routes[i] = out[-1] if layer.moe else None
        self.position += 1
        logits = self.head(x)                                                        # (B, 1, V)
        return logits[:, 0].to(torch.promote_types(logits.dtype, torch.float32))


def _placeholders(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def _attend(layer: _Layer, q: Tensor, p: int, slopes: Tensor | None) -> Tensor:
    """Query p (B, Hq, 1, D) over the layer's cache -> (B, 1, Hq*D), the lowering's chain for one row."""
    parts, pos = layer.cache.read()
    if layer.mechanism == "tpa":
        ak, bk, av, bv = parts
        k = torch.einsum(TPA_CONTRACTION, ak, bk)                                   # (B, n, S, D)
        v = torch.einsum(TPA_CONTRACTION, av, bv)
    else:
        k, v = parts                                                                 # (B, Hkv, S, D)
    B, Hkv, S, D = k.shape
    G = layer.Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(B, Hkv, G, D)                                                     # (B, Hkv, G, D) head h -> h // G
    s = torch.matmul(qg, k.transpose(-2, -1)).to(acc) * layer.scale                  # (B, Hkv, G, S)
    dist = (p - pos).to(acc)                                                         # (S,) i - j
    if slopes is not None:
        s = s + (-slopes.to(acc)[:, None] * dist).reshape(Hkv, G, S)                 # -m_h (i - j)
    blocked = (pos < 0) | window.blocked(dist, layer.window)                        # empty slots, the window rule
    probs = torch.softmax(s.masked_fill(blocked, float("-inf")), -1).to(v.dtype)
    o = torch.matmul(probs, v)                                                       # (B, Hkv, G, D)
    return o.reshape(B, 1, layer.Hq * D)                                             # heads in order h = kv * G + g


# ----------------------------------------------------------------------------- sampling
def sample(decoder: Decoder, prompt: list[int], *, tokens: int, temperature: float = 1.0, top_k: int | None = None,
           seed: int = 0, vocab_size: int | None = None, stop: int | None = None) -> list[int]:
    """Feed ``prompt`` (at least one id), then draw up to ``tokens`` ids; returns the new ids.

    ``temperature`` 0 is greedy; ``top_k`` keeps the k most likely ids; ids at or above
    ``vocab_size`` (the padding of the vocabulary) are never drawn; drawing ``stop`` ends early
    (it is not returned). One sequence; deterministic for a seed on one device.
    """
    if not prompt:
        raise GrapefxError("generate: the prompt has no tokens")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = None
    for t in prompt:
        logits = decoder.step(torch.tensor([t], device=decoder.model.embed.weight.device))
    out: list[int] = []
    for _ in range(tokens):
        row = logits[0, :vocab_size].double().cpu()                                  # (V,)
        if temperature <= 0:
            nxt = int(row.argmax())
        else:
            row = row / temperature
            if top_k is not None and top_k < row.shape[0]:
                row = row.masked_fill(row < torch.topk(row, top_k).values[-1], float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(row, -1), 1, generator=gen))
        if nxt == stop:
            break
        out.append(nxt)
        logits = decoder.step(torch.tensor([nxt], device=decoder.model.embed.weight.device))
    return out


@dataclass
class Generation:
    text: str                        # the decoded new tokens
    prompt_tokens: int               # including the leading end-of-document id
    new_tokens: int
    seconds: float
    cache_bytes: int                 # held by the caches after the last token
    stopped: bool                    # the model drew the end-of-document id


def generate_text(decoder: Decoder, tokenizer, prompt: str, *, tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, seed: int = 0) -> Generation:
    """Generate after ``prompt``: a document starts after the end-of-document id, as in training."""
    ids = [tokenizer.eod_id] + tokenizer.encode(prompt)
    decoder.reset()
    t0 = time.perf_counter()
    new = sample(decoder, ids, tokens=tokens, temperature=temperature, top_k=top_k, seed=seed,
                 vocab_size=tokenizer.vocab_size, stop=tokenizer.eod_id)
    return Generation(tokenizer.decode(new), len(ids), len(new), time.perf_counter() - t0, decoder.cache_bytes(),
                      len(new) < tokens)

