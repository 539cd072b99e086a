"""Megatron-LM recipes <-> grapefx specs (MATH.md §1).

``from_megatron(flags, strict=False) -> (spec mapping, warnings)`` reads an argv-style recipe;
``to_megatron(spec) -> flags`` writes one. ``import_megatron`` returns the full result (also the
Megatron defaults the recipe relied on, which ``grapefx from-megatron`` writes into the YAML).

Semantics, as Megatron (and the vpMoE fork that carries the GRAPE flags) runs them:

- Layers are counted from 1. ``--window-size a,b`` (or ``(a,b)``) lets query i see keys
  i-a..i+b: W = a + 1 keys including the current one (``127,0`` = the baseline's W = 128); only
  b = 0 (causal) is accepted. Without ``--window-size`` every layer is full attention.
- ``--window-attn-skip-freq N``: layer l is full attention (global) iff l % N == 0. List form:
  one entry per layer, **1 = sliding window (local)**, 0 = full attention.
- ``--no-rope-freq N``: layer l skips the rotation iff l % N == 0 (Megatron requires
  L % N == 0). List form: **1 = skip the rotation** (the global layers, by the position rule).
  The two list forms have *opposite polarity*: the same list passed to both flags inverts the
  layer plan; the importer detects a recipe whose no-rope layers are not its global layers.
- ``--grape-a``: ALiBi slopes on the non-window (global) layers. ``--grapem-per-head`` is
  refused under GQA: a query head and the key head it reads would turn by different angles,
  which breaks the relative law (MATH.md §2).
- ``--moe-router-pre-softmax`` with the sigmoid score function does nothing in Megatron: the
  importer drops it with a warning (a YAML spec may not say it).

Patterns are parsed by ``spec.megatron.patterns`` (never ``eval``). Flags that do not change the math are
listed as ignored; flags that do and cannot be expressed are warnings, errors with ``strict``.

``spec.megatron.flags`` holds the flag tables and Megatron's defaults, ``spec.megatron.importer``
the importer and ``spec.megatron.exporter`` the exporter.
"""

from spec.megatron.exporter import megatron_notes, to_megatron
from spec.megatron.importer import MegatronImport, from_megatron, import_megatron

__all__ = ["from_megatron", "import_megatron", "to_megatron", "megatron_notes", "MegatronImport"]
