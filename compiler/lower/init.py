"""Parameter initialisation, seeded per parameter name and run seed.

Each tensor draws from its own generator, seeded by ``sha256(f"{seed}:{name}")``, so a
parameter's initial value depends only on (run seed, state-dict key, shape, scale): two spec
variants share identical initial values for every parameter they share, whatever else differs
(layer count aside from the names, positions, rank count), which is what a fair ablation needs.
"""

from __future__ import annotations

import hashlib
import math

import torch

from spec.schema import Spec


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a parameter's state-dict key."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Initializer:
    """Creates initial tensors (fp32, CPU) for the parameters of one model."""

    def __init__(self, spec: Spec):
        self.seed = spec.train.seed
        self.std = spec.model.init.std
        # GPT-2: residual output projections scaled by 1/sqrt(2 L) so the residual stream's
        # variance does not grow with depth.
        self.out_std = self.std / math.sqrt(2 * spec.model.n_layers) if spec.model.init.scaled_output else self.std

    def normal(self, name: str, shape: tuple[int, ...], *, output: bool = False) -> torch.Tensor:
        gen = torch.Generator().manual_seed(name_seed(self.seed, name))
        return torch.randn(shape, generator=gen, dtype=torch.float32) * (self.out_std if output else self.std)

    @staticmethod
    def ones(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.ones(shape, dtype=torch.float32)
