"""Cross-field rules of a typed spec. Every problem is ``FILE: key.path: message``.

Each message names the value, the rule and a fix. All problems are collected; ``validate``
raises ``SpecProblems`` whose first line is the first problem (the CLI prints all of them).
A rule that ties several keys (``moe.top_k`` and ``moe.router.group_topk``) is reported at the
one written last, charged to the file or ``--set`` that wrote it (``Origin.latest``).

Sizes first: every field with a ``most`` bound (``spec.fields.f``) is checked before any rule,
and when one is out of bounds no rule runs, so validating costs the same whatever the values
(no rule may loop over a value that is not bounded). The router's rules live with the router
(``spec.routers``).

The position rule (MATH.md §1): global layers are exactly the layers that skip the rotation, so
a global layer never rotates (GRAPE-M/RoPE), a local layer always does, and the GRAPE-A bias
appears only on global layers (optional there: NoPE global layers are the follow-up ablation).
``attention.allow_position_mismatch: true`` lifts it, and every message about it says so.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from spec.convert import yaml_key
from spec.errors import SpecError, SpecProblems
from spec.origin import Origin, dotted
from spec.routers import divisors
from spec.schema import LAYER_KINDS, PASS_NAMES, POSITION_KINDS, Attention, Spec

__all__ = ["validate", "check", "SpecProblems", "BYTE_TOKENIZER_VOCAB"]

# The byte tokenizer's ids: 256 byte values + one end-of-document id (runtime.data).
BYTE_TOKENIZER_VOCAB = 257

_ESCAPE = "or set attention.allow_position_mismatch: true to break the position rule on purpose"


def _rotating() -> str:
    """The position kinds that rotate: 'grape-m or rope'."""
    return " or ".join(k for k, c in POSITION_KINDS.items() if c.rotates)


class _Checker:
    def __init__(self, spec: Spec, origin: Origin):
        self.spec, self.origin = spec, origin
        self.problems: list[SpecError] = []

    def err(self, path: tuple, message: str, also: tuple[tuple, ...] = ()) -> None:
        """One problem, at ``path``; for a rule that ``also`` involves other keys, at whichever of them was
        written last (the value the user changed), charged to the file or --set that wrote it."""
        path = self.origin.latest((path, *also))
        self.problems.append(SpecError(self.origin.file_of(path), dotted(path), message))

    # ------------------------------------------------------------------ small rule helpers
    def at_least(self, obj: Any, name: str, path: tuple, low: float, what: str = "", optional: bool = False) -> bool:
        v = getattr(obj, name)
        if v is None and optional:
            return True
        if not v >= low:  # NaN too
            self.err(path + (name,), f"{v} is too small: {what or name} must be >= {low:g}")
            return False
        return True

    def positive(self, obj: Any, name: str, path: tuple, what: str = "", optional: bool = False) -> bool:
        v = getattr(obj, name)
        if v is None and optional:
            return True
        if not v > 0:
            self.err(path + (name,), f"{v} is not allowed: {what or name} must be > 0")
            return False
        return True

    # ------------------------------------------------------------------ sections
    def run(self) -> list[SpecError]:
        s = self.spec
        if not self.bounds(s, ()):   # every rule below may loop over a size: bounded first, cost independent of values
            return self.problems
        if not s.name or "/" in s.name or "\\" in s.name:
            self.err(("name",), f"{s.name!r} is not a usable run name: it names the folder runs/<name>, so it must be "
                                "non-empty and contain no slashes")
        if s.output is not None and not s.output.strip():
            self.err(("output",), "empty output folder; delete the key to use runs/<name>")
        self.model()
        kinds_ok = self.schedule()
        for kind in LAYER_KINDS:
            self.attention(kind)
        self.positions()
        if s.moe is not None:
            self.moe()
        self.positive(s.ffn, "hidden", ("ffn",), "the dense FFN hidden width")
        self.compile()
        self.data(kinds_ok)
        self.train()
        self.parallel()
        return self.problems

    def bounds(self, obj: Any, path: tuple) -> bool:
        """Every size field at most its ``most`` (``spec.fields.f``); False when one is larger."""
        ok = True
        for fl in dataclasses.fields(obj):
            v, key = getattr(obj, fl.name), path + (yaml_key(fl.name),)
            most = fl.metadata.get("most")
            if most is not None and isinstance(v, int) and v > most:
                self.err(key, f"{v:,} is too large: {fl.name} must be <= {most:,} (grapefx bounds every size so that "
                              "checking and counting a spec stay instant; real models stay far below it)")
                ok = False
            elif dataclasses.is_dataclass(v):
                ok &= self.bounds(v, key)
            elif isinstance(v, tuple):
                for i, item in enumerate(v):
                    if dataclasses.is_dataclass(item):
                        ok &= self.bounds(item, key + (i,))
        return ok

    def model(self) -> None:
        m, p = self.spec.model, ("model",)
        self.at_least(m, "vocab_size", p, 1)
        self.at_least(m, "pad_vocab_to", p, 1, "pad_vocab_to (1 = no padding)")
        self.at_least(m, "d_model", p, 1)
        self.at_least(m, "n_layers", p, 1)
        self.positive(m, "norm_eps", p, "the RMSNorm epsilon")
        self.positive(m.init, "std", p + ("init",), "the initialisation standard deviation")

    def schedule(self) -> bool:
        m, p = self.spec.model, ("model",)
        if m.global_every is not None and m.layer_kinds is not None:
            self.err(p + ("layer_kinds",), f"model.global_every ({m.global_every}) and model.layer_kinds both say "
                                           "which layers are global; keep one: delete layer_kinds, or set "
                                           "`global_every: null`")
            return False
        if m.global_every is not None and m.global_every < 1:
            self.err(p + ("global_every",), f"{m.global_every} is not a period: layer l (from 1) is global iff "
                                            "l % global_every == 0, so global_every must be >= 1 (the baseline's 4 "
                                            "gives 3 local layers per global one); "
                                            "use null for no global layers")
            return False
        if m.global_every is not None and m.global_every > m.n_layers >= 1:
            self.err(p + ("global_every",), f"global_every {m.global_every} places no global layer in a {m.n_layers}-layer model "
                                            f"(layer l is global iff l % {m.global_every} == 0, and no l in "
                                            f"1..{m.n_layers} is): use global_every <= {m.n_layers}, "
                                            "or null for no global layers", also=(p + ("n_layers",),))
            return False
        if m.layer_kinds is not None:
            if len(m.layer_kinds) != m.n_layers:
                self.err(p + ("layer_kinds",), f"{len(m.layer_kinds)} kinds for n_layers = {m.n_layers}: give exactly "
                                               "one kind (local or global) per layer", also=(p + ("n_layers",),))
                return False
            for i, k in enumerate(m.layer_kinds):
                if k not in LAYER_KINDS:
                    close = difflib.get_close_matches(k, LAYER_KINDS, n=1)
                    hint = f" - did you mean {close[0]!r}?" if close else ""
                    self.err(p + ("layer_kinds", i), f"layer {i + 1}: {k!r} is not a layer kind; use local or "
                                                     f"global{hint}")
                    return False
        return True

    def attention(self, kind: str) -> None:
        a: Attention = self.spec.attention.of(kind)
        p = ("attention", kind)
        ok = self.at_least(a, "heads", p, 1, "query heads") & self.at_least(a, "kv_heads", p, 1, "kv heads")
        self.at_least(a, "head_dim", p, 1)
        if ok and a.heads % a.kv_heads:
            self.err(p + ("kv_heads",), f"{a.heads} query heads cannot be shared evenly by {a.kv_heads} kv heads (GQA: "
                                        f"query head h reads kv head h // (heads / kv_heads), so heads % kv_heads "
                                        f"must be 0); use kv_heads in {divisors(a.heads)}", also=(p + ("heads",),))
        if a.rotates() and a.head_dim % 2:
            self.err(p + ("head_dim",), f"{a.head_dim} is odd: the {a.position.kind} rotation pairs coordinate i with "
                                        "i + head_dim/2, so head_dim must be even", also=(p + ("position", "kind"),))
        tpa_keys = [k for k in ("r_q", "r_k", "r_v", "head_factors") if getattr(a, k) is not None]
        if a.mechanism == "gqa" and tpa_keys:
            self.err(p + (tpa_keys[0],), f"{tpa_keys[0]} applies to mechanism tpa only (MATH.md §4); delete it or set "
                                         f"attention.{kind}.mechanism: tpa", also=(p + ("mechanism",),))
        for r in ("r_q", "r_k", "r_v"):
            self.at_least(a, r, p, 1, f"the TPA rank {r}", optional=True)
        if a.mechanism == "tpa" and self.spec.model.qk_norm:
            self.err(p + ("mechanism",), "tpa with model.qk_norm: TPA rotates the B factors before the contraction "
                                         "(MATH.md §4), but QK-norm must normalise the contracted q and k before any "
                                         "rotation (MATH.md §2); set model.qk_norm: false, or use mechanism: gqa",
                     also=(("model", "qk_norm"),))
        if kind == "local":
            if a.window is None:
                self.err(p + ("window",), "local layers need a window: W keys including the current token (query i "
                                          "sees keys i-W+1..i); the baseline uses window: 128")
            elif a.window < 1:
                self.err(p + ("window",), f"{a.window} keys is not a window: W counts keys including the current "
                                          "token, so W >= 1 (W = 1 sees only itself; the baseline uses W = 128)")
        elif a.window is not None:
            self.err(p + ("window",), f"global layers attend to the whole causal context; a window ({a.window}) is "
                                      "only for local layers: delete it, or make those layers local "
                                      "(model.global_every / model.layer_kinds)")
        for key, message in a.position.problems():
            self.err(p + ("position", key), message)

    def positions(self) -> None:
        att = self.spec.attention
        loc, glo = att.local, att.global_
        if not att.allow_position_mismatch:
            if glo.rotates():
                self.err(("attention", "global", "position", "kind"),
                         f"{glo.position.kind} rotates q and k, but by the position rule global layers never rotate "
                         "(they are exactly the layers that skip the rotation, MATH.md §1): use grape-a (ALiBi bias) "
                         f"or nope, {_ESCAPE}")
            if loc.position.adds_bias:
                self.err(("attention", "local", "position", "kind"),
                         f"{loc.position.kind} ({loc.position.bias_name}) appears only on global layers by the position "
                         f"rule (MATH.md §1): use {_rotating()} on local layers, {_ESCAPE}")
            elif not loc.rotates():
                self.err(("attention", "local", "position", "kind"),
                         f"{loc.position.kind}: local layers rotate by the position rule (the layers that skip the "
                         f"rotation are exactly the global ones, MATH.md §1): use {_rotating()}, {_ESCAPE}")
        if loc.position.kind == glo.position.kind and (loc.position.model_wide or glo.position.model_wide):
            if loc.position != glo.position or loc.head_dim != glo.head_dim:
                self.err(("attention", "global", "position"),
                         "both layer kinds use GRAPE-M with share: model, i.e. one frequency vector of head_dim/2 "
                         "entries for the whole model, but their GRAPE-M settings or head_dim differ: make them equal, "
                         "or use share: layer")

    def moe(self) -> None:
        m, p = self.spec.moe, ("moe",)
        n_layers = self.spec.model.n_layers
        ok = self.at_least(m, "experts", p, 1, "routed experts") & self.at_least(m, "top_k", p, 1)
        if ok and m.top_k > m.experts:
            self.err(p + ("top_k",), f"top_k = {m.top_k} picks more experts than exist (experts = {m.experts}); "
                                     f"use top_k <= {m.experts}", also=(p + ("experts",),))
        self.at_least(m, "shared_experts", p, 0, "shared experts (0 = none)")
        self.at_least(m, "expert_hidden", p, 1, "the expert hidden width")
        if not 0 <= m.first_k_dense <= n_layers:
            self.err(p + ("first_k_dense",), f"{m.first_k_dense} dense layers in a {n_layers}-layer model: "
                                             f"first_k_dense must be in 0..{n_layers}", also=(("model", "n_layers"),))
        m.router.check(m, self, p + ("router",))

    def compile(self) -> None:
        seen = set()
        for i, name in enumerate(self.spec.compile.passes):
            if name not in PASS_NAMES:
                close = difflib.get_close_matches(name, PASS_NAMES, n=1)
                hint = f" - did you mean {close[0]!r}?" if close else ""
                self.err(("compile", "passes", i), f"unknown pass {name!r}{hint} (passes: {', '.join(PASS_NAMES)})")
            elif name in seen:
                self.err(("compile", "passes", i), f"pass {name!r} is listed twice; list each pass once")
            seen.add(name)

    def data(self, kinds_ok: bool) -> None:
        d, p, s = self.spec.data, ("data",), self.spec
        if self.at_least(d, "seq_len", p, 1, "the training context seq_len") and kinds_ok:
            w = s.attention.local.window
            if w is not None and "local" in s.layer_kinds() and d.seq_len < w:
                self.err(p + ("seq_len",), f"a {w}-key window never binds in a {d.seq_len}-token context (local layers "
                                           "would attend like global ones): data.seq_len must be >= "
                                           "attention.local.window; raise seq_len or lower the window",
                         also=(("attention", "local", "window"),))
        if not d.sources:
            self.err(p + ("sources",), "no data sources; give at least one, e.g. [{path: builtin:shakespeare}]")
        for i, src in enumerate(d.sources):
            if not src.path:
                self.err(p + ("sources", i, "path"), "empty path; give a file, a folder or builtin:shakespeare")
            self.positive(src, "weight", p + ("sources", i), "the blend weight")
            self._split_rule(src, p + ("sources", i))
        if not 0 <= d.valid_fraction < 1:
            self.err(p + ("valid_fraction",), f"{d.valid_fraction} is not a fraction of documents: use 0 <= "
                                              "valid_fraction < 1 (0.01 = 1%)")
        t, tp = d.tokenizer, p + ("tokenizer",)
        if t.kind != "pretokenized" and t.eod_id is not None:
            self.err(tp + ("eod_id",), f"eod_id applies to kind: pretokenized only; the {t.kind} tokenizer has its own "
                                       "end-of-document id: delete it")
        if t.kind == "pretokenized":
            if t.vocab_size is not None:
                self.err(tp + ("vocab_size",), "pretokenized data takes its vocabulary from model.vocab_size (every id "
                                               "must be below it): delete data.tokenizer.vocab_size and set "
                                               "model.vocab_size")
            if t.path is not None:
                self.err(tp + ("path",), "a tokenizer.json makes the data kind: bpe (its vocabulary checks the ids and "
                                         "generation can read text): set kind: bpe, or delete path")
            if t.eod_id is not None and not 0 <= t.eod_id < s.model.vocab_size:
                self.err(tp + ("eod_id",), f"{t.eod_id} is not an id of the {s.model.vocab_size}-id vocabulary: use "
                                           f"0 <= eod_id < model.vocab_size, or null when the data has no "
                                           "end-of-document id")
        elif t.kind == "byte":
            for k in ("vocab_size", "path"):
                if getattr(t, k) is not None:
                    self.err(tp + (k,), f"{k} applies to kind: bpe only; the byte tokenizer is fixed "
                                        f"({BYTE_TOKENIZER_VOCAB} ids): delete it or set kind: bpe")
            if s.model.vocab_size < BYTE_TOKENIZER_VOCAB:
                self.err(("model", "vocab_size"), f"{s.model.vocab_size} is smaller than the byte tokenizer's "
                                                  f"{BYTE_TOKENIZER_VOCAB} ids (256 bytes + end-of-document): set "
                                                  f"model.vocab_size: {BYTE_TOKENIZER_VOCAB}", also=(tp + ("kind",),))
        else:
            if (t.vocab_size is None) == (t.path is None):
                self.err(tp + ("vocab_size",), "a bpe tokenizer needs exactly one of vocab_size (train a BPE of that "
                                               "size, e.g. 4096) or path (an existing tokenizer.json)")
            elif t.vocab_size is not None and t.vocab_size <= BYTE_TOKENIZER_VOCAB:
                self.err(tp + ("vocab_size",), f"{t.vocab_size} leaves no room for merges: a byte-level BPE needs more "
                                               f"than {BYTE_TOKENIZER_VOCAB} ids (256 bytes + end-of-document), "
                                               "e.g. 4096")
            elif t.vocab_size is not None and s.model.vocab_size < t.vocab_size:
                self.err(("model", "vocab_size"), f"{s.model.vocab_size} is smaller than the tokenizer's "
                                                  f"{t.vocab_size} ids: set model.vocab_size >= {t.vocab_size}",
                         also=(tp + ("vocab_size",),))

    def _split_rule(self, src, path: tuple) -> None:
        """separator goes with split: separator, chunk_chars with split: chunks, and each needs a value there."""
        if src.split == "separator" and not src.separator:
            self.err(path + ("separator",), "split: separator needs the text between documents, e.g. separator: "
                                            "\"<|endoftext|>\" (or use split: paragraphs to cut at blank lines)")
        elif src.split != "separator" and src.separator is not None:
            self.err(path + ("separator",), f"separator applies to split: separator only (this source has split: "
                                            f"{src.split}): delete it or set split: separator")
        if src.split == "chunks":
            if src.chunk_chars is None or src.chunk_chars < 1:
                self.err(path + ("chunk_chars",), f"split: chunks needs chunk_chars >= 1 (got {src.chunk_chars}), "
                                                  "the characters per document, e.g. 4096")
        elif src.chunk_chars is not None:
            self.err(path + ("chunk_chars",), f"chunk_chars applies to split: chunks only (this source has split: "
                                              f"{src.split}): delete it or set split: chunks")

    def train(self) -> None:
        t, p = self.spec.train, ("train",)
        self.at_least(t, "steps", p, 1)
        mb_ok = self.at_least(t, "micro_batch", p, 1, "micro_batch (sequences per forward)")
        if self.at_least(t, "global_batch", p, 1, "global_batch (sequences per optimizer step)") and mb_ok:
            lower = t.global_batch // t.micro_batch * t.micro_batch
            if t.global_batch % t.micro_batch:
                self.err(p + ("global_batch",), f"{t.global_batch} sequences cannot be made of whole micro-batches of "
                                                f"{t.micro_batch}: global_batch must be a multiple of micro_batch "
                                                f"(e.g. {lower or t.micro_batch} or {lower + t.micro_batch})",
                         also=(p + ("micro_batch",),))
        self.at_least(t, "seed", p, 0)
        o, op = t.optimizer, p + ("optimizer",)
        self.positive(o, "lr", op, "the learning rate")
        for i, b in enumerate(o.betas):
            if not 0 <= b < 1:
                self.err(op + ("betas", i), f"{b}: AdamW betas must be in [0, 1) (e.g. [0.9, 0.95])")
        self.positive(o, "eps", op, "AdamW eps")
        self.at_least(o, "weight_decay", op, 0)
        sc, sp = t.schedule, p + ("schedule",)
        self.at_least(sc, "warmup_steps", sp, 0)  # may exceed steps: a short smoke run (--set train.steps=50)
        if not 0 <= sc.min_lr_ratio <= 1:
            self.err(sp + ("min_lr_ratio",), f"{sc.min_lr_ratio}: the final lr is a fraction of the peak, so "
                                             "0 <= min_lr_ratio <= 1")
        self.positive(t, "grad_clip", p, "grad_clip (null = no clipping)", optional=True)
        for k in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            self.at_least(t, k, p, 1)

    def parallel(self) -> None:
        par, p, moe = self.spec.parallel, ("parallel",), self.spec.moe
        if self.at_least(par, "expert", p, 1, "expert parallelism E (1 = off)") and par.expert > 1:
            if moe is None:
                self.err(p + ("expert",), f"expert: {par.expert} splits the routed experts over ranks, but this model "
                                          "has none (moe: null); delete parallel.expert")
            elif moe.experts % par.expert:
                self.err(p + ("expert",), f"{moe.experts} experts cannot be split evenly over {par.expert} ranks "
                                          "(rank e holds experts [e*X/E, (e+1)*X/E), so moe.experts % expert must be "
                                          f"0); use expert in {divisors(moe.experts)}")
        if par.capacity_factor is not None:
            if moe is None:
                self.err(p + ("capacity_factor",), "a capacity factor limits the tokens per routed expert, but this "
                                                   "model has none (moe: null); delete it")
            self.positive(par, "capacity_factor", p, "capacity_factor (null = dropless)", optional=True)


def check(spec: Spec, origin: Origin | str = "<spec>") -> list[SpecError]:
    """All problems of ``spec`` (empty when valid)."""
    if isinstance(origin, str):
        origin = Origin(origin)
    return _Checker(spec, origin).run()


def validate(spec: Spec, origin: Origin | str = "<spec>") -> Spec:
    """Return ``spec`` unchanged, or raise ``SpecProblems`` listing every broken rule."""
    problems = check(spec, origin)
    if problems:
        raise SpecProblems(problems)
    return spec
