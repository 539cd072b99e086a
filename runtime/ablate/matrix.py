"""The ablation matrix file: a baseline spec, variants that overlay it, seeds, evaluation settings.

    name: nope-global                 # optional (default: the file name without .yaml)
    baseline: baseline.yaml           # a spec file, relative to this file
    variants:                         # each an overlay of the baseline, merged like `extends:`
      baseline: {}
      nope-global:
        attention: {global: {position: {kind: nope}}}
      other: ablation-other.yaml      # or a spec file (relative to this file) that extends the baseline
    seeds: [1, 2, 3]                  # every variant trains once per seed (train.seed)
    shared:                           # optional overlay applied to every run, variants included
      train: {steps: 2000}
    eval:                             # optional; these are the defaults
      contexts: [1, 2, 4]             # evaluation lengths, multiples of data.seq_len; rows are max(contexts) long
      batches: 8                      # batches of rows
      batch_size: null                # rows per batch (null: train.micro_batch)
      seed: 0                         # which validation rows: the same rows for every run
      buckets: 48                     # loss-by-position buckets (at most)
      spacing: log                    # bucket spacing: log or linear
    (runtime/evaluation: one pass over the rows scores every position; see its docstrings)

The spec of run (variant v, seed k) is assembled in this order, later wins:

    baseline file (with its extends chain) ⊕ v's inline overlay      (inline variant)
    v's file (with its extends chain)                                (file variant)
      ⊕ shared ⊕ the command line's --set ⊕ {train.seed: k, name: "<v>-seed<k>", output: null}

Fairness check (``check_variants``): flatten the resolved specs to dotted keys; the keys where a
variant's spec differs from the baseline's (the same assembly without a variant) must all be keys
the variant declares, where a declared key covers itself, everything under it, and for a tagged
union (``position.kind``) the whole ``position`` it replaces. Otherwise the comparison would
measure something the matrix does not say, so ``grapefx ablate`` refuses and lists the keys. A
variant may not declare a key that ``shared`` or ``--set`` also sets (they would win, silently
undoing it), and a non-empty overlay that changes nothing is refused too.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from runtime.evaluation.core import EvalSettings
from spec.compose import TAGGED_UNION_KEYS, apply_overrides, deep_merge, read_spec_file
from spec.convert import to_dict
from spec.errors import SpecError
from spec.load import dump_spec, spec_from_mapping
from spec.schema import Spec
from spec.validate import SpecProblems
from spec.yamlio import parse_yaml

__all__ = ["Matrix", "Run", "Variant", "EvalSettings", "Change", "ABSENT", "load_matrix", "run_spec", "run_name",
           "flatten", "spec_diff", "covers", "check_variants", "saved_spec_changes"]

TOP_KEYS = ("name", "baseline", "variants", "seeds", "shared", "eval")
EVAL_KEYS = ("contexts", "batches", "batch_size", "seed", "buckets", "spacing")
# keys ablate sets per run: never part of an overlay, never part of the diff
RUN_KEYS = ("name", "output", "train.seed")
# spec.load's sugar: giving model.layer_kinds turns model.global_every to null
COUPLED = {"model.layer_kinds": ("model.global_every",)}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Variant:
    name: str
    overlay: dict            # what the variant declares: its inline overlay, or its file's own keys
    file: Path | None        # a file variant's spec file (None: an inline overlay of the baseline)
    label: str               # where the overlay is written, for messages

    def declared(self) -> list[str]:
        return [k for k in flatten(self.overlay) if not _is_run_key(k)]


@dataclass(frozen=True)
class Matrix:
    file: str                # as given (messages name it)
    name: str
    baseline: Path
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    shared: dict
    eval: EvalSettings

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


@dataclass(frozen=True)
class Run:
    """One (variant, seed) run of a matrix: its resolved spec and its run folder."""
    variant: str
    seed: int
    spec: Spec
    folder: Path

    @property
    def name(self) -> str:
        return run_name(self.variant, self.seed)


ABSENT = "(absent)"  # the value of a key one of two compared specs does not have


@dataclass(frozen=True)
class Change:
    """One key where a variant's resolved spec differs from the baseline's (``ABSENT``: no such key)."""
    key: str
    baseline: Any
    variant: Any

    def __str__(self) -> str:
        return f"{self.key} ({_short(self.baseline)} -> {_short(self.variant)})"


# ---------------------------------------------------------------------- reading the file
def is_matrix_file(path: str | Path) -> bool:
    """Whether ``path`` reads as an ablation matrix (a top-level ``variants:``) rather than a spec."""
    try:
        data = parse_yaml(Path(path).read_text(encoding="utf-8"), str(path))
    except (OSError, SpecError):
        return False          # unreadable or broken YAML: the spec loader reports it properly
    return isinstance(data, dict) and "variants" in data


def load_matrix(path: str | Path) -> Matrix:
    """Read and check a matrix file; errors are ``SpecError`` as ``FILE: key.path: message``."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, None, "no such matrix file; check the path (see examples/ablation.yaml)") from None
    except OSError as e:
        raise SpecError(file, None, f"cannot read the matrix file: {e.strerror}") from None
    data = parse_yaml(text, file)
    if not isinstance(data, dict):
        raise SpecError(file, None, "a matrix file must be a YAML mapping with baseline, variants and seeds; "
                                    "see examples/ablation.yaml")
    for key in data:
        if key not in TOP_KEYS:
            raise SpecError(file, str(key), f"unknown key{_did_you_mean(key, TOP_KEYS)}; a matrix has "
                                            f"{', '.join(TOP_KEYS)}")
    for key in ("baseline", "variants", "seeds"):
        if key not in data:
            raise SpecError(file, key, f"missing; a matrix needs {key} (see examples/ablation.yaml)")
    here = Path(path).parent
    name = data.get("name", Path(path).stem)
    if not (isinstance(name, str) and name):
        raise SpecError(file, "name", f"expected a non-empty string, got {name!r}")
    baseline = data["baseline"]
    if not (isinstance(baseline, str) and baseline):
        raise SpecError(file, "baseline", f"expected the path of a spec file, got {baseline!r}")
    if not (here / baseline).is_file():
        raise SpecError(file, "baseline", f"file {str(here / baseline)!r} does not exist; the path is relative to "
                                          "the matrix file")
    shared = data.get("shared") or {}
    if not isinstance(shared, dict):
        raise SpecError(file, "shared", f"expected a spec overlay (a mapping like train: {{steps: 100}}), "
                                        f"got {shared!r}")
    if "extends" in shared:
        raise SpecError(file, "shared.extends", "shared is an overlay applied to every run; the spec it applies to "
                                                "is the baseline (or a file variant's own file)")
    _check_overlay(shared, file, "shared")
    return Matrix(file, name, here / baseline, _variants(data["variants"], file, here), _seeds(data["seeds"], file),
                  shared, _eval(data.get("eval"), file))


def _variants(raw: Any, file: str, here: Path) -> tuple[Variant, ...]:
    if not (isinstance(raw, dict) and raw):
        raise SpecError(file, "variants", "expected a mapping of variant names to overlays, e.g. {baseline: {}, "
                                          "nope-global: {attention: {global: {position: {kind: nope}}}}}")
    out = []
    for name, value in raw.items():
        key = f"variants.{name}"
        if not (isinstance(name, str) and _NAME.match(name)):
            raise SpecError(file, key, "a variant name becomes a folder name: use letters, digits, '-', '_' and "
                                       "'.', starting with a letter or digit")
        if value is None or isinstance(value, dict):
            overlay = value or {}
            if "extends" in overlay:
                raise SpecError(file, f"{key}.extends", "an inline overlay always applies to the baseline; to "
                                                        "base a variant on another spec file give its path: "
                                                        f"{name}: FILE.yaml")
            _check_overlay(overlay, file, key)
            out.append(Variant(name, overlay, None, f"{file} ({key})"))
        elif isinstance(value, str) and value:
            vfile = here / value
            if not vfile.is_file():
                raise SpecError(file, key, f"file {str(vfile)!r} does not exist; the path is relative to the "
                                           "matrix file")
            own = parse_yaml(vfile.read_text(encoding="utf-8"), str(vfile)) or {}
            if not isinstance(own, dict):
                raise SpecError(str(vfile), None, "a spec file must be a YAML mapping")
            out.append(Variant(name, {k: v for k, v in own.items() if k != "extends"}, vfile, str(vfile)))
        else:
            raise SpecError(file, key, f"expected an overlay mapping ({{}} for the baseline itself) or a spec file "
                                       f"path, got {value!r}")
    return tuple(out)


def _check_overlay(overlay: dict, file: str, key: str) -> None:
    for k in flatten(overlay):
        if _is_run_key(k):
            what = ("the seed of each run comes from the matrix's seeds" if k == "train.seed" else
                    "ablate names each run <variant>-seed<k> and places it under --out DIR/runs")
            raise SpecError(file, f"{key}.{k}", f"{what}; remove this key")


def _seeds(raw: Any, file: str) -> tuple[int, ...]:
    ok = (isinstance(raw, list) and raw and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw))
    if not ok:
        raise SpecError(file, "seeds", f"expected a non-empty list of integers >= 0, e.g. [1, 2, 3], got {raw!r}")
    if len(set(raw)) != len(raw):
        raise SpecError(file, "seeds", f"{raw}: a seed is listed twice; each seed is one run per variant")
    return tuple(raw)


def _eval(raw: Any, file: str) -> EvalSettings:
    if raw is None:
        return EvalSettings()
    if not isinstance(raw, dict):
        raise SpecError(file, "eval", f"expected a mapping with {', '.join(EVAL_KEYS)}, got {raw!r}")
    for key in raw:
        if key not in EVAL_KEYS:
            raise SpecError(file, f"eval.{key}", f"unknown key{_did_you_mean(key, EVAL_KEYS)}; eval has "
                                                 f"{', '.join(EVAL_KEYS)}")
    d = EvalSettings()
    contexts = raw.get("contexts", list(d.contexts))
    if not (isinstance(contexts, list) and contexts and all(_int(c) and c >= 1 for c in contexts)):
        raise SpecError(file, "eval.contexts", f"expected a non-empty list of positive integers (multiples of "
                                               f"data.seq_len), e.g. [1, 2, 4], got {contexts!r}")
    if len(set(contexts)) != len(contexts):
        raise SpecError(file, "eval.contexts", f"{contexts}: a context is listed twice")
    batches = raw.get("batches", d.batches)
    if not (_int(batches) and batches >= 1):
        raise SpecError(file, "eval.batches", f"expected an integer >= 1, got {batches!r}")
    batch_size = raw.get("batch_size", d.batch_size)
    if batch_size is not None and not (_int(batch_size) and batch_size >= 1):
        raise SpecError(file, "eval.batch_size", f"expected an integer >= 1 or null (train.micro_batch), "
                                                 f"got {batch_size!r}")
    seed = raw.get("seed", d.seed)
    if not (_int(seed) and seed >= 0):
        raise SpecError(file, "eval.seed", f"expected an integer >= 0, got {seed!r}")
    buckets = raw.get("buckets", d.buckets)
    if not (_int(buckets) and buckets >= 1):
        raise SpecError(file, "eval.buckets", f"expected an integer >= 1 (loss-by-position buckets), got {buckets!r}")
    spacing = raw.get("spacing", d.spacing)
    if spacing not in ("log", "linear"):
        raise SpecError(file, "eval.spacing", f"expected log or linear, got {spacing!r}")
    return EvalSettings(tuple(sorted(contexts)), batches, batch_size, seed, buckets, spacing)


# ---------------------------------------------------------------------- assembling run specs
def run_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def run_spec(matrix: Matrix, variant: Variant | None, seed: int, overrides: Sequence[str] = ()) -> Spec:
    """The resolved spec of one run; ``variant=None`` is the baseline (no overlay) the diff compares against."""
    if variant is not None and variant.file is not None:
        data, origin = read_spec_file(variant.file)
    else:
        data, origin = read_spec_file(matrix.baseline)
        if variant is not None:
            origin.record(variant.overlay, variant.label)
            data = deep_merge(data, variant.overlay)
    if matrix.shared:
        origin.record(matrix.shared, f"{matrix.file} (shared)")
        data = deep_merge(data, matrix.shared)
    data = apply_overrides(data, overrides, origin)
    per_run = {"name": run_name(variant.name if variant else "baseline", seed), "output": None, "train": {"seed": seed}}
    origin.record(per_run, f"{matrix.file} (seeds)")
    return spec_from_mapping(deep_merge(data, per_run), origin)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves; an empty mapping has no keys."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _is_run_key(key: str) -> bool:
    return any(covers(r, key) for r in RUN_KEYS)


def spec_diff(a: Spec, b: Spec) -> list[Change]:
    """Dotted keys where two resolved specs differ (run keys excluded), sorted."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return [Change(k, fa.get(k, ABSENT), fb.get(k, ABSENT)) for k in sorted(set(fa) | set(fb))
            if not _is_run_key(k) and (k not in fa or k not in fb or fa[k] != fb[k])]


def covers(declared: str, key: str) -> bool:
    """Whether declaring ``declared`` accounts for a change of ``key`` (itself, below it, a replaced union)."""
    if key == declared or key.startswith(declared + "."):
        return True
    parts = declared.split(".")
    if parts[-1] == "kind" and len(parts) >= 2 and parts[-2] in TAGGED_UNION_KEYS:
        return key.startswith(".".join(parts[:-1]) + ".")
    return any(covers(c, key) for c in COUPLED.get(declared, ()))


def check_variants(matrix: Matrix, overrides: Sequence[str] = ()) -> dict[str, list[Change]]:
    """Each variant's changes against the baseline; raises ``SpecProblems`` listing every unfair variant."""
    seed = matrix.seeds[0]              # the seed is set identically everywhere, so one seed checks them all
    reference = run_spec(matrix, None, seed, overrides)
    set_keys = [o.split("=", 1)[0].strip() for o in overrides]
    shared_keys = list(flatten(matrix.shared))
    diffs, problems = {}, []
    for v in matrix.variants:
        declared = v.declared()
        where, key = matrix.file, f"variants.{v.name}"
        before = len(problems)
        for d in declared:
            for source, keys in (("shared", shared_keys), ("--set", set_keys)):
                hit = next((s for s in keys if covers(s, d) or covers(d, s)), None)
                if hit is not None:
                    problems.append(SpecError(where, key, f"declares {d}, which {source} also sets ({hit}); {source} "
                                                          "wins, so this variant would not differ there: set it in "
                                                          "one place only"))
        changes = spec_diff(reference, run_spec(matrix, v, seed, overrides))
        extra = [c for c in changes if not any(covers(d, c.key) for d in declared)]
        if extra:
            base = f"{v.name} ({v.label})" if v.file is not None else v.name
            problems.append(SpecError(where, key, f"variant {base} differs from the baseline "
                                                  f"{matrix.baseline.name} in {len(extra)} key(s) it does not "
                                                  f"declare: {_list(extra)}; a variant may differ only where its "
                                                  "overlay says so (did it extend another file, or set something the "
                                                  "others do not?)"))
        elif declared and not changes and len(problems) == before:   # (an overlap above already explains it)
            problems.append(SpecError(where, key, f"variant {v.name} declares {', '.join(declared)} but resolves "
                                                  "to the baseline's spec (every value equals the baseline's); "
                                                  "change a value or drop the variant"))
        diffs[v.name] = changes
    if problems:
        raise SpecProblems(problems)
    return diffs


def saved_spec_changes(saved_text: str, spec: Spec, label: str) -> list[Change]:
    """Keys where a run folder's ``spec.resolved.yaml`` differs from ``spec`` (run keys included)."""
    if saved_text == dump_spec(spec):
        return []
    saved = flatten(parse_yaml(saved_text, label) or {})
    now = flatten(to_dict(spec))
    return [Change(k, saved.get(k, ABSENT), now.get(k, ABSENT)) for k in sorted(set(saved) | set(now))
            if k not in saved or k not in now or saved[k] != now[k]]


# ---------------------------------------------------------------------- small helpers
def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _did_you_mean(key: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _list(changes: list[Change], limit: int = 12) -> str:
    shown = ", ".join(str(c) for c in changes[:limit])
    return shown + (f", and {len(changes) - limit} more" if len(changes) > limit else "")
