"""Small helpers shared by the op families."""

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the ops do their fp32 math in: fp32, or fp64 when any input is fp64.

    MATH.md §6 keeps angles, biases, softmax statistics and router scores in fp32; fp64 inputs
    (gradcheck, the relative-law test) keep fp64 so the references stay exact to ~1e-12.
    """
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def expert_sort_keys(ids: torch.Tensor, experts: int) -> torch.Tensor:
    """Expert ids in ``[0, experts)`` as the narrowest integer type that holds them (uint8 up to 256
    experts), to sort by: a GPU radix sort makes one pass per key byte (eight for int64 ids), and a
    stable sort of the narrow keys gives the same order. Not for indexing (a uint8 index is a mask)."""
    return ids.to(torch.uint8 if experts <= 256 else torch.int16 if experts <= 2**15 else torch.int32)
