"""The spec pipeline: YAML file -> merged (``extends``) -> overridden (``--set``) -> typed -> validated.

Public:
- ``load_spec(path, overrides=())``: the whole pipeline for a file.
- ``spec_from_dict(d, file="<dict>")``: the same from an in-memory mapping (no ``extends``).
- ``spec_from_mapping(data, origin)``: the typed, validated step for a mapping assembled from
  several files with ``spec.compose`` (``grapefx ablate`` builds one per run); errors name the
  file ``origin`` charges each key to.
- ``dump_spec(spec)``: the resolved YAML (every value written out), which loads back to an equal
  ``Spec``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spec.compose import apply_overrides, read_spec_file
from spec.convert import from_dict, to_dict
from spec.errors import SpecError
from spec.origin import Origin
from spec.schema import Spec
from spec.validate import validate
from spec.yamlio import dump_yaml

__all__ = ["load_spec", "spec_from_dict", "spec_from_mapping", "dump_spec"]


def _sugar(data: dict) -> dict:
    """A mapping that gives ``model.layer_kinds`` and no ``model.global_every`` means ``global_every: null``."""
    model = data.get("model")
    if isinstance(model, dict) and model.get("layer_kinds") is not None and "global_every" not in model:
        data = dict(data)
        data["model"] = dict(model, global_every=None)
    return data


def _typed(data: Any, origin: Origin) -> Spec:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(origin.top, None, f"a spec must be a mapping of sections, got {type(data).__name__}")
    if "extends" in data:
        raise SpecError(origin.file_of(("extends",)), "extends",
                        "`extends` is resolved when loading a file (spec.load_spec); a mapping cannot extend")
    return validate(from_dict(_sugar(data), origin), origin)


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Load, merge, override, type-check and validate the spec at ``path``."""
    data, origin = read_spec_file(path)
    if overrides:
        data = apply_overrides(data, overrides, origin)
    return _typed(data, origin)


def spec_from_dict(d: dict, file: str = "<dict>") -> Spec:
    """Type-check and validate a raw mapping (YAML-shaped: key ``global``, lists, nested mappings)."""
    origin = Origin(file)
    origin.record(d, file)
    return _typed(d, origin)


def spec_from_mapping(data: dict, origin: Origin) -> Spec:
    """Type-check and validate a mapping already merged from files (``extends`` resolved, overrides applied)."""
    return _typed(data, origin)


def dump_spec(spec: Spec) -> str:
    """Resolved YAML of ``spec`` (all defaults written out); ``spec_from_dict`` of it gives ``spec`` back."""
    return dump_yaml(to_dict(spec))
