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
