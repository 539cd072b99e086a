"""Assemble one raw spec mapping from files: ``extends:`` overlays and ``--set`` overrides.

``extends: base.yaml`` (or a list of files) is resolved relative to the file that says it.
Parents load first, in list order, each with its own ``extends`` chain; the child is merged on
top. A chain that comes back to a file already on it is an error naming the cycle.

Merge rule (``deep_merge``): mappings merge key by key, recursively; anything else (scalars,
lists, null) in the child replaces the parent's value. One exception keeps tagged unions sane:
a ``position`` (or ``router``) mapping whose ``kind`` differs from the parent's replaces it whole, so switching
a layer kind from ``grape-a`` to ``nope`` does not drag ``learnable`` along into a kind that has
no such key.

``--set a.b.c=value``: the value is parsed as YAML (``50``, ``1e-3``, ``true``, ``null``,
``[local, global]``, ``nope``), applied in command-line order. Setting ``...position.kind`` to a
different kind resets that position to ``{kind: new}`` (same reason as above). Unknown keys are
caught later, with a did-you-mean, by the typed conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spec.errors import SpecError
from spec.origin import Origin, dotted
from spec.yamlio import parse_scalar, parse_yaml

__all__ = ["read_spec_file", "deep_merge", "apply_overrides", "TAGGED_UNION_KEYS"]

TAGGED_UNION_KEYS = frozenset({"position", "router"})


def deep_merge(parent: Any, child: Any, key: str | None = None) -> Any:
    """Child over parent: mappings merge recursively, everything else replaces."""
    if not (isinstance(parent, dict) and isinstance(child, dict)):
        return child
    if key in TAGGED_UNION_KEYS and "kind" in child and child.get("kind") != parent.get("kind"):
        return dict(child)
    out = dict(parent)
    for k, v in child.items():
        out[k] = deep_merge(parent[k], v, k) if k in parent else v
    return out


def _read_mapping(path: Path, label: str, referrer: str | None) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if referrer:
            raise SpecError(referrer, "extends", f"file {str(path)!r} does not exist; `extends` paths are "
                                                 "relative to the file that writes them") from None
        raise SpecError(label, None, "no such spec file; check the path") from None
    except OSError as e:
        raise SpecError(label, None, f"cannot read the spec file: {e.strerror}") from None
    data = parse_yaml(text, label)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(label, None, f"a spec file must be a YAML mapping (key: value lines), not a "
                                     f"{type(data).__name__}; see examples/baseline.yaml")
    return data


def _load_chain(path: Path, label: str, origin: Origin, stack: tuple[Path, ...], referrer: str | None) -> dict:
    real = path.resolve()
    if real in stack:
        cycle = " -> ".join(p.name for p in stack + (real,))
        raise SpecError(referrer or label, "extends", f"`extends` cycle: {cycle}; a file cannot (indirectly) "
                                                      "extend itself: remove one of these `extends`")
    data = _read_mapping(path, label, referrer)
    parents = data.pop("extends", None)
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise SpecError(label, "extends", f"expected a file name or a list of file names, got {parents!r}")
    merged: dict = {}
    for p in parents:
        parent_path = (path.parent / p)
        parent_label = str(Path(label).parent / p) if not Path(p).is_absolute() else p
        merged = deep_merge(merged, _load_chain(parent_path, parent_label, origin, stack + (real,), label))
    origin.record(data, label)
    return deep_merge(merged, data)


def read_spec_file(path: str | Path) -> tuple[dict, Origin]:
    """Read ``path`` and its ``extends`` chain; return the merged mapping and who wrote what."""
    label = str(path)
    origin = Origin(label)
    return _load_chain(Path(path), label, origin, (), None), origin


def apply_overrides(data: dict, overrides: Sequence[str], origin: Origin) -> dict:
    """Apply ``--set key.path=value`` overrides in order (returns a new mapping)."""
    data = _copy(data)
    label = f"{origin.top} (--set)"
    for item in overrides:
        if "=" not in item:
            raise SpecError(label, item, "expected --set KEY=VALUE with a dotted key, e.g. --set train.steps=50")
        key, text = item.split("=", 1)
        key = key.strip()
        path = tuple(key.split("."))
        if not key or any(not p for p in path):
            raise SpecError(label, key or item, "empty key part; write dotted keys like attention.local.window=64")
        value = parse_scalar(text, label, key)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise SpecError(label, key, f"{dotted(path[:i + 1])} is a value ({nxt!r}), not a section; "
                                            f"set it directly: --set {dotted(path[:i + 1])}=...")
            node = nxt
        last = path[-1]
        if last == "kind" and len(path) >= 2 and path[-2] in TAGGED_UNION_KEYS and node.get("kind") != value:
            node.clear()
        node[last] = value
        origin.record({last: value}, label, path[:-1])
    return data


def _copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x
