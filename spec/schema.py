"""The typed spec: one frozen dataclass per YAML section.

A YAML file is loaded (``spec.load``), merged (``extends:``), overridden (``--set a.b=c``),
converted into these dataclasses (unknown keys are errors with a did-you-mean), then
validated across fields (``spec.validate``). Every default of the model lives here and
nowhere else; ``grapefx describe`` shows the resolved value of each.

Field documentation is kept in ``metadata["doc"]`` (``f(default, doc)``) so error messages,
``describe`` and the docs can show it. Formulas are in MATH.md; section numbers are cited.

Conventions (MATH.md §1): layers are counted from 1 in everything a user reads; a window W
counts keys *including* the current token (query i sees keys i-W+1..i).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from spec.fields import doc_of, f
from spec.routers import ROUTERS, DeepSeekV3Router

__all__ = [
    "Init", "Model", "PositionKind", "POSITION_KINDS", "position_kind", "GrapeM", "GrapeA", "NoPE", "RoPE",
    "Attention", "AttentionKinds",
    "Router", "DeepSeekV3Router", "ROUTERS", "MoE", "FFN", "Precision", "Compile", "Source", "Tokenizer", "Data",
    "Optimizer",
    "Schedule", "Train", "Parallel", "Spec", "f", "doc_of", "LAYER_KINDS", "PASS_NAMES", "DEFAULT_PASSES",
]

LAYER_KINDS = ("local", "global")
PASS_NAMES = ("tpa_rotation_commute", "attention_formation", "bias_softmax", "rotary_attention", "concat_linear",
              "linear_cross_entropy")
# concat_linear is opt-in: on one H100 it ran baseline.yaml's step 1.0% faster (within the spread between runs)
# for 0.73 GiB more peak memory (bench/RESULTS.md, 2026-12-05)
DEFAULT_PASSES = tuple(name for name in PASS_NAMES if name != "concat_linear")


_frozen = dict(frozen=True, kw_only=True)


# ----------------------------------------------------------------------------- model
@dataclass(**_frozen)
class Init:
    std: float = f(0.02, "standard deviation of the normal initialisation of every weight matrix")
    scaled_output: bool = f(True, "scale output projections (attention wo, FFN w2) by 1/sqrt(2 * n_layers) (GPT-2)")


@dataclass(**_frozen)
class Model:
    vocab_size: int = f(257, "tokenizer vocabulary size (the byte tokenizer has 257 ids: 256 bytes + end-of-document); "
                             "the embedding is padded up to a multiple of pad_vocab_to", most=2**24)
    pad_vocab_to: int = f(64, "pad the embedding rows to a multiple of this (1 = no padding); 64 suits tensor cores",
                          most=2**16)
    d_model: int = f(256, "residual stream width C", most=2**16)
    n_layers: int = f(4, "number of transformer blocks L", most=4096)
    global_every: int | None = f(4, "layer l (counted from 1) is global iff l % global_every == 0 (MATH.md §1); "
                                    "null with layer_kinds set", most=4096)
    layer_kinds: tuple[str, ...] | None = f(None, "explicit per-layer kinds, e.g. [local, local, local, global]; "
                                                 "mutually exclusive with global_every (a file that gives layer_kinds "
                                                 "and no global_every gets global_every: null)")
    norm_eps: float = f(1e-6, "RMSNorm epsilon")
    tied_embeddings: bool = f(False, "share the token embedding with the LM head")
    qk_norm: bool = f(False, "RMSNorm on q and k per head before the rotation (MATH.md §2)")
    init: Init = f(factory=Init, doc="parameter initialisation")

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_to)
        return (self.vocab_size + m - 1) // m * m

    def kinds(self) -> tuple[str, ...]:
        """Resolved per-layer kinds, index 0 = layer 1."""
        if self.layer_kinds is not None:
            return tuple(self.layer_kinds)
        p = self.global_every
        return tuple("global" if p and (l % p == 0) else "local" for l in range(1, self.n_layers + 1))


# ----------------------------------------------------------------------------- positions
POSITION_KINDS: dict[str, type[PositionKind]] = {}


def position_kind(cls: type) -> type:
    """Register a position kind under its ``kind`` (a frozen dataclass subclassing ``PositionKind``)."""
    kind = cls.__dataclass_fields__["kind"].default
    if kind in POSITION_KINDS and POSITION_KINDS[kind] is not cls:
        raise ValueError(f"position kind {kind!r} is registered twice")
    POSITION_KINDS[kind] = cls
    return cls


class PositionKind:
    """A position encoding of one layer kind: what the rest of grapefx asks of it.

    Each kind is a frozen dataclass with a ``kind: Literal[...]`` field and its own keys, registered
    with ``@position_kind`` (the YAML ``position: {kind: ...}`` picks it). Everything that depends
    on the kind is here, so a new kind is one class (``docs/EXTENDING.md``):

    - ``rotates``: q and k are turned by ``grape_m_rotate`` with the frequencies ``theta`` returns
      (D/2 of them; rotation pairs coordinate i with i + D/2, so head_dim must be even).
    - ``adds_bias``: an additive score bias from per-head ``slopes`` (``-m_h (i - j)``, MATH.md §3).
    - ``theta(g)`` / ``slopes(g)``: build them in the lowering from the words of ``g``
      (``compiler.lower.position.PositionGraph``; this module stays free of torch).
    - ``problems()``: its own rules, as (key, message) pairs for ``spec.validate``.
    - ``layer_parameters`` / ``model_parameters``: learnable parameters it adds (``describe``);
      ``decays()``: whether its frequency vector gets weight decay.
    - ``megatron_flags(fail, at)``: its Megatron-LM flags; raises ``fail(key, what)`` for what no
      flag can say (the default: the kind itself), as the router classes do (``spec.routers``).
    """
    rotates: ClassVar[bool] = False
    adds_bias: ClassVar[bool] = False
    bias_name: ClassVar[str] = "an additive bias"     # how messages name the bias

    @property
    def model_wide(self) -> bool:
        """One frequency vector owned by the model and passed to every block (GRAPE-M ``share: model``)."""
        return False

    def theta(self, g: Any) -> Any:
        """The rotation frequencies (D/2,) fp32 as a graph node (kinds that rotate)."""
        raise NotImplementedError(f"position kind {self.kind} rotates but builds no theta")

    def slopes(self, g: Any) -> Any:
        """The per-head bias slopes (Hq,) fp32 as a graph node (kinds that add a bias)."""
        raise NotImplementedError(f"position kind {self.kind} adds a bias but builds no slopes")

    def problems(self) -> list[tuple[str, str]]:
        return []

    def layer_parameters(self, heads: int, head_dim: int) -> int:
        return 0

    def decays(self) -> bool:
        """Whether its frequency vector gets weight decay (``runtime.optim``)."""
        return False

    def model_parameters(self, head_dim: int) -> int:
        return 0

    def megatron_flags(self, fail: Callable[[str, str], Exception], at: str) -> list[str]:
        """Megatron-LM's flags for this kind; ``fail(key, what)`` is raised for what no flag can say
        (``at``: where the position is, e.g. ``attention.local.position``)."""
        raise fail(f"{at}.kind", f"position kind {self.kind}")


def _rotary_base(base: float, fail: Callable[[str, str], Exception], at: str) -> str:
    """Megatron's --rotary-base, an integer."""
    if float(base) != int(base):
        raise fail(f"{at}.base", f"a non-integer rotary base {base} (--rotary-base is an integer)")
    return str(int(base))


def _base_problem(base: float) -> list[tuple[str, str]]:
    return [] if base > 1 else [("base", f"{base} is not a usable base: theta_j = base^(-2j/D) needs base > 1 "
                                         "(the baseline uses 10000)")]


@position_kind
@dataclass(**_frozen)
class GrapeM(PositionKind):
    """GRAPE-M: learnable-frequency rotation, RoPE at init (MATH.md §2)."""
    kind: Literal["grape-m"] = "grape-m"
    base: float = f(10000.0, "RoPE base of the initial spectrum theta_j = base^(-2j/d)")
    learnable_freq: bool = f(True, "train p (theta_j = exp(p_j / log_freq_scale)); false keeps p as a buffer")
    log_freq_scale: float = f(16.0, "c in theta = exp(p / c); larger = smaller Adam steps on ln(theta)")
    share: Literal["model", "layer"] = f("model", "one frequency vector for the model (the vpMoE Megatron fork) or one "
                                                  "per layer (the paper's code)")
    weight_decay: bool = f(False, "apply weight decay to p (off: decay would drag ln(theta) toward 0)")
    rotates: ClassVar[bool] = True

    @property
    def model_wide(self) -> bool:
        return self.share == "model"

    def theta(self, g: Any) -> Any:
        return g.grape_m(self)

    def problems(self) -> list[tuple[str, str]]:
        out = _base_problem(self.base)
        if not self.log_freq_scale > 0:
            out.append(("log_freq_scale", f"{self.log_freq_scale}: theta = exp(p / c) needs c > 0 (default 16)"))
        return out

    def layer_parameters(self, heads: int, head_dim: int) -> int:
        return head_dim // 2 if self.learnable_freq and self.share == "layer" else 0

    def decays(self) -> bool:
        return self.weight_decay

    def model_parameters(self, head_dim: int) -> int:
        return head_dim // 2 if self.learnable_freq and self.share == "model" else 0

    def megatron_flags(self, fail: Callable[[str, str], Exception], at: str) -> list[str]:
        from spec.megatron.flags import fmt_number

        base = _rotary_base(self.base, fail, at)
        if self.share != "model":
            raise fail(f"{at}.share", "GRAPE-M frequencies per layer (the vpMoE fork keeps one vector for the model)")
        if self.weight_decay:
            raise fail(f"{at}.weight_decay", "weight decay on GRAPE-M frequencies")
        return ["--position-embedding-type", "grapem", "--no-rope-fusion", "--rotary-base", base,
                "--grapem-learnable-freq" if self.learnable_freq else "--no-grapem-learnable-freq",
                "--grapem-log-freq-scale", fmt_number(self.log_freq_scale)]


@position_kind
@dataclass(**_frozen)
class GrapeA(PositionKind):
    """GRAPE-A: ALiBi slopes, bias -m_h (i - j) after the 1/sqrt(d) scaling (MATH.md §3)."""
    kind: Literal["grape-a"] = "grape-a"
    learnable: bool = f(False, "learn m_h = softplus(r_h) * alibi_h (initialised at the ALiBi slopes); fixed by default")
    adds_bias: ClassVar[bool] = True
    bias_name: ClassVar[str] = "the ALiBi bias"

    def slopes(self, g: Any) -> Any:
        return g.alibi(learnable=self.learnable)

    def layer_parameters(self, heads: int, head_dim: int) -> int:
        return heads if self.learnable else 0

    def megatron_flags(self, fail: Callable[[str, str], Exception], at: str) -> list[str]:
        if self.learnable:
            raise fail(f"{at}.learnable", "learnable ALiBi slopes")
        return ["--grape-a"]


@position_kind
@dataclass(**_frozen)
class NoPE(PositionKind):
    """No position signal at all (the follow-up ablation on global layers)."""
    kind: Literal["nope"] = "nope"

    def megatron_flags(self, fail: Callable[[str, str], Exception], at: str) -> list[str]:
        return []


@position_kind
@dataclass(**_frozen)
class RoPE(PositionKind):
    """Plain RoPE: GRAPE-M's rotation with fixed frequencies base^(-2j/d)."""
    kind: Literal["rope"] = "rope"
    base: float = f(10000.0, "RoPE base")
    rotates: ClassVar[bool] = True

    def theta(self, g: Any) -> Any:
        return g.rope(self.base)

    def problems(self) -> list[tuple[str, str]]:
        return _base_problem(self.base)

    def megatron_flags(self, fail: Callable[[str, str], Exception], at: str) -> list[str]:
        return ["--position-embedding-type", "rope", "--rotary-base", _rotary_base(self.base, fail, at)]


# ----------------------------------------------------------------------------- attention
@dataclass(**_frozen)
class Attention:
    mechanism: Literal["gqa", "tpa"] = f("gqa", "gqa (grouped-query) or tpa (Tensor Product Attention, MATH.md §4)")
    heads: int = f(4, "query heads Hq", most=1024)
    kv_heads: int = f(2, "key/value heads Hkv (GQA groups); heads must be divisible by kv_heads", most=1024)
    head_dim: int = f(64, "per-head width D (even: rotation pairs i with i + D/2)", most=1024)
    window: int | None = f(None, "local layers only: W keys including the current token (query i sees i-W+1..i)",
                           most=2**20)
    position: PositionKind = f(factory=NoPE, doc="position mechanism: grape-m | grape-a | nope | rope "
                                                 "(spec.schema.POSITION_KINDS)")
    r_q: int | None = f(None, "TPA query rank R_Q (default 6 with head_factors: heads, 4 with kv_groups)", most=1024)
    r_k: int | None = f(None, "TPA key rank R_K (default 2)", most=1024)
    r_v: int | None = f(None, "TPA value rank R_V (default 2)", most=1024)
    head_factors: Literal["heads", "kv_groups"] | None = f(None, "TPA: A_K, A_V span all query heads (paper) or the KV "
                                                                "groups (the vpMoE Megatron fork); default heads")

    def tpa_ranks(self) -> tuple[str, int, int, int]:
        """Resolved TPA settings ``(head_factors, R_Q, R_K, R_V)`` (MATH.md §4).

        Defaults: head_factors ``heads`` (the paper); R_Q = 6 with ``heads`` (paper), 4 with
        ``kv_groups`` (the vpMoE Megatron fork); R_K = R_V = 2 in both.
        """
        hf = self.head_factors or "heads"
        r_q = self.r_q if self.r_q is not None else (6 if hf == "heads" else 4)
        return hf, r_q, self.r_k if self.r_k is not None else 2, self.r_v if self.r_v is not None else 2

    def rotates(self) -> bool:
        """True when q and k are rotated (GRAPE-M, RoPE: the position kind says)."""
        return self.position.rotates


def _default_local() -> Attention:
    return Attention(window=128, position=GrapeM())


def _default_global() -> Attention:
    return Attention(position=GrapeA())


@dataclass(**_frozen)
class AttentionKinds:
    local: Attention = f(factory=_default_local, doc="attention of local (sliding-window) layers")
    global_: Attention = f(factory=_default_global, doc="attention of global (full causal) layers; YAML key `global`")
    allow_position_mismatch: bool = f(False, "lift the position rule (global layers never rotate; GRAPE-A only on "
                                             "global layers)")

    def of(self, kind: str) -> Attention:
        return self.local if kind == "local" else self.global_


# ----------------------------------------------------------------------------- FFN / MoE
Router = DeepSeekV3Router     # the default router kind (spec.routers holds one class per kind)


@dataclass(**_frozen)
class MoE:
    experts: int = f(8, "routed experts E", most=2**16)
    top_k: int = f(2, "experts per token K", most=2**16)
    shared_experts: int = f(1, "always-on shared experts, weight 1", most=1024)
    expert_hidden: int = f(256, "hidden width of each expert's SwiGLU", most=2**20)
    first_k_dense: int = f(0, "the first k layers use the dense FFN (ffn.hidden) instead of MoE", most=4096)
    router: Router = f(factory=Router, doc=f"router settings; kind: {' | '.join(ROUTERS)}")


@dataclass(**_frozen)
class FFN:
    hidden: int = f(1024, "hidden width of the dense SwiGLU FFN (dense layers, and every layer when moe is null)",
                    most=2**20)


# ----------------------------------------------------------------------------- compile / precision
@dataclass(**_frozen)
class Precision:
    compute: Literal["bf16", "fp32"] = f("bf16", "matmul/activation dtype on CUDA (MATH.md §6)")
    cpu_compute: Literal["fp32", "bf16"] = f("fp32", "compute dtype on CPU")
    router: Literal["fp32"] = f("fp32", "router logits/scores/bias dtype")
    master: Literal["fp32"] = f("fp32", "master weights and optimizer state")


@dataclass(**_frozen)
class Compile:
    enabled: bool = f(True, "torch.compile (Inductor, fullgraph) each distinct block graph once")
    passes: tuple[str, ...] = f(DEFAULT_PASSES, "fusion passes, in this order: " + ", ".join(PASS_NAMES)
                                + " (all but concat_linear by default: it saves little time and holds more memory)")
    inductor_options: dict[str, Any] = f(factory=dict, doc="extra torch._inductor.config options passed to torch.compile")
    activation_checkpointing: bool = f(False, "recompute each block's activations in backward")


# ----------------------------------------------------------------------------- data
@dataclass(**_frozen)
class Source:
    path: str = f("builtin:shakespeare", "builtin:shakespeare, a text file, a folder of .txt, a .jsonl (text field) "
                                         "or a Megatron indexed-dataset prefix (PREFIX.bin + PREFIX.idx)")
    weight: float = f(1.0, "blend weight (as Megatron's --data-path w1 p1 w2 p2)")
    split: Literal["auto", "documents", "tail", "paragraphs", "separator", "chunks"] = f(
        "auto", "how the validation split is taken from this source: documents (hold out whole documents), tail "
                "(hold out the last valid_fraction of its text or tokens, in order), or cut a text source into "
                "documents first: paragraphs (at blank lines), separator (at each `separator`), chunks (every "
                "`chunk_chars` characters); auto = tail for a source of one document (a single text file), "
                "documents otherwise")
    separator: str | None = f(None, "the text between documents, for split: separator (e.g. \"<|endoftext|>\")")
    chunk_chars: int | None = f(None, "characters per document, for split: chunks (e.g. 4096)", most=2**40)


@dataclass(**_frozen)
class Tokenizer:
    kind: Literal["byte", "bpe", "pretokenized"] = f(
        "byte", "byte-level (256 ids + end-of-document), a BPE (trained locally, or any tokenizer.json given as "
                "path), or pretokenized: the sources are Megatron .bin/.idx token ids and the vocabulary is "
                "model.vocab_size")
    vocab_size: int | None = f(None, "BPE vocabulary size to train (bpe only)", most=2**24)
    path: str | None = f(None, "an existing tokenizer.json to use instead of training one, e.g. a Hugging Face "
                               "model's (bpe only)")
    eod_id: int | None = f(None, "pretokenized only: the end-of-document id of the tokenizer that made the data "
                                 "(appended to documents that lack it; generation starts after it and stops at "
                                 "it); null = documents are used as stored", most=2**24)


@dataclass(**_frozen)
class Data:
    sources: tuple[Source, ...] = f((Source(),), "corpus sources with blend weights")
    tokenizer: Tokenizer = f(factory=Tokenizer, doc="tokenizer")
    seq_len: int = f(512, "training context T (tokens per row)", most=2**20)
    valid_fraction: float = f(0.01, "held-out fraction of documents for validation")
    cache_dir: str | None = f(None, "where prepared data lives (default: the user cache folder, ~/.cache/grapefx)")


# ----------------------------------------------------------------------------- training
@dataclass(**_frozen)
class Optimizer:
    lr: float = f(3e-4, "peak learning rate")
    betas: tuple[float, float] = f((0.9, 0.95), "AdamW betas")
    eps: float = f(1e-8, "AdamW epsilon")
    weight_decay: float = f(0.1, "decoupled weight decay on matrices")
    decay_embeddings: bool = f(False, "apply weight decay to the embedding (norms, biases and GRAPE-M p never decay unless told)")


@dataclass(**_frozen)
class Schedule:
    warmup_steps: int = f(100, "linear warmup steps")
    kind: Literal["cosine", "constant"] = f("cosine", "decay after warmup")
    min_lr_ratio: float = f(0.1, "final lr as a fraction of the peak (cosine)")


@dataclass(**_frozen)
class Train:
    steps: int = f(1000, "optimizer steps")
    micro_batch: int = f(8, "sequences per forward/backward", most=2**20)
    global_batch: int = f(8, "sequences per optimizer step (micro-batches are accumulated)", most=2**24)
    seed: int = f(1234, "run seed: initialisation (per parameter name), data order, dropout-free sampling")
    optimizer: Optimizer = f(factory=Optimizer, doc="AdamW settings")
    schedule: Schedule = f(factory=Schedule, doc="learning-rate schedule")
    grad_clip: float | None = f(1.0, "clip the global gradient norm to this (null = off)")
    log_every: int = f(10, "metrics line every N steps")
    eval_every: int = f(100, "validation loss every N steps")
    eval_batches: int = f(8, "micro-batches per validation", most=2**20)
    checkpoint_every: int = f(500, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = f(3, "keep the newest K checkpoints")


@dataclass(**_frozen)
class Parallel:
    data: Literal["ddp", "fsdp"] = f("ddp", "data parallelism when launched with torchrun: DDP or FSDP2 per block")
    expert: int = f(1, "expert parallelism E: the routed experts are split over groups of E ranks (rank e of a group "
                       "holds experts [e*X/E, (e+1)*X/E)) and tokens move to them; E divides moe.experts and the "
                       "number of ranks (1 = every rank holds every expert)")
    capacity_factor: float | None = f(None, "tokens an expert takes per micro-batch and rank, as a factor of the even "
                                            "share N*K/X; assignments beyond it are dropped and counted "
                                            "(null = dropless)")


# ----------------------------------------------------------------------------- the whole spec
@dataclass(**_frozen)
class Spec:
    name: str = f("grapefx", "run name (used for the default output folder)")
    model: Model = f(factory=Model, doc="model shape")
    attention: AttentionKinds = f(factory=AttentionKinds, doc="attention per layer kind")
    ffn: FFN = f(factory=FFN, doc="dense FFN")
    moe: MoE | None = f(factory=MoE, doc="mixture of experts (null = dense FFN everywhere)")
    precision: Precision = f(factory=Precision, doc="dtypes")
    compile: Compile = f(factory=Compile, doc="fusion passes and Inductor")
    data: Data = f(factory=Data, doc="corpus, tokenizer, context")
    train: Train = f(factory=Train, doc="optimisation and run cadence")
    parallel: Parallel = f(factory=Parallel, doc="multi-GPU")
    output: str | None = f(None, "run folder (default runs/<name>)")

    def layer_kinds(self) -> tuple[str, ...]:
        return self.model.kinds()

    def ffn_kind(self, index: int) -> str:
        """'moe' or 'dense' for 0-based layer `index`."""
        if self.moe is None or index < self.moe.first_k_dense:
            return "dense"
        return "moe"
