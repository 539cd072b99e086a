"""The window rule (compiler/window.py), by hand, and the Triton kernel's own copy held to it."""

import pytest
import torch

from compiler.window import blocked, visible


def test_blocked_by_hand():
    # i - j for i = 3 and keys j = 0..5: 3, 2, 1, 0, -1, -2
    d = torch.tensor([3, 2, 1, 0, -1, -2])
    assert blocked(d, None).tolist() == [False, False, False, False, True, True]       # causal
    assert blocked(d, 0).tolist() == [False, False, False, False, True, True]          # 0 = causal too
    assert blocked(d, 2).tolist() == [True, True, False, False, True, True]            # W = 2: keys 2, 3
    assert blocked(d, 1).tolist() == [True, True, True, False, True, True]             # W = 1: itself only
    assert visible(d, 3).tolist() == [False, True, True, True, False, False]           # keys 1..3
    assert blocked(d.float(), 2).tolist() == blocked(d, 2).tolist()                    # integral floats alike


def test_the_lowering_writes_the_same_steps_as_graph_nodes():
    steps = []
    blocked("rel", 4, call=lambda name, fn, *a: steps.append((name, fn, a)) or name)
    assert steps == [("attn_future", torch.lt, ("rel", 0)), ("attn_outside_window", torch.ge, ("rel", 4)),
                     ("attn_blocked", torch.logical_or, ("attn_future", "attn_outside_window"))]


@pytest.mark.parametrize("window", [0, 1, 3, 7])
def test_the_triton_kernel_visibility_is_the_same_rule(window):
    kernel = pytest.importorskip("compiler.kernels._attention_triton")
    d = torch.arange(-9, 10)[:, None] - torch.zeros(1, 1, dtype=torch.long)           # i - j from -9 to 9
    # the jitted function's Python body, run on torch tensors: the kernel calls it with CAUSAL always
    ok = kernel._visible.fn(d, window, True, window > 0)
    assert torch.equal(ok, visible(d, window))
