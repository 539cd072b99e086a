"""grapefx spec -> Megatron-LM flags (the semantics are in ``spec.megatron``'s docstring)."""

from __future__ import annotations

from spec.errors import SpecError
from spec.megatron.flags import fmt_number
from spec.megatron.patterns import format_pattern
from spec.schema import Spec

__all__ = ["to_megatron", "megatron_notes"]

def _fail(key: str, message: str) -> SpecError:
    return SpecError("<spec>", key, message + " (Megatron-LM has no flag for it)")


def to_megatron(spec: Spec) -> list[str]:
    """Megatron-LM flags (argv-style) that run ``spec``; raises SpecError where no flag can say it."""
    m, att = spec.model, spec.attention
    kinds = spec.layer_kinds()
    used = [k for k in ("local", "global") if k in kinds]
    ref = att.of(used[0])
    for k in used:
        a = att.of(k)
        if (a.heads, a.kv_heads, a.head_dim) != (ref.heads, ref.kv_heads, ref.head_dim):
            raise _fail(f"attention.{k}", "local and global layers have different head shapes")
    if "global" in used and att.global_.mechanism != "gqa":
        raise _fail("attention.global.mechanism", "TPA on global layers (the vpMoE fork applies TPA to window "
                                                   "layers only)")
    if not m.init.scaled_output:
        raise _fail("model.init.scaled_output", "unscaled output projections (Megatron always scales them)")
    fl: list[str] = ["--num-layers", str(m.n_layers), "--hidden-size", str(m.d_model),
                     "--num-attention-heads", str(ref.heads)]
    if ref.kv_heads != ref.heads:
        fl += ["--group-query-attention", "--num-query-groups", str(ref.kv_heads)]
    fl += ["--kv-channels", str(ref.head_dim), "--ffn-hidden-size", str(spec.ffn.hidden), "--swiglu",
           "--disable-bias-linear", "--normalization", "RMSNorm", "--norm-epsilon", fmt_number(m.norm_eps),
           "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--init-method-std", fmt_number(m.init.std)]
    if not m.tied_embeddings:
        fl.append("--untie-embeddings-and-output-weights")
    if m.qk_norm:
        fl.append("--qk-layernorm")
    fl += ["--vocab-size", str(m.vocab_size), "--make-vocab-size-divisible-by", str(m.pad_vocab_to),
           "--seq-length", str(spec.data.seq_len), "--max-position-embeddings", str(spec.data.seq_len)]
    if "local" in used:
        fl += ["--window-size", f"{att.local.window - 1},0"]
        if "global" in used:
            periodic = m.global_every is not None and m.layer_kinds is None
            fl += ["--window-attn-skip-freq", str(m.global_every) if periodic
                   else format_pattern([1 if k == "local" else 0 for k in kinds])]
    fl += _position_flags(spec, used)
    if "local" in used and att.local.mechanism == "tpa":
        hf, r_q, r_k, r_v = att.local.tpa_ranks()
        if hf != "kv_groups" or r_k != r_v:
            raise _fail("attention.local", "TPA other than the vpMoE fork's (head_factors: kv_groups, r_k == r_v)")
        fl += ["--use-tpa", "--tpa-rank", str(r_k), "--tpa-q-rank", str(r_q)]
    if spec.moe is not None:
        fl += _moe_flags(spec)
    if spec.precision.compute == "bf16":
        fl.append("--bf16")
    t = spec.train
    fl += ["--micro-batch-size", str(t.micro_batch), "--global-batch-size", str(t.global_batch),
           "--train-iters", str(t.steps), "--lr", fmt_number(t.optimizer.lr),
           "--min-lr", fmt_number(t.optimizer.lr * t.schedule.min_lr_ratio), "--lr-decay-style", t.schedule.kind,
           "--lr-warmup-iters", str(t.schedule.warmup_steps), "--weight-decay", fmt_number(t.optimizer.weight_decay),
           "--adam-beta1", fmt_number(t.optimizer.betas[0]), "--adam-beta2", fmt_number(t.optimizer.betas[1]),
           "--adam-eps", fmt_number(t.optimizer.eps), "--clip-grad", fmt_number(t.grad_clip or 0.0),
           "--seed", str(t.seed),
           "--log-interval", str(t.log_every), "--eval-interval", str(t.eval_every),
           "--eval-iters", str(t.eval_batches), "--save-interval", str(t.checkpoint_every)]
    files = [s for s in spec.data.sources if not s.path.startswith("builtin:")]
    if files:
        fl.append("--data-path")
        for s in files:
            fl += [fmt_number(s.weight), s.path]
    return fl


def _position_flags(spec: Spec, used: list[str]) -> list[str]:
    att, kinds = spec.attention, spec.layer_kinds()
    rot = [k for k in used if att.of(k).rotates()]
    fl: list[str] = []
    if rot:
        pos = att.of(rot[0]).position
        if any(att.of(k).position != pos for k in rot):
            raise _fail("attention.global.position", "different rotations on local and global layers")
        fl += pos.megatron_flags(_fail, f"attention.{rot[0]}.position")
        skip = [0 if k in rot else 1 for k in kinds]
        if any(skip):
            p, n = spec.model.global_every, spec.model.n_layers
            aligned = spec.model.layer_kinds is None and p is not None and rot == ["local"] and n % p == 0
            fl += ["--no-rope-freq", str(p) if aligned else format_pattern(skip)]
    else:
        fl += ["--position-embedding-type", "none"]
    if "local" in used and att.local.position.adds_bias:
        raise _fail("attention.local.position", "ALiBi on sliding-window layers (--grape-a applies to global layers)")
    if "global" in used and att.global_.position.adds_bias:
        fl += att.global_.position.megatron_flags(_fail, "attention.global.position")
    return fl


def _moe_flags(spec: Spec) -> list[str]:
    m, r, n = spec.moe, spec.moe.router, spec.model.n_layers
    fl = ["--num-experts", str(m.experts), "--moe-router-topk", str(m.top_k), "--moe-ffn-hidden-size",
          str(m.expert_hidden)]
    if m.shared_experts:
        fl += ["--moe-shared-expert-intermediate-size", str(m.shared_experts * m.expert_hidden)]
    if m.first_k_dense:
        fl += ["--moe-layer-freq", format_pattern([0] * m.first_k_dense + [1] * (n - m.first_k_dense))]
    return fl + r.megatron_flags(_fail)


def megatron_notes(spec: Spec) -> list[str]:
    """What ``to_megatron`` flags cannot carry (printed as comments by the CLI)."""
    notes = []
    if not spec.train.optimizer.decay_embeddings:
        notes.append("Megatron applies weight decay to the embedding; this spec does not (decay_embeddings: false)")
    builtin = [s.path for s in spec.data.sources if s.path.startswith("builtin:")]
    if builtin:
        notes.append(f"data source {', '.join(builtin)} has no Megatron equivalent: add --data-path PREFIX "
                     "(grapefx data prepare writes Megatron .bin/.idx)")
    notes.append(f"tokenizer ({spec.data.tokenizer.kind}): add Megatron's --tokenizer-type for your tokenizer")
    return notes
