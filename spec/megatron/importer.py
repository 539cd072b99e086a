"""Megatron-LM recipe -> grapefx spec mapping (the semantics are in ``spec.megatron``'s docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spec.convert import to_dict
from spec.errors import SpecError
from spec.load import spec_from_dict
from spec.megatron.flags import (
    MEGATRON_DEFAULTS,
    MULTI_FLAGS,
    NOT_MODELLED,
    SWITCHES,
    VALUE_FLAGS,
    fmt_number,
    is_execution_only,
    split_flags,
)
from spec.megatron.patterns import RECIPE, format_pattern, parse_int_or_pattern
from spec.schema import POSITION_KINDS, ROUTERS, GrapeA, GrapeM, Model, NoPE, RoPE, Train
from spec.validate import BYTE_TOKENIZER_VOCAB

__all__ = ["from_megatron", "import_megatron", "MegatronImport"]

_POLARITY = ("Polarity: in a --window-attn-skip-freq list 1 means sliding window (a local layer), but in a "
             "--no-rope-freq list 1 means skip the rotation (a global layer, by the position rule), so the same list "
             "given to both flags inverts the layer plan")


@dataclass
class MegatronImport:
    spec: dict                                          # YAML-shaped mapping, valid for spec_from_dict
    warnings: list[str] = field(default_factory=list)   # things the user should read
    defaults: list[str] = field(default_factory=list)   # "--flag value" Megatron applied because it was omitted
    ignored: list[str] = field(default_factory=list)    # execution-only flags


class _Importer:
    def __init__(self, argv: list[str], strict: bool):
        self.flags = split_flags(list(argv))
        self.strict = strict
        self.result = MegatronImport(spec={})
        self.used: set[str] = set()
        self.unmodelled: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ flag access
    def warn(self, msg: str) -> None:
        self.result.warnings.append(msg)

    def has(self, name: str) -> bool:
        self.used.add(name)
        return name in self.flags

    def get(self, name: str, conv: Callable[[str], Any], *, show: Any = None) -> Any:
        """The flag's parsed value, else Megatron's default (``MEGATRON_DEFAULTS``, None when Megatron has
        none), recorded so the YAML can say so; ``show`` describes a derived default."""
        self.used.add(name)
        default = MEGATRON_DEFAULTS.get(name)
        if name in self.flags:
            vals = self.flags.values[name]
            try:
                return conv(vals[0])
            except SpecError:
                raise
            except (TypeError, ValueError):
                kind = {int: "an integer", float: "a number"}.get(conv, "a valid value")
                raise SpecError(RECIPE, name, f"{vals[0]!r} is not {kind}") from None
        if default is not None or show is not None:
            self.result.defaults.append(f"{name} {show if show is not None else fmt_number(default)}")
        return default

    def not_modelled(self, flag: str, reason: str) -> None:
        self.unmodelled.append((flag, reason))

    def required(self, name: str) -> int:
        v = self.get(name, int)
        if v is None:
            raise SpecError(RECIPE, name, f"the recipe has no {name}; Megatron requires it (e.g. {name} 24)")
        if v < 1:
            raise SpecError(RECIPE, name, f"{v} must be >= 1")
        return v

    # ------------------------------------------------------------------ the recipe
    def run(self) -> MegatronImport:
        if self.flags.stray:
            self.warn("ignored words that are not --flags: " + " ".join(self.flags.stray))
        for name in self.flags.repeated:
            self.warn(f"{name} is given more than once; the last value wins (as in Megatron)")
        model, att = self.model()
        kinds = Model(n_layers=model["n_layers"], global_every=model["global_every"],
                      layer_kinds=model["layer_kinds"]).kinds()
        local_pos, global_pos, mismatch = self.positions(kinds, att["local"]["heads"], att["local"]["kv_heads"])
        att["local"]["position"], att["global"]["position"] = local_pos, global_pos
        att["allow_position_mismatch"] = mismatch
        self.windows_and_tpa(att, kinds)
        spec: dict[str, Any] = {"name": "megatron", "model": model, "attention": att}
        spec.update(self.ffn_and_moe(model["n_layers"]))
        spec["precision"] = {"compute": "bf16" if self.has("--bf16") else "fp32"}
        if "--bf16" not in self.flags:
            self.result.defaults.append("(no --bf16) fp32 compute")
        spec["data"] = self.data()
        spec["train"] = self.train()
        self.leftovers()
        self.result.spec = spec
        spec_from_dict(spec, file=RECIPE)  # the import must be a valid spec
        return self.result

    def model(self) -> tuple[dict, dict]:
        n_layers, hidden = self.required("--num-layers"), self.required("--hidden-size")
        heads = self.required("--num-attention-heads")
        given = "--num-query-groups" in self.flags
        if self.has("--group-query-attention"):
            kv = self.get("--num-query-groups", int)
        else:
            groups = self.get("--num-query-groups", int) if given else None
            if given:
                self.warn(f"--num-query-groups {groups} has no effect without --group-query-attention: Megatron "
                          f"uses one kv head per query head ({heads})")
            kv = heads
        head_dim = self.get("--kv-channels", int)
        if head_dim is None:
            if hidden % heads:
                raise SpecError(RECIPE, "--kv-channels", f"--hidden-size {hidden} is not divisible by "
                                                         f"--num-attention-heads {heads}; give --kv-channels")
            head_dim = hidden // heads
            self.result.defaults.append(f"--kv-channels {head_dim} (hidden size / heads)")
        swiglu = self.has("--swiglu")
        if not swiglu:
            self.not_modelled("(no --swiglu)", "Megatron's default MLP is GeLU; grapefx's FFNs and experts are SwiGLU: "
                                               "add --swiglu")
        ffn = self.get("--ffn-hidden-size", int)
        if ffn is None:
            ffn = int((4 * hidden * 2 / 3) / 64) * 64 if swiglu else 4 * hidden
            rule = "int(4h*2/3/64)*64 with --swiglu" if swiglu else "4h"
            self.result.defaults.append(f"--ffn-hidden-size {ffn} ({rule})")
        self._ffn_hidden = ffn
        norm = self.get("--normalization", str)
        if norm != "RMSNorm":
            self.not_modelled(f"--normalization {norm}", "grapefx uses RMSNorm only: add --normalization RMSNorm")
        if not self.has("--disable-bias-linear"):
            self.not_modelled("(no --disable-bias-linear)", "Megatron adds biases to linear layers by default; "
                                                            "grapefx has none: add --disable-bias-linear")
        for flag in ("--attention-dropout", "--hidden-dropout"):
            p = self.get(flag, float)
            if p:
                self.not_modelled(f"{flag} {p}", "grapefx trains without dropout: add " + flag + " 0")
        rotary_percent = self.get("--rotary-percent", float)
        if rotary_percent not in (None, 1.0):
            self.not_modelled(f"--rotary-percent {rotary_percent}", "grapefx rotates the whole head")
        untie = self.has("--untie-embeddings-and-output-weights")
        if not untie:
            self.result.defaults.append("(no --untie-embeddings-and-output-weights) tied embeddings")
        vocab = self.get("--vocab-size", int)
        if vocab is None:
            vocab = Model().vocab_size
            self.warn(f"no --vocab-size (Megatron takes it from the tokenizer): model.vocab_size is grapefx's "
                      f"default {vocab}; set it to your tokenizer's size")
        model = {
            "vocab_size": vocab, "pad_vocab_to": self.get("--make-vocab-size-divisible-by", int),
            "d_model": hidden, "n_layers": n_layers, "norm_eps": self.get("--norm-epsilon", float),
            "tied_embeddings": not untie, "qk_norm": self.has("--qk-layernorm"),
            "init": {"std": self.get("--init-method-std", float), "scaled_output": True},
        }
        model.update(self.schedule(n_layers))
        shape = {"heads": heads, "kv_heads": kv, "head_dim": head_dim}
        return model, {"local": dict(shape), "global": dict(shape)}

    def schedule(self, n_layers: int) -> dict:
        ws = self.get("--window-size", str)
        skip = self.get("--window-attn-skip-freq", lambda t: parse_int_or_pattern(t, "--window-attn-skip-freq"))
        self._window = None
        if ws is not None:
            parts = ws.strip().strip("()").split(",")
            try:
                a, b = (int(p) for p in parts)
            except ValueError:
                raise SpecError(RECIPE, "--window-size", f"{ws!r}: expected two integers a,b (e.g. 127,0: keys "
                                                         "i-127..i, W = 128)") from None
            if b != 0:
                raise SpecError(RECIPE, "--window-size", f"{ws!r} looks {b} keys ahead; grapefx is causal: use "
                                                         f"--window-size {a},0")
            if a < 0:
                raise SpecError(RECIPE, "--window-size", f"{ws!r}: a = {a} is not a look-back; W = a + 1 keys")
            self._window = a + 1
            if a >= 64 and a & (a - 1) == 0:
                self.warn(f"--window-size {a},0 is W = {a + 1} keys (i-{a}..i); if you meant {a} keys including the "
                          f"current token, write --window-size {a - 1},0 (the baseline's W = 128 is 127,0)")
        if self._window is None:
            if skip is not None:
                self.warn("--window-attn-skip-freq has no effect without --window-size: every layer is full attention")
            self._skip_text = None
            return {"global_every": 1, "layer_kinds": None}
        self._skip_text = self.flags.values.get("--window-attn-skip-freq", [None])[0]
        if skip is None:
            return {"global_every": None, "layer_kinds": None}
        if isinstance(skip, int):
            if skip < 1:
                raise SpecError(RECIPE, "--window-attn-skip-freq", f"{skip}: layer l is full attention iff "
                                                                   "l % N == 0, so N must be >= 1")
            return {"global_every": skip, "layer_kinds": None}
        self._check_bits(skip, n_layers, "--window-attn-skip-freq", "1 = sliding window (local), 0 = full attention")
        kinds = ["local" if bit else "global" for bit in skip]
        for p in range(1, n_layers + 1):
            if kinds == list(Model(n_layers=n_layers, global_every=p).kinds()):
                return {"global_every": p, "layer_kinds": None}
        if "global" not in kinds:
            return {"global_every": None, "layer_kinds": None}
        return {"global_every": None, "layer_kinds": kinds}

    @staticmethod
    def _check_bits(bits: list[int], n_layers: int, flag: str, meaning: str) -> None:
        if len(bits) != n_layers:
            raise SpecError(RECIPE, flag, f"the list has {len(bits)} entries for --num-layers {n_layers}: give one "
                                          f"entry per layer ({meaning})")
        if any(b not in (0, 1) for b in bits):
            raise SpecError(RECIPE, flag, f"entries must be 0 or 1 ({meaning}); got {sorted(set(bits))}")

    def positions(self, kinds: tuple[str, ...], heads: int, kv: int) -> tuple[dict, dict, bool]:
        n = len(kinds)
        ptype = self.get("--position-embedding-type", str)
        if "--position-embedding-type" not in self.flags and self.has("--use-rotary-position-embeddings"):
            ptype = "rope"
        if ptype not in ("rope", "grapem", "none"):
            raise SpecError(RECIPE, "--position-embedding-type",
                            f"{ptype}{' (Megatron default)' if '--position-embedding-type' not in self.flags else ''} "
                            "is not modelled: grapefx has rotary (rope, grapem), ALiBi (--grape-a) or none; add "
                            "--position-embedding-type grapem|rope|none")
        base = self.get("--rotary-base", int) if ptype in ("rope", "grapem") else 10000
        rotation: dict | None = None
        if ptype == "rope":
            rotation = to_dict(RoPE(base=float(base)))
        elif ptype == "grapem":
            learnable = not self.has("--no-grapem-learnable-freq")
            self.has("--grapem-learnable-freq")
            self.has("--grapem-share-across-heads")
            if self.has("--grapem-per-head"):
                if kv < heads:
                    raise SpecError(RECIPE, "--grapem-per-head",
                                    f"refused under GQA ({heads} query heads share {kv} kv heads): with per-head "
                                    "frequencies the query heads of a group turn by different angles than the key "
                                    "head they read, so scores stop depending on i - j only (the relative law, "
                                    "MATH.md §2); drop --grapem-per-head (frequencies shared by all heads)")
                self.not_modelled("--grapem-per-head", "grapefx shares GRAPE-M frequencies across heads; imported "
                                                       "as share: model")
            rotation = to_dict(GrapeM(base=float(base), learnable_freq=learnable,
                                      log_freq_scale=self.get("--grapem-log-freq-scale", float)))
        else:
            for flag in ("--grapem-learnable-freq", "--no-grapem-learnable-freq", "--grapem-per-head",
                         "--grapem-log-freq-scale"):
                if self.has(flag):
                    self.warn(f"{flag} has no effect without --position-embedding-type grapem")
        no_rope = self.get("--no-rope-freq", lambda t: parse_int_or_pattern(t, "--no-rope-freq"))
        skipped: set[int] = set()
        if no_rope is not None:
            if rotation is None:
                self.warn(f"--no-rope-freq has no effect with --position-embedding-type {ptype}: nothing rotates")
            elif isinstance(no_rope, int):
                if no_rope < 1 or n % no_rope:
                    raise SpecError(RECIPE, "--no-rope-freq", f"{no_rope}: Megatron expands N to "
                                                              f"([0]*(N-1)+[1])*(L/N), so --num-layers {n} must be a "
                                                              "multiple of N >= 1; use the list form otherwise")
                skipped = {ly for ly in range(1, n + 1) if ly % no_rope == 0}
            else:
                self._check_bits(no_rope, n, "--no-rope-freq", "1 = skip the rotation, 0 = rotate")
                skipped = {ly for ly, bit in enumerate(no_rope, 1) if bit}
        grape_a = self.has("--grape-a")
        return self._kind_positions(kinds, rotation, skipped, grape_a, no_rope is not None)

    def _kind_positions(self, kinds, rotation, skipped: set[int], grape_a: bool,
                        no_rope_given: bool) -> tuple[dict, dict, bool]:
        """(local position, global position, allow_position_mismatch) from Megatron's per-layer sets."""
        members = {k: {ly for ly, kk in enumerate(kinds, 1) if kk == k} for k in ("local", "global")}
        lists = [f for f in ("--window-attn-skip-freq", "--no-rope-freq")
                 if "[" in (self.flags.values.get(f, [""])[0] or "")]
        same = (len(lists) == 2 and self.flags.values["--window-attn-skip-freq"][0]
                == self.flags.values["--no-rope-freq"][0])
        rotates: dict[str, bool] = {}
        if rotation is not None:
            if members["local"] and members["global"] and skipped == members["local"]:
                fix_bits = [1 if k == "global" else 0 for k in kinds]
                raise SpecError(RECIPE, "--no-rope-freq",
                                f"the layers that skip the rotation ({_layers(skipped)}) are exactly the local "
                                f"(sliding-window) layers, and the global layers ({_layers(members['global'])}) "
                                f"rotate: the inverse of the position rule. {_POLARITY}"
                                + (" - and this recipe does exactly that" if same else "")
                                + f". Fix: --no-rope-freq '{format_pattern(fix_bits)}' (1 on the global layers). "
                                "If the inversion is intended, write the YAML spec with "
                                "attention.allow_position_mismatch: true")
            for k in ("local", "global"):
                if not members[k]:
                    continue
                skip_k = members[k] & skipped
                if skip_k and skip_k != members[k]:
                    raise SpecError(RECIPE, "--no-rope-freq",
                                    f"{k} layers {_layers(skip_k)} skip the rotation but {k} layers "
                                    f"{_layers(members[k] - skip_k)} rotate; grapefx gives every layer of a kind one "
                                    "position mechanism, and by the position rule the no-rope layers are exactly the "
                                    f"global layers ({_layers(members['global']) or 'none here'})"
                                    + (f". {_POLARITY}" if lists else "")
                                    + ". Fix: make --no-rope-freq select exactly the global layers (the int form N "
                                    "matches --window-attn-skip-freq N)")
                rotates[k] = not skip_k
        pos: dict[str, dict] = {}
        for k in ("local", "global"):
            r = rotates.get(k, rotation is not None)
            if k == "global" and grape_a and members["global"]:
                if r:
                    raise SpecError(RECIPE, "--grape-a",
                                    f"the global layers ({_layers(members['global'])}) would both rotate and add the "
                                    "ALiBi bias; grapefx gives each layer kind one position mechanism and by the "
                                    "position rule global layers never rotate: add --no-rope-freq selecting the global "
                                    "layers (e.g. the same N as --window-attn-skip-freq)")
                pos[k] = to_dict(GrapeA())
            elif members[k]:
                pos[k] = rotation if r and rotation is not None else to_dict(NoPE())
            else:  # unused kind: a value that keeps the position rule
                pos[k] = (rotation or to_dict(GrapeM())) if k == "local" else to_dict(GrapeA() if grape_a else NoPE())
        if grape_a and not members["global"]:
            self.warn("--grape-a has no effect: the recipe has no full-attention (global) layers")
        mismatch = []
        if members["global"] and POSITION_KINDS[pos["global"]["kind"]].rotates:
            mismatch.append(f"the global layers ({_layers(members['global'])}) rotate"
                            + ("" if no_rope_given else " (no --no-rope-freq: Megatron rotates every layer)"))
        if members["local"] and not POSITION_KINDS[pos["local"]["kind"]].rotates:
            mismatch.append(f"the local layers ({_layers(members['local'])}) do not rotate")
        if mismatch:
            self.warn("; ".join(mismatch) + ": this breaks the position rule (global layers are exactly the layers that "
                      "skip the rotation), so the spec says attention.allow_position_mismatch: true. To follow the "
                      "position rule, add --no-rope-freq N with the N of --window-attn-skip-freq")
        return pos["local"], pos["global"], bool(mismatch)

    def windows_and_tpa(self, att: dict, kinds: tuple[str, ...]) -> None:
        att["local"]["window"] = self._window if self._window is not None else 128
        att["global"]["window"] = None
        if self._window is None:
            self.result.defaults.append("(no --window-size) no sliding window: every layer is full attention")
        rank, q_rank = self.get("--tpa-rank", int), self.get("--tpa-q-rank", int)
        if self.has("--use-tpa"):
            if "local" not in kinds:
                self.warn("--use-tpa has no effect: the vpMoE fork applies TPA on sliding-window layers and there are none")
            if rank is None or q_rank is None:
                self.warn("--use-tpa without --tpa-rank/--tpa-q-rank: the vpMoE fork's defaults were not checked; using "
                          "grapefx's kv_groups defaults R_Q = 4, R_K = R_V = 2 (MATH.md §4)")
            att["local"].update(mechanism="tpa", head_factors="kv_groups", r_q=q_rank if q_rank is not None else 4,
                                r_k=rank if rank is not None else 2, r_v=rank if rank is not None else 2)
        elif rank is not None or q_rank is not None:
            self.warn("--tpa-rank/--tpa-q-rank have no effect without --use-tpa")

    def ffn_and_moe(self, n_layers: int) -> dict:
        out: dict[str, Any] = {"ffn": {"hidden": self._ffn_hidden}}
        experts = self.get("--num-experts", int)
        moe_flags = [f for f in self.flags.order if f.startswith("--moe-") and not is_execution_only(f)]
        if experts is None:
            if moe_flags:
                self.warn(f"{', '.join(moe_flags)} have no effect without --num-experts (a dense model)")
            self.used.update(moe_flags)
            out["moe"] = None
            return out
        top_k = self.get("--moe-router-topk", int)
        hidden = self.get("--moe-ffn-hidden-size", int, show=f"{self._ffn_hidden} (= --ffn-hidden-size)")
        hidden = hidden if hidden is not None else self._ffn_hidden
        shared = self.get("--moe-shared-expert-intermediate-size", int)
        if shared is None:
            self.result.defaults.append("(no --moe-shared-expert-intermediate-size) no shared expert")
            n_shared = 0
        elif shared % hidden:
            raise SpecError(RECIPE, "--moe-shared-expert-intermediate-size",
                            f"{shared} is not a whole number of experts of width {hidden}; grapefx's shared experts "
                            "are shared_experts x expert_hidden wide")
        else:
            n_shared = shared // hidden
        freq = self.get("--moe-layer-freq", lambda t: parse_int_or_pattern(t, "--moe-layer-freq"))
        if isinstance(freq, int):
            if freq != 1:
                raise SpecError(RECIPE, "--moe-layer-freq", f"{freq}: one MoE layer in every {freq} (layers 1, "
                                                            f"{1 + freq}, ...) is not modelled; grapefx has MoE on "
                                                            "every layer after the first k dense ones: use "
                                                            "--moe-layer-freq [0]*k+[1]*(L-k)")
            first_dense = 0
        else:
            self._check_bits(freq, n_layers, "--moe-layer-freq", "1 = MoE, 0 = dense")
            first_dense = freq.index(1) if 1 in freq else n_layers
            if freq != [0] * first_dense + [1] * (n_layers - first_dense):
                raise SpecError(RECIPE, "--moe-layer-freq", f"{format_pattern(freq)} interleaves dense and MoE "
                                                            "layers; grapefx supports the first k layers dense "
                                                            "([0]*k+[1]*(L-k)) only")
        out["moe"] = {"experts": experts, "top_k": top_k, "shared_experts": n_shared, "expert_hidden": hidden,
                      "first_k_dense": first_dense, "router": self.router()}
        return out

    def router(self) -> dict:
        return ROUTERS["deepseek-v3"].from_megatron(self)

    def data(self) -> dict:
        out: dict[str, Any] = {}
        vocab = self.flags.values.get("--vocab-size", [None])[0]
        if vocab is not None and int(vocab) > BYTE_TOKENIZER_VOCAB:
            out["tokenizer"] = {"kind": "bpe", "vocab_size": int(vocab)}
            self.result.defaults.append(f"(--vocab-size {vocab}) data.tokenizer: a BPE of {vocab} ids trained "
                                        "locally; set data.tokenizer.path to use your own tokenizer.json")
        seq = self.get("--seq-length", int)
        if seq is None:
            self.warn("no --seq-length: data.seq_len keeps grapefx's default; Megatron requires --seq-length")
        else:
            out["seq_len"] = seq
        self.used.add("--data-path")
        paths = self.flags.values.get("--data-path")
        if paths:
            if len(paths) == 1:
                out["sources"] = [{"path": paths[0], "weight": 1.0}]
            elif len(paths) % 2:
                raise SpecError(RECIPE, "--data-path", "expected one prefix, or weight/prefix pairs "
                                                       "(w1 p1 w2 p2 ...)")
            else:
                try:
                    pairs = zip(paths[::2], paths[1::2], strict=True)
                    out["sources"] = [{"path": p, "weight": float(w)} for w, p in pairs]
                except ValueError:
                    raise SpecError(RECIPE, "--data-path", f"weights must be numbers: {' '.join(paths)}") from None
        return out

    def train(self) -> dict:
        ours = Train()
        micro = self.get("--micro-batch-size", int)
        gbs = self.get("--global-batch-size", int)
        if micro is None:
            micro = ours.micro_batch
            self.warn(f"no --micro-batch-size: train.micro_batch keeps grapefx's default {micro}")
        if gbs is None:
            gbs = micro
            self.result.defaults.append(f"--global-batch-size {gbs} (micro-batch x data-parallel size, taken as 1)")
        steps = self.get("--train-iters", int)
        if steps is None:
            steps = ours.steps
            self.warn(f"no --train-iters: train.steps keeps grapefx's default {steps}")
        lr = self.get("--lr", float)
        if lr is None:
            lr = ours.optimizer.lr
            self.warn(f"no --lr (Megatron requires it): train.optimizer.lr keeps grapefx's default {lr}")
        min_lr = self.get("--min-lr", float)
        warmup = self.get("--lr-warmup-iters", int)
        frac = self.get("--lr-warmup-fraction", float)
        decay_iters = self.get("--lr-decay-iters", int)
        if decay_iters is not None and decay_iters != steps:
            self.not_modelled(f"--lr-decay-iters {decay_iters}", "grapefx decays over train.steps")
        if frac is not None:
            warmup = round(frac * (decay_iters or steps))
        style = self.get("--lr-decay-style", str)
        if style not in ("cosine", "constant"):
            self.not_modelled(f"--lr-decay-style {style}" + ("" if "--lr-decay-style" in self.flags else
                                                             " (Megatron default)"),
                              "grapefx has cosine and constant schedules; imported as cosine")
            style = "cosine"
        optimizer = self.get("--optimizer", str)
        if optimizer != "adam":
            self.not_modelled(f"--optimizer {optimizer}", "grapefx trains with AdamW")
        clip = self.get("--clip-grad", float)
        self.result.defaults.append("(Megatron decays every matrix, the embedding included) "
                                    "train.optimizer.decay_embeddings: true")
        out = {
            "steps": steps, "micro_batch": micro, "global_batch": gbs,
            "seed": self.get("--seed", int),
            "optimizer": {"lr": lr, "betas": [self.get("--adam-beta1", float),
                                              self.get("--adam-beta2", float)],
                          "eps": self.get("--adam-eps", float),
                          "weight_decay": self.get("--weight-decay", float), "decay_embeddings": True},
            "schedule": {"warmup_steps": warmup, "kind": style, "min_lr_ratio": float(f"{min_lr / lr:.12g}")},
            "grad_clip": clip if clip > 0 else None,
            "log_every": self.get("--log-interval", int),
            "eval_every": self.get("--eval-interval", int),
            "eval_batches": self.get("--eval-iters", int),
        }
        save = self.get("--save-interval", int)
        if save is not None:
            out["checkpoint_every"] = save
        return out

    def leftovers(self) -> None:
        for name in self.flags.order:
            if name in self.used:
                continue
            vals = " ".join(self.flags.values[name])
            shown = f"{name} {vals}".strip()
            if is_execution_only(name):
                self.result.ignored.append(shown)
            elif name in NOT_MODELLED:
                self.not_modelled(shown, NOT_MODELLED[name][1])
            elif name in SWITCHES or name in VALUE_FLAGS or name in MULTI_FLAGS:
                self.warn(f"{shown} has no effect in this recipe (ignored)")
            else:
                self.not_modelled(shown, "unknown to grapefx; if it changes the model, the imported spec does not "
                                         "say so")
        if self.result.ignored:
            self.warn("ignored (execution only: no effect on what the model computes): "
                      + ", ".join(self.result.ignored))
        if self.unmodelled:
            if self.strict:
                flag, reason = self.unmodelled[0]
                more = f" (and {len(self.unmodelled) - 1} more)" if len(self.unmodelled) > 1 else ""
                raise SpecError(RECIPE, flag, f"not modelled: {reason}{more}; --strict refuses recipes grapefx "
                                              "cannot reproduce: change the flag or drop --strict")
            for flag, reason in self.unmodelled:
                self.warn(f"not modelled: {flag}: {reason}")


def _layers(ls: set[int]) -> str:
    s = sorted(ls)
    return ", ".join(map(str, s[:8])) + (f", ... ({len(s)} layers)" if len(s) > 8 else "")


def import_megatron(flags: list[str], strict: bool = False) -> MegatronImport:
    """Read a Megatron recipe; see the module docstring for the semantics."""
    return _Importer(flags, strict).run()


def from_megatron(flags: list[str], strict: bool = False) -> tuple[dict, list[str]]:
    """``(YAML-shaped spec mapping, warnings)`` for an argv-style Megatron recipe."""
    result = import_megatron(flags, strict)
    return result.spec, result.warnings
