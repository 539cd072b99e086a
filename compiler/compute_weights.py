"""Weights cast to the compute dtype once per optimizer step, not once per micro-batch.

Every block graph casts its fp32 master weights where it uses them (``w_c = w.to(bf16)``,
``compiler.lower.common.weight``). With several micro-batches per optimizer step that cast runs in
every forward, and its backward in every backward: the bf16 gradient ``g_m`` is cast to a new fp32
tensor, which autograd then adds into ``w.grad``. Per parameter and micro-batch (after the first)
that is 6 B (forward cast) + 6 B (gradient cast) + 12 B (fp32 add) of memory traffic.

``ComputeWeights`` keeps one compute-dtype copy ``w_c`` of each such weight and the runners pass the
graphs ``w_c`` in place of ``w`` (their cast is then the identity). A gradient hook on ``w_c`` adds
each micro-batch's gradient into the fp32 ``w.grad`` in one pass:

    when w changed (optimizer step, load):   w_c = w.to(bf16)                          once per step
    after micro-batch m's backward:          w.grad = float(g_m)  (no w.grad yet)
                                             w.grad += g_m        (fp32 += bf16, in place)
                                             w_c.grad = None

The sum is Σ_m float(g_m), in the order autograd would add them: the same fp32 gradients, bit for
bit (tests/compiler/test_compute_weights.py). Traffic per parameter and micro-batch after the first:
2 B + 8 B instead of 24 B. Cost: the copies stay allocated (2 B per parameter in bf16).

Only weights whose every use in a graph is that cast are copied (attention, shared experts, LM
head), and the experts' weights, whose only use is the expert op, which does the same cast inside;
the fp32 ones (norm weights, the router, GRAPE-M frequencies) and buffers are passed as before.
When is a copy stale? Before each forward the model compares every master's identity and version
counter with those of its last cast (``load_state_dict``, ``assign=True`` or not, and ordinary
in-place ops change one of them); but the fused AdamW kernel writes the parameters without bumping
their version counters, so an optimizer must be ``watch``-ed: each of its steps marks every copy
stale. The copies keep one address for the whole run, so Inductor's CUDA graphs take them as static
inputs, and the gradients they produce are consumed inside the backward, before any replay can
overwrite them.

One process only: under DDP / FSDP2 the masters receive no gradient through autograd, which their
reducers wait for; ``runtime`` turns this on only there (and only with several micro-batches).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx, nn

import compiler.ops  # noqa: F401  (registers torch.ops.grapefx)


def cast_weight_inputs(stateless: fx.GraphModule, names: list[str], module: nn.Module,
                       compute: torch.dtype) -> list[int]:
    """Positions among ``stateless``'s first ``len(names)`` inputs (``compiler.pipeline.lift_state``) of
    the parameters the graph only ever uses in ``compute``: ``w.to(compute)``, or a weight of the expert
    op, which rounds its weights to its input's dtype itself (``compiler.ops.experts``), at every use."""
    params = dict(module.named_parameters())
    inputs = [n for n in stateless.graph.nodes if n.op == "placeholder"][:len(names)]
    return [i for i, (node, name) in enumerate(zip(inputs, names))
            if name in params and params[name].dtype != compute and node.users
            and all(_casts(u, compute) or _expert_weight(u, node) for u in node.users)]


def _casts(use: fx.Node, compute: torch.dtype) -> bool:
    return use.op == "call_method" and use.target == "to" and use.args[1:] == (compute,) and not use.kwargs


def _expert_weight(use: fx.Node, node: fx.Node) -> bool:
    """``node`` is only a weight (w_gate, w_up, w_down) of this expert op call, not its rows or gates."""
    return (use.op == "call_function" and use.target in _EXPERT_OPS and node in use.args[3:6]
            and node not in use.args[:3] and not use.kwargs)


_EXPERT_OPS = (torch.ops.grapefx.expert_ffn, torch.ops.grapefx.expert_ffn.default)


class ComputeWeights:
    """The compute-dtype copies of a model's cast-only weights (module docstring)."""

    def __init__(self, compute: torch.dtype):
        self.compute = compute
        self._slots: list[tuple[nn.Module, str]] = []           # (owner module, parameter name): the master
        self._index: dict[tuple[int, str], int] = {}            # (id(owner), name) -> slot
        self.copies: list[torch.Tensor] = []                    # the compute-dtype leaf tensor of each slot
        self._seen: list[tuple[int, int] | None] = []           # (id, version) of the master at the last copy

    def copy_of(self, owner: nn.Module, leaf: str) -> torch.Tensor:
        """The copy of ``owner._parameters[leaf]`` (made on first request, one per master)."""
        if (id(owner), leaf) in self._index:
            return self.copies[self._index[id(owner), leaf]]
        master = owner._parameters[leaf]
        copy = torch.empty_like(master, dtype=self.compute, requires_grad=True)
        if master.is_cuda:      # one address all run: Inductor's CUDA graphs read it in place
            torch._dynamo.mark_static_address(copy)
        copy.register_post_accumulate_grad_hook(self._add_to_master(len(self._slots)))
        self._index[id(owner), leaf] = len(self._slots)
        self._slots.append((owner, leaf))
        self.copies.append(copy)
        self._seen.append(None)
        return copy

    def nbytes(self) -> int:
        """The memory the copies hold."""
        return sum(c.numel() * c.element_size() for c in self.copies)

    def masters(self) -> list[nn.Parameter]:
        return [o._parameters[name] for o, name in self._slots]

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Mark every copy stale after each step of ``optimizer`` (its fused kernel leaves no other trace)."""
        optimizer.register_step_post_hook(lambda *_: self.mark_stale())

    def mark_stale(self) -> None:
        self._seen = [None] * len(self._seen)

    @torch.no_grad()
    def refresh(self) -> int:
        """Re-cast every copy whose master changed since its last cast; returns how many were cast."""
        masters, stale = self.masters(), []
        for i, master in enumerate(masters):
            now = (id(master), master._version)
            if self._seen[i] != now:
                stale.append(i)
                self._seen[i] = now
        if stale:
            torch._foreach_copy_([self.copies[i] for i in stale], [masters[i] for i in stale])
        return len(stale)

    def _add_to_master(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(copy: torch.Tensor) -> None:
            owner, name = self._slots[i]
            master = owner._parameters[name]
            if master.grad is None:
                master.grad = copy.grad.to(master.dtype)
            else:
                master.grad.add_(copy.grad)
            copy.grad = None
        return hook
