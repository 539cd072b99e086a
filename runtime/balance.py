"""DeepSeek-V3 aux-loss-free expert balancing: the per-step bias update and its metrics (MATH.md §5).

Each MoE block's graph returns ``counts`` (E,) fp32, the tokens routed to each expert in one
micro-batch; the model stacks them as (n_moe_layers, E). The trainer hands every *training*
forward's counts to ``ExpertBalancer.add``; once per optimizer step, after all micro-batches,
``ExpertBalancer.step`` sums them over data-parallel ranks (the ``all_reduce`` hook) and moves
each layer's bias:

    c_i  = tokens routed to expert i in the whole global batch          (E,) fp32
    b_i += gamma * sign(mean(c) - c_i)                                  gamma = bias_update_rate
    b   -= mean(gamma * sign(mean(c) - c))      only with bias_centering (b stays zero-mean)

Underloaded experts (c_i < mean) rise, overloaded ones fall, ties (c_i == mean) stay. The sign is
taken as ``sign(sum(c) - E * c_i)`` on the integer counts, an exact comparison at any batch size
(fp32 means lose ties once sum(c) > 2^24). b stays fp32: in bf16 a 1e-3 step vanishes once
|b| >= 0.5.

Freeze (DSv3 stopped the update late in training): the update at step n (counted from 1) happens
while the steps completed before it are < ``bias_freeze_after_steps`` and the tokens trained
before it are < ``bias_freeze_after_tokens``: ``bias_freeze_after_steps: 100`` updates at steps
1..100 and never after.

Evaluation counts never reach ``add``: they feed ``max_vio`` only. Counts from activation
recomputation never leave the block's backward, so they cannot be counted twice.

Metric (MATH.md §5): ``MaxVio = (max_i c_i - mean(c)) / mean(c)`` per layer.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from spec.schema import Router

__all__ = ["ExpertBalancer", "max_vio", "bias_delta"]


def max_vio(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: counts (L, E) -> (L,) fp32, ``(max c - mean c) / mean c``.

    A layer that received no tokens has no imbalance to report: its MaxVio is 0.
    """
    c = counts.float()                                                        # (L, E)
    mean = c.mean(dim=-1)                                                     # (L,)
    return torch.where(mean > 0, (c.amax(dim=-1) - mean) / mean.clamp_min(1e-30), torch.zeros_like(mean))


def bias_delta(counts: torch.Tensor, rate: float, centering: bool) -> torch.Tensor:
    """The bias change of one optimizer step: counts (L, E) summed over the global batch -> (L, E) fp32.

    ``rate * sign(mean(c) - c)``, computed as ``sign(sum(c) - E * c)`` on the integer counts (exact);
    with ``centering`` the per-layer mean of the change is subtracted.
    """
    c = counts.round().to(torch.int64)                                        # (L, E) exact integers
    E = c.shape[-1]
    sign = torch.sign(c.sum(dim=-1, keepdim=True) - E * c).to(torch.float32)  # (L, E) in {-1, 0, 1}
    delta = sign * rate
    if centering:
        delta = delta - delta.mean(dim=-1, keepdim=True)
    return delta


class ExpertBalancer:
    """Collects training counts, updates every MoE layer's ``expert_bias`` once per step, reports balance.

    ``model`` is the unwrapped model (``model.moe_layers`` 0-based, biases at
    ``layers.{i}.moe.expert_bias``); ``all_reduce`` sums a tensor over data-parallel ranks in place
    and returns it (identity in one process; the distributed runtime passes its own).
    """

    def __init__(self, model: nn.Module, router: Router, *,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.router = router
        self.layers: list[int] = list(model.moe_layers)                      # 0-based layer indices
        self.biases: list[torch.Tensor] = (
            [model.get_buffer(f"layers.{i}.moe.expert_bias") for i in self.layers] if router.expert_bias else [])
        self.all_reduce = all_reduce or (lambda t: t)
        self._step_counts: torch.Tensor | None = None                         # (L, E), this step's micro-batches
        self._window_counts: torch.Tensor | None = None                       # (L, E), since the last log line

    def add(self, counts: torch.Tensor) -> None:
        """Add one training micro-batch's counts (n_moe_layers, E)."""
        c = counts.detach().float()
        self._step_counts = c.clone() if self._step_counts is None else self._step_counts.add_(c)

    def frozen(self, step: int, tokens_before: int) -> bool:
        """True when the update of optimizer step ``step`` (from 1) is past a freeze limit."""
        r = self.router
        return ((r.bias_freeze_after_steps is not None and step - 1 >= r.bias_freeze_after_steps)
                or (r.bias_freeze_after_tokens is not None and tokens_before >= r.bias_freeze_after_tokens))

    @torch.no_grad()
    def step(self, step: int, tokens_before: int) -> torch.Tensor | None:
        """End of optimizer step ``step``: reduce the counts, update the biases; returns the (L, E) counts."""
        if self._step_counts is None:
            return None
        counts = self.all_reduce(self._step_counts)                           # (L, E), all ranks' tokens
        self._step_counts = None
        self._window_counts = counts.clone() if self._window_counts is None else self._window_counts.add_(counts)
        if self.biases and not self.frozen(step, tokens_before):
            delta = bias_delta(counts, self.router.bias_update_rate, self.router.bias_centering)
            for b, d in zip(self.biases, delta):
                b.add_(d.to(b.device))
        return counts

    def layer_names(self) -> list[str]:
        """Layers as users count them (from 1)."""
        return [str(i + 1) for i in self.layers]

    def balance(self, counts: torch.Tensor) -> dict:
        """MaxVio of counts (L, E): the mean over MoE layers, the worst value and its layer (from 1)."""
        v = max_vio(counts)                                                   # (L,)
        worst = int(torch.argmax(v))
        return {"max_vio": float(v.mean()), "max_vio_worst": float(v[worst]),
                "max_vio_worst_layer": self.layers[worst] + 1}

    def bias_stats(self) -> dict[str, dict[str, float]]:
        """Per layer (from 1): min, max, mean and population std of the expert bias."""
        out = {}
        for name, b in zip(self.layer_names(), self.biases):
            b = b.detach().float()
            out[name] = {"min": float(b.min()), "max": float(b.max()), "mean": float(b.mean()),
                         "std": float(b.std(correction=0))}
        return out

    def take_window(self) -> dict[str, list[int]]:
        """Experts that received no tokens since the last call, per layer (from 1); resets the window."""
        if self._window_counts is None:
            return {}
        zero = {name: torch.nonzero(row == 0).flatten().tolist()
                for name, row in zip(self.layer_names(), self._window_counts)}
        self._window_counts = None
        return {k: v for k, v in zero.items() if v}
