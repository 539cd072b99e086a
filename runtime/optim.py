"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule.

Which parameters decay (decoupled weight decay ``train.optimizer.weight_decay``):

    matrices (attention, experts, router, LM head)   decay
    the token embedding ``embed.weight``             only with ``optimizer.decay_embeddings``
    GRAPE-M frequencies ``...grape_m.log_freq``      only with that position's ``weight_decay: true``
                                                     (decay would drag ln(theta) toward 0, MATH.md §2)
    norms, biases, learnable ALiBi ``slope_logit``   never
    any other vector or scalar                       never (the usual rule: decay is for matrices)

Schedule (``train.schedule``), as a factor of the peak lr for optimizer step n = 1..S
(S = ``train.steps``, W = ``warmup_steps``, m = ``min_lr_ratio``):

    n <= W:   n / W                                          linear warmup, step 1 already moves
    n >  W:   m + (1 - m) * (1 + cos(pi * (n - W) / (S - W))) / 2      cosine, reaches m at n = S
              1                                                         constant

``torch.optim.lr_scheduler.LambdaLR`` calls the factor with the count of steps already taken
(n - 1), so ``lr_factor`` takes that count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spec.schema import PositionKind, Schedule, Spec

__all__ = ["frequency_owner", "decays", "param_groups", "build_optimizer", "clip_gradients", "lr_factor",
           "build_scheduler"]


def frequency_owner(spec: Spec, name: str) -> PositionKind | None:
    """The position settings that own the frequency vector ``name`` (model-wide or one layer's)."""
    if name == "grape_m.log_freq":
        kinds = [spec.attention.of(k).position for k in ("local", "global")]
        return next((p for p in kinds if p.model_wide), None)
    layer = int(name.split(".")[1])
    return spec.attention.of(spec.layer_kinds()[layer]).position


def decays(name: str, param: torch.Tensor, spec: Spec) -> bool:
    """Whether parameter ``name`` (a state-dict key) gets weight decay (rules in the module docstring)."""
    if name == "embed.weight":
        return spec.train.optimizer.decay_embeddings
    if name.endswith("grape_m.log_freq"):
        pos = frequency_owner(spec, name)
        return bool(pos and pos.decays())
    if name.endswith("norm.weight") or name.endswith(".bias") or name.endswith("alibi.slope_logit"):
        return False
    return param.ndim >= 2


def param_groups(model: nn.Module, spec: Spec) -> list[dict]:
    """Two AdamW groups, ``decay`` and ``no_decay``, over the trainable parameters (empty groups dropped)."""
    wd = spec.train.optimizer.weight_decay
    groups = {"decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["decay" if decays(name, p, spec) else "no_decay"].append(p)
    return [{"name": k, "params": ps, "weight_decay": wd if k == "decay" else 0.0}
            for k, ps in groups.items() if ps]


def build_optimizer(model: nn.Module, spec: Spec) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; on CUDA the fused kernel (one launch per group and dtype, the one
    ``grapefx bench`` times) unless the parameters are FSDP2 shards (DTensors keep the foreach kernels).
    On CPU the default (foreach) implementation, whose numbers the CPU tests pin."""
    o = spec.train.optimizer
    params = list(model.parameters())
    fused = bool(params) and all(p.is_cuda for p in params) and not _sharded(params)
    return torch.optim.AdamW(param_groups(model, spec), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             **({"fused": True} if fused else {}))


def clip_gradients(optimizer: torch.optim.Optimizer, parameters, max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients by min(1, max_norm / (norm + 1e-6)) (``torch.nn.utils.clip_grads_with_norm_``'s
    rule) for the next ``optimizer.step()``.

    A fused AdamW divides every gradient by its ``grad_scale`` inside its own kernel (the hook
    ``torch.amp.GradScaler`` uses), so there the scale max(1, (norm + 1e-6) / max_norm) is handed to
    it and no separate pass reads and writes the gradients; elsewhere they are scaled in place.
    The two differ only in rounding (a division against a multiplication). ``norm`` stays on the
    device either way.
    """
    if optimizer.defaults.get("fused"):
        optimizer.grad_scale = ((norm.detach().float() + 1e-6) / max_norm).clamp_min(1.0)
    else:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)


def _sharded(params: list[torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in params)


def lr_factor(taken: int, schedule: Schedule, total_steps: int) -> float:
    """Factor of the peak lr for the optimizer step after ``taken`` steps (formula in the module docstring)."""
    n, W = taken + 1, schedule.warmup_steps
    if n <= W:
        return n / W
    if schedule.kind == "constant":
        return 1.0
    m = schedule.min_lr_ratio
    progress = min(1.0, (n - W) / max(1, total_steps - W))
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, spec: Spec) -> torch.optim.lr_scheduler.LambdaLR:
    schedule, total = spec.train.schedule, spec.train.steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda taken: lr_factor(taken, schedule, total))
