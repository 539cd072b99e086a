"""Megatron-LM command-line flags: which ones grapefx reads, their defaults, and which it ignores.

Defaults are Megatron-LM's own (``megatron/training/arguments.py``, checked against NVIDIA/Megatron-LM
main; GRAPE flags from the vpMoE fork, MATH.md §1). A recipe that omits a flag means Megatron's
default, so the importer applies these, lists them in the YAML it writes, and ``describe`` shows
the result.

Three kinds of flags besides the ones we map:

- ``EXECUTION_ONLY``: parallelism, fused kernels, logging, checkpoint paths: they change how
  Megatron runs, not what it computes. Listed on stderr as ignored; never an error.
- ``NOT_MODELLED``: flags that change the model or its training in ways grapefx cannot express.
  Listed as a warning; an error under ``--strict``.
- Unknown flags: treated like ``NOT_MODELLED`` (we cannot tell that they are harmless).
"""

from __future__ import annotations

from spec.errors import SpecError
from spec.megatron.patterns import RECIPE

__all__ = ["fmt_number", "MEGATRON_DEFAULTS", "VALUE_FLAGS", "SWITCHES", "MULTI_FLAGS", "EXECUTION_ONLY",
           "NOT_MODELLED", "is_execution_only", "split_flags", "ParsedFlags"]

# Megatron's defaults for the flags we map (None = no default: Megatron derives it or requires it).
MEGATRON_DEFAULTS: dict[str, object] = {
    "--num-query-groups": 1,
    "--kv-channels": None,                      # hidden_size // num_attention_heads
    "--ffn-hidden-size": None,                  # 4h, or int(4h * 2/3 / 64) * 64 with --swiglu
    "--normalization": "LayerNorm",
    "--norm-epsilon": 1e-5,
    "--attention-dropout": 0.1,
    "--hidden-dropout": 0.1,
    "--init-method-std": 0.02,
    "--make-vocab-size-divisible-by": 128,
    "--position-embedding-type": "learned_absolute",
    "--rotary-base": 10000,
    "--window-size": None,                      # no sliding window anywhere
    "--window-attn-skip-freq": None,            # every window layer is a window layer
    "--no-rope-freq": None,                     # rotary on every layer
    "--grapem-log-freq-scale": 16.0,            # vpMoE fork
    "--moe-router-topk": 2,
    "--moe-router-score-function": "softmax",
    "--moe-router-load-balancing-type": "aux_loss",
    "--moe-aux-loss-coeff": 0.0,
    "--moe-z-loss-coeff": None,
    "--moe-router-bias-update-rate": 1e-3,
    "--moe-router-topk-scaling-factor": None,   # no scaling
    "--moe-router-num-groups": None,
    "--moe-router-group-topk": None,
    "--moe-router-dtype": None,                 # the model's dtype
    "--moe-layer-freq": 1,                      # every layer MoE
    "--moe-ffn-hidden-size": None,              # --ffn-hidden-size
    "--moe-shared-expert-intermediate-size": None,  # no shared expert
    "--lr-decay-style": "linear",
    "--lr-warmup-iters": 0,
    "--min-lr": 0.0,
    "--weight-decay": 0.01,
    "--adam-beta1": 0.9,
    "--adam-beta2": 0.999,
    "--adam-eps": 1e-8,
    "--clip-grad": 1.0,
    "--seed": 1234,
    "--log-interval": 100,
    "--eval-interval": 1000,
    "--eval-iters": 100,
    "--optimizer": "adam",
}

# Flags that take exactly one value.
VALUE_FLAGS = frozenset({
    "--num-layers", "--hidden-size", "--num-attention-heads", "--num-query-groups", "--kv-channels",
    "--ffn-hidden-size", "--normalization", "--norm-epsilon", "--attention-dropout", "--hidden-dropout",
    "--init-method-std", "--vocab-size", "--make-vocab-size-divisible-by", "--seq-length",
    "--position-embedding-type", "--rotary-base", "--rotary-percent", "--window-size", "--window-attn-skip-freq",
    "--no-rope-freq", "--grapem-log-freq-scale", "--tpa-rank", "--tpa-q-rank", "--num-experts",
    "--moe-router-topk", "--moe-router-score-function", "--moe-z-loss-coeff", "--moe-router-bias-update-rate",
    "--moe-router-topk-scaling-factor", "--moe-router-num-groups", "--moe-router-group-topk", "--moe-router-dtype",
    "--moe-layer-freq", "--moe-ffn-hidden-size", "--moe-shared-expert-intermediate-size", "--micro-batch-size",
    "--global-batch-size", "--train-iters", "--lr", "--min-lr", "--lr-decay-style", "--lr-warmup-iters",
    "--lr-warmup-fraction", "--lr-decay-iters", "--weight-decay", "--adam-beta1", "--adam-beta2", "--adam-eps",
    "--clip-grad", "--seed", "--log-interval", "--eval-interval", "--eval-iters", "--save-interval", "--optimizer",
})
# Flags that take one or more values (Megatron nargs='+').
MULTI_FLAGS = frozenset({"--moe-router-load-balancing-type", "--moe-aux-loss-coeff", "--data-path"})
# Switches (store_true / store_false).
SWITCHES = frozenset({
    "--group-query-attention", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--qk-layernorm", "--bf16", "--use-rotary-position-embeddings", "--grapem-learnable-freq",
    "--no-grapem-learnable-freq", "--grapem-share-across-heads", "--grapem-per-head", "--grape-a", "--use-tpa",
    "--moe-router-pre-softmax", "--moe-router-enable-expert-bias",
})

# Known flags that change the model or its training in ways grapefx cannot express: arity, reason.
NOT_MODELLED: dict[str, tuple[int | str, str]] = {
    "--fp16": (0, "fp16 with loss scaling; grapefx trains in bf16 or fp32"),
    "--add-qkv-bias": (0, "grapefx's linear layers have no biases"),
    "--apply-layernorm-1p": (0, "zero-centred norm weights are not modelled"),
    "--squared-relu": (0, "grapefx's FFNs are SwiGLU"),
    "--openai-gelu": (0, "grapefx's FFNs are SwiGLU"),
    "--quick-geglu": (0, "grapefx's FFNs are SwiGLU"),
    "--rotary-interleaved": (0, "grapefx rotates half-split pairs (i, i + D/2), not interleaved ones"),
    "--use-rope-scaling": (0, "Llama-3 RoPE scaling is not modelled"),
    "--rope-scaling-factor": (1, "Llama-3 RoPE scaling is not modelled"),
    "--rotary-seq-len-interpolation-factor": (1, "RoPE interpolation is not modelled"),
    "--multi-latent-attention": (0, "MLA is not modelled"),
    "--mtp-num-layers": (1, "multi-token prediction is not modelled"),
    "--qk-l2-norm": (0, "only RMS qk-norm (--qk-layernorm) is modelled"),
    "--softmax-type": (1, "only the vanilla softmax is modelled"),
    "--embedding-init-method-std": (1, "a separate embedding init std is not modelled"),
    "--init-method-xavier-uniform": (0, "grapefx initialises with a normal of init.std"),
    "--moe-expert-capacity-factor": (1, "grapefx's MoE is dropless (no capacity, no dropped tokens)"),
    "--moe-pad-expert-input-to-capacity": (0, "grapefx's MoE is dropless"),
    "--moe-token-drop-policy": (1, "grapefx's MoE is dropless"),
    "--moe-input-jitter-eps": (1, "router input jitter is not modelled"),
    "--moe-router-force-load-balancing": (0, "benchmark-only random routing is not modelled"),
    "--moe-apply-probs-on-input": (0, "gates multiply expert outputs in grapefx, not inputs"),
    "--moe-shared-expert-gate": (0, "shared experts have weight 1 in grapefx (no gate)"),
    "--tokenizer-type": (1, "set data.tokenizer in the spec (byte or a locally trained BPE)"),
    "--tokenizer-model": (1, "set data.tokenizer.path in the spec"),
    "--vocab-file": (1, "set data.tokenizer in the spec"),
    "--merge-file": (1, "set data.tokenizer in the spec"),
    "--train-samples": (1, "give --train-iters (grapefx counts optimizer steps)"),
    "--lr-decay-samples": (1, "the schedule is in steps in grapefx"),
    "--lr-warmup-samples": (1, "the schedule is in steps in grapefx"),
    "--lr-warmup-init": (1, "warmup starts from 0 in grapefx"),
    "--start-weight-decay": (1, "weight decay is constant in grapefx"),
    "--end-weight-decay": (1, "weight decay is constant in grapefx"),
    "--weight-decay-incr-style": (1, "weight decay is constant in grapefx"),
    "--decoupled-lr": (1, "one learning rate for all parameters in grapefx"),
    "--decoupled-min-lr": (1, "one learning rate for all parameters in grapefx"),
    "--eod-mask-loss": (0, "loss masking of end-of-document tokens is not modelled"),
    "--reset-position-ids": (0, "positions run over the whole packed row in grapefx"),
    "--reset-attention-mask": (0, "attention crosses document boundaries in a packed row in grapefx"),
}

# Flags that change how Megatron runs, not what it computes.
EXECUTION_ONLY = frozenset({
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size",
    "--expert-model-parallel-size", "--expert-tensor-parallel-size", "--virtual-pipeline-model-parallel-size",
    "--num-layers-per-virtual-pipeline-stage", "--sequence-parallel", "--use-distributed-optimizer",
    "--moe-grouped-gemm", "--moe-token-dispatcher-type", "--moe-permute-fusion", "--moe-router-fusion",
    "--moe-shared-expert-overlap", "--moe-use-legacy-grouped-gemm", "--moe-per-layer-logging",
    "--moe-enable-deepep", "--moe-flex-dispatcher-backend", "--use-flash-attn", "--no-rope-fusion",
    "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion",
    "--no-gradient-accumulation-fusion", "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl",
    "--attention-backend", "--transformer-impl", "--use-mcore-models", "--use-legacy-models", "--spec",
    "--max-position-embeddings", "--save", "--load", "--split", "--num-workers", "--dataloader-type",
    "--data-cache-path", "--mock-data", "--no-mmap-bin-files", "--use-checkpoint-args", "--finetune",
    "--use-cpu-initialization", "--empty-unused-memory-level", "--deterministic-mode", "--calculate-per-token-loss",
    "--no-persist-layer-norm", "--accumulate-allreduce-grads-in-fp32",
    "--attention-softmax-in-fp32", "--bf16-reduced-precision-matmul", "--ddp-average-in-collective",
    "--no-async-tensor-model-parallel-allreduce", "--async-save", "--eval-only", "--skip-train",
})
_EXECUTION_PREFIXES = ("--log-", "--tensorboard", "--wandb", "--recompute", "--ckpt-", "--no-load-", "--no-save-",
                       "--overlap-", "--tp-comm", "--cuda-graph", "--profile", "--exit-", "--manual-gc", "--timing-",
                       "--distributed-", "--inference-", "--nccl", "--straggler", "--one-logger", "--ft-",
                       "--dist-ckpt", "--enable-ft", "--num-distributed-optimizer", "--check-for",
                       "--rerun-", "--error-injection", "--barrier")


def fmt_number(x: object) -> str:
    """Shortest text of a number; floats to 12 significant digits (3e-4 * 0.1 -> '3e-05')."""
    return repr(float(f"{x:.12g}")) if isinstance(x, float) else str(x)


def is_execution_only(name: str) -> bool:
    return name in EXECUTION_ONLY or name.startswith(_EXECUTION_PREFIXES)


class ParsedFlags:
    """A recipe split into flags: ``values[name]`` is the value list of the last occurrence."""

    def __init__(self) -> None:
        self.values: dict[str, list[str]] = {}
        self.order: list[str] = []
        self.repeated: list[str] = []
        self.stray: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.values


def _arity(name: str) -> int | str | None:
    if name in SWITCHES:
        return 0
    if name in VALUE_FLAGS:
        return 1
    if name in MULTI_FLAGS:
        return "+"
    if name in NOT_MODELLED:
        return NOT_MODELLED[name][0]
    return None  # unknown: takes the words up to the next flag


def split_flags(argv: list[str]) -> ParsedFlags:
    """Split argv-style flags (``--a 1 --b --c=2``) the way Megatron's argparse would."""
    out = ParsedFlags()
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            out.stray.append(tok)
            i += 1
            continue
        name, eq, inline = tok.partition("=")
        arity = _arity(name)
        i += 1
        if eq:
            if arity == 0:
                raise SpecError(RECIPE, name, f"{name} is a switch and takes no value; write {name} alone")
            vals = [inline]
        elif arity == 0:
            vals = []
        elif arity == 1:
            if i >= len(argv) or argv[i].startswith("--"):
                raise SpecError(RECIPE, name, f"{name} needs a value, e.g. {name} 4")
            vals = [argv[i]]
            i += 1
        else:
            vals = []
            while i < len(argv) and not argv[i].startswith("--"):
                vals.append(argv[i])
                i += 1
            if arity == "+" and not vals:
                raise SpecError(RECIPE, name, f"{name} needs at least one value")
        if name in out.values:
            out.repeated.append(name)
        else:
            out.order.append(name)
        out.values[name] = vals
    return out
