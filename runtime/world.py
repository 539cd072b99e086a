"""Where this process sits among data-parallel ranks: the trainer's one hook for distribution.

One process needs nothing: ``World()``. A distributed launcher builds one ``World`` per rank and
passes it to ``Trainer``; the trainer then

- samples rank ``rank`` of ``size``'s disjoint share of each global batch (``runtime.data.Sampler``),
- sums expert counts, token counts and evaluation sums with ``all_reduce`` (in place, returns the
  tensor: e.g. ``lambda t: (dist.all_reduce(t), t)[1]``),
- writes metrics, the run record and checkpoint markers on the ``coordinator`` (rank 0) only, with
  ``barrier`` around the collective checkpoint save.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["World"]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity)
    barrier: Callable[[], None] = field(default=_nothing)

    @property
    def coordinator(self) -> bool:
        return self.rank == 0
