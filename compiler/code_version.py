"""A fingerprint of the compiler's own source, folded into torch.compile's cache keys.

Inductor and AOTAutograd key their on-disk caches on the traced graph. Our block graphs call our ops
by name (``grapefx::expert_ffn``, ``grapefx::attention``); what those ops run -- their Python bodies
and the Triton kernels registered under other op names -- is not part of that key. Without a tag, a
warm cache kept across a change to grapefx hands back code compiled from the old version: the run
would time or train the previous kernels. ``tag_compile_caches()`` appends
``grapefx-<fingerprint>`` (16 hex digits of the sha256 over ``compiler/**/*.py``) to
``torch.compiler.config.cache_key_tag``, which both caches hash, keeping any tag the user set
(``TORCH_COMPILE_CACHE_KEY_TAG``).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

__all__ = ["source_fingerprint", "tag_compile_caches"]

_PACKAGE = Path(__file__).resolve().parent


def source_fingerprint(root: Path = _PACKAGE) -> str:
    """16 hex digits of the sha256 over every ``*.py`` below ``root``: relative path and bytes, in path order."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.cache
def _tag() -> str:
    return f"grapefx-{source_fingerprint()}"


def tag_compile_caches() -> str:
    """Add this compiler's fingerprint to ``torch.compiler.config.cache_key_tag`` (once); returns the tag."""
    ours = _tag()
    current = getattr(torch.compiler.config, "cache_key_tag", None)
    if current is None:                                  # a torch without the tag: nothing to add it to
        return ""
    if ours not in current:
        torch.compiler.config.cache_key_tag = f"{current}+{ours}" if current else ours
    return torch.compiler.config.cache_key_tag
