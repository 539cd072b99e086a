"""The window rule, written once (MATH.md §1): which keys a query may read.

    query i may read key j  iff  0 <= i - j <= W - 1     (W keys, counting itself)
    W = 0 or None: causal only (0 <= i - j)

Every Python site asks ``blocked`` (the lowering, the pass that recognises the mask, the op's
reference, the KV-cache decoder, the bench's reference and flex masks); the Triton kernel has
its own ``_visible`` (``compiler/kernels/_attention_triton.py``), which
``tests/compiler/test_window.py`` holds to this one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["blocked", "visible"]


def _call(name: str, fn: Callable, *args: Any) -> Any:
    return fn(*args)


def blocked(i_minus_j: Any, window: int | None, call: Callable = _call) -> Any:
    """True where query i may NOT read key j, from ``i_minus_j`` = i - j (any shape, ints or integral floats).

    ``call(name, fn, *args)`` applies each step: by default the function itself (tensors in, a bool
    tensor out); the lowering passes its ``GraphBuilder`` so the same steps become named graph nodes
    (``attn_future``, ``attn_outside_window``, ``attn_blocked``).
    """
    out = call("attn_future", torch.lt, i_minus_j, 0)
    if window:
        out = call("attn_blocked", torch.logical_or, out, call("attn_outside_window", torch.ge, i_minus_j, window))
    return out


def visible(i_minus_j: Any, window: int | None) -> Any:
    """The complement of ``blocked``: True where query i may read key j."""
    return torch.logical_not(blocked(i_minus_j, window))
