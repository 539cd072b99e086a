"""The deterministic, resumable, rank-sharded batch sampler.

Packing (Megatron's default, no cross-document masking): each source's stream is its documents
back to back, each ending with the end-of-document id (stored that way on disk). The stream of n
tokens is cut into R = (n - 1) // T rows of T + 1 tokens that overlap by one token:

    row r = stream[r*T : r*T + T + 1],   inputs = row[:-1],   targets = row[1:]

so every token but the first is a target exactly once per pass, and at most T - 1 tail tokens per
stream are unused. Row boundaries are fixed; only the order of rows changes between epochs.

Order: the global row sequence is epoch 0's slots, then epoch 1's, ... (an epoch is the N rows of
the blend, `runtime.data.blend`); a source's rows come from a permutation drawn, per pass, from
numpy's PCG64 seeded with SeedSequence([seed, source, pass]). Because every permutation is
re-derived from (seed, source, pass), the sampler's whole state is three ints: epoch, position
(next slot within the epoch) and seed. That is what `state_dict` holds; it survives `torch.save`
/ `torch.load(weights_only=True)` and `torch.distributed.checkpoint`, and loading it continues
the sequence exactly.

Ranks: a global batch is the next B * world rows of the sequence; rank r takes rows
r*B .. (r+1)*B - 1 of it, so the ranks' batches are disjoint and together equal the world = 1
batch of B * world rows. All ranks advance by B * world, so their states stay equal.
A batch that crosses the end of an epoch takes the rest of it and the start of the next.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from runtime.data.blend import Split, blend_schedule
from runtime.data.errors import DataError
from runtime.data.indexed import IndexedDataset

__all__ = ["Sampler"]


class Sampler:
    def __init__(self, dataset: Split | IndexedDataset, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        if isinstance(dataset, IndexedDataset):
            dataset = Split("data", (dataset,), (1.0,))
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..world-1 (world {world})")
        if seed < 0:
            raise DataError(f"train.seed: {seed} must be >= 0 (it seeds the data order)")
        self.split, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.rows = [(p.num_tokens - 1) // seq_len for p in dataset.parts]  # R_d per source
        for name, part, r in zip(dataset.names, dataset.parts, self.rows):
            if r == 0:
                raise DataError(f"{dataset.name} split of {name}: {part.num_tokens} tokens cannot fill one row of "
                                f"seq_len + 1 = {seq_len + 1} tokens; lower data.seq_len or add text")
        self.source, self.draw, self.per_epoch = blend_schedule(self.rows, dataset.weights)
        self.rows_per_epoch = int(sum(self.rows))
        self.epoch, self.position = 0, 0
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def distinct_rows(self) -> int:
        """How many rows the order starts with before any row comes again: all of an epoch's N, unless
        a blend weight above a source's share repeats its rows sooner (upsampling)."""
        again = np.flatnonzero(self.draw >= np.asarray(self.rows)[self.source])
        return int(again[0]) if len(again) else self.rows_per_epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (inputs, targets), each (B, T) int64; advances by the global batch.

        Two tensors of their own memory, so a caller may write into one (the evaluation blanks
        targets with -100) without changing the other. Slices of the one (B, T+1) array would not
        be: at B = 1 ``.contiguous()`` returns them as they are (a size-1 dimension's stride does
        not count), views that overlap by T - 1 tokens."""
        B, N = self.batch_size, self.rows_per_epoch
        first = self.epoch * N + self.position + self.rank * B  # global row index of this rank's row 0
        rows = np.stack([self._row(first + i) for i in range(B)]).astype(np.int64)  # (B, T+1)
        self.position += B * self.world
        self.epoch += self.position // N
        self.position %= N
        x = torch.from_numpy(rows)  # (B, T+1)
        return x[:, :-1].clone(), x[:, 1:].clone()  # (B, T), (B, T)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rows_per_epoch": self.rows_per_epoch}

    def load_state_dict(self, state: Mapping[str, int | torch.Tensor]) -> None:
        missing = {"epoch", "position", "seed", "rows_per_epoch"} - set(state)
        if missing:
            raise DataError(f"sampler state lacks {sorted(missing)}; the checkpoint is not from this grapefx")
        epoch, position, seed, rows = (int(state[k]) for k in ("epoch", "position", "seed", "rows_per_epoch"))
        if rows != self.rows_per_epoch:
            raise DataError(f"sampler state is for {rows} rows per epoch but the {self.split.name} split has "
                            f"{self.rows_per_epoch} at seq_len {self.seq_len}; the data, its weights or "
                            "data.seq_len changed since the checkpoint")
        if not (0 <= position < rows and epoch >= 0 and seed >= 0):
            raise DataError(f"sampler state epoch={epoch} position={position} seed={seed} is out of range "
                            f"(position must be in 0..{rows - 1}); the checkpoint is corrupt")
        self.epoch, self.position, self.seed = epoch, position, seed
        self._perms.clear()

    def _row(self, g: int) -> np.ndarray:
        """Tokens of global row g: (T+1,) in the stream's dtype."""
        epoch, slot = divmod(g, self.rows_per_epoch)
        d = int(self.source[slot])
        k = epoch * int(self.per_epoch[d]) + int(self.draw[slot])  # k-th draw from source d overall
        p, i = divmod(k, self.rows[d])
        r = int(self._perm(d, p)[i])
        return self.split.parts[d].tokens[r * self.seq_len:(r + 1) * self.seq_len + 1]

    def _perm(self, d: int, p: int) -> np.ndarray:
        key = (d, p)
        if key not in self._perms:
            if len(self._perms) >= 4 * len(self.rows):  # a batch touches at most two passes per source
                self._perms.clear()
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, d, p])))
            self._perms[key] = rng.permutation(self.rows[d])
        return self._perms[key]
