"""Helpers shared by the op tests (imported by name: the test folders have no __init__.py)."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (MATH.md §6 states its tolerances this way)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_opcheck(op, args) -> None:
    """torch.library.opcheck: schema, autograd registration, fake tensor, AOT dispatch all succeed."""
    results = torch.library.opcheck(op, args)
    assert all(r == "SUCCESS" for r in results.values()), results
