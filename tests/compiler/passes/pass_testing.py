"""Helpers for the pass tests (imported by name: the test folders have no __init__.py)."""

from __future__ import annotations

import copy

import torch
from torch import fx

from compiler.lower import lower
from compiler.passes import apply_passes
from compiler.passes.match import is_custom

ALL = ["attention_formation", "bias_softmax", "rotary_attention"]
ATTENTION = torch.ops.grapefx.attention


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64 (||a|| when b is exactly zero, e.g. dq for a window of 1)."""
    diff, norm = (a.double() - b.double()).norm(), b.double().norm()
    return (diff / norm if norm > 0 else diff).item()


def lowered_and_fused(spec, passes=ALL, dtype=torch.float32, seq_len=12):
    """Two models of ``spec`` with identical weights: as lowered, and after ``passes``; and the report."""
    eager, fused = lower(spec, dtype=dtype), lower(spec, dtype=dtype)
    report = apply_passes(fused, passes, seq_len=seq_len)
    return eager, fused, report


def nodes(gm: fx.GraphModule, packet) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_custom(n, packet)]


def block_outputs_and_grads(model, index: int, x: torch.Tensor, log_freq: torch.Tensor | None, seed: int = 1):
    """Run block ``index`` on (x, log_freq), backprop a fixed random weighting of its float outputs;
    returns (float outputs, {name: grad} for x, log_freq and every block parameter)."""
    layer = model.layers[index]
    x = x.detach().clone().requires_grad_(True)
    args = [x]
    if model.takes_log_freq[index]:
        log_freq = log_freq.detach().clone().requires_grad_(log_freq.requires_grad)
        args.append(log_freq)
    for p in layer.parameters():
        p.grad = None
    out = layer(*args)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    floats = [o for o in out if o.is_floating_point() and o.requires_grad]
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in floats)
    loss.backward()
    grads = {"x": x.grad}
    if len(args) > 1 and args[1].requires_grad:
        grads["log_freq"] = args[1].grad
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return [o.detach() for o in out], grads


def compare_blocks(eager, fused, index: int, tol: float, B: int = 2, T: int = 12, seed: int = 0) -> dict:
    """Relative errors of block ``index``'s outputs and of every gradient, fused vs eager.

    Some gradients are ill-conditioned sums (dL/dlog_freq cancels over positions: in bf16 the
    unfused graph itself is ~5% off the exact value there, in fp32 ~6e-6). So a gradient above
    ``tol`` still passes when the fused graph is within ``tol`` of an fp64 run of the unfused graph
    (same weights, edits included), or no further from it than twice the unfused graph's own error.
    """
    g = torch.Generator().manual_seed(seed)
    C = eager.spec.model.d_model
    x = torch.randn(B, T, C, generator=g)
    log_freq = eager.grape_m.log_freq if hasattr(eager, "grape_m") else None
    out_e, grads_e = block_outputs_and_grads(eager, index, x.to(eager.compute_dtype), log_freq)
    out_f, grads_f = block_outputs_and_grads(fused, index, x.to(fused.compute_dtype), log_freq)
    errors = {f"out{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(out_f, out_e)) if a.is_floating_point() and b.norm() > 0}
    assert set(grads_e) == set(grads_f)
    for name in grads_e:
        assert grads_e[name] is not None, f"no gradient reached {name} (eager)"
        assert grads_f[name] is not None, f"no gradient reached {name} (fused)"
        errors[name] = rel_err(grads_f[name], grads_e[name])
    bad = {k: v for k, v in errors.items() if not v < tol}
    if bad:
        # fp32 graphs carry no casts: the model itself in fp64; bf16 ones cast, so lower fp32 afresh
        exact = copy.deepcopy(eager).double() if eager.compute_dtype == torch.float32 else lower(eager.spec).double()
        _, grads_r = block_outputs_and_grads(exact, index, x.double(), None if log_freq is None else log_freq.double())
        bad = {k: (v, rel_err(grads_f[k], grads_r[k]), rel_err(grads_e[k], grads_r[k])) for k, v in bad.items()
               if k.startswith("out") or not rel_err(grads_f[k], grads_r[k]) <= max(tol, 2 * rel_err(grads_e[k], grads_r[k]))}
    assert not bad, f"layer {index + 1}: relative errors above {tol} (vs eager, fused vs fp64, eager vs fp64): {bad}"
    return errors
