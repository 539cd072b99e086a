"""Spec fields with their documentation: ``f(default, doc)``, and ``doc_of`` to read it back."""

from __future__ import annotations

from dataclasses import MISSING, field, fields
from typing import Any

__all__ = ["f", "doc_of"]


def f(default: Any = MISSING, doc: str = "", *, factory: Any = MISSING, most: int | None = None):
    """A dataclass field with its documentation in metadata (shown by errors and describe).

    ``most`` bounds a size field from above (``spec.validate`` checks it before any rule that
    loops over a size, so validating costs the same whatever the values).
    """
    meta = {"doc": doc, "most": most}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def doc_of(cls: type, name: str) -> str:
    for fl in fields(cls):
        if fl.name == name:
            return fl.metadata.get("doc", "")
    return ""
