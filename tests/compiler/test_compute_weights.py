"""Weights cast to bf16 once per optimizer step (compiler/compute_weights.py): which weights, the same
gradients bit for bit as autograd's accumulation, re-casting exactly what changed."""

import pytest
import torch

from compiler.compute_weights import cast_weight_inputs
from compiler.pipeline import build_model, lift_state
from pipeline_testing import as_the_trainer, batches, compile_spec

BF16 = torch.bfloat16


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _build(spec, *, cast_once, compile=False):
    torch.manual_seed(0)
    model, _ = build_model(spec, "cpu", compile=compile, compute="bf16", cast_once=cast_once)
    return model


def test_only_the_weights_the_graph_only_casts_get_a_copy(make_spec):
    model = _build(make_spec(), cast_once=False)
    layer = model.layers[3]                                          # global GRAPE-A layer with MoE
    stateless, names = lift_state(layer)
    picked = {names[i] for i in cast_weight_inputs(stateless, names, layer, BF16)}
    # not: the norm weights (fp32 RMSNorm), the fp32 router, the ALiBi slopes and the expert bias (buffers)
    assert picked == {"attn.wq", "attn.wk", "attn.wv", "attn.wo", "moe.experts.w_gate", "moe.experts.w_up",
                      "moe.experts.w_down", "moe.shared.w_gate", "moe.shared.w_up", "moe.shared.w_down"}
    assert cast_weight_inputs(stateless, names, layer, torch.float32) == []


def test_fp32_compute_installs_nothing(make_spec):
    torch.manual_seed(0)
    model, _ = build_model(make_spec(), "cpu", compile=False, compute="fp32", cast_once=True)
    assert model.compute_weights is None and model.runners == list(model.layers)


def _fused_adamw(model):
    """The trainer's optimizer on CUDA: fused AdamW, which leaves the parameters' version counters alone."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    if model.compute_weights is not None:
        model.compute_weights.watch(optimizer)
    return optimizer


def _accumulate(model, micro_batches):
    """Three optimizer steps of len(micro_batches) accumulated micro-batches; the losses, and the fp32
    gradients of the first step."""
    optimizer, losses, first = _fused_adamw(model), [], None
    for step in range(3):
        for x, y in micro_batches:
            out = model(x, y)
            out.loss.backward()
            losses.append(out.loss.item())
        if step == 0:
            first = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, first


def test_accumulated_gradients_and_losses_are_bitwise_autograds(make_spec):
    spec = make_spec()
    micro = [(torch.randint(0, 64, (2, 12), generator=g), torch.randint(0, 64, (2, 12), generator=g))
             for g in [torch.Generator().manual_seed(s) for s in range(3)]]
    plain, cast = _build(spec, cast_once=False), _build(spec, cast_once=True)
    (loss_a, grads_a), (loss_b, grads_b) = _accumulate(plain, micro), _accumulate(cast, micro)
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys()
    assert all(grads_b[k].dtype == torch.float32 and torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert all(c.grad is None for c in cast.compute_weights.copies)          # consumed by the hooks


def test_a_copy_is_recast_when_its_master_changes_and_only_then(make_spec):
    model = _build(make_spec(), cast_once=True)
    weights = model.compute_weights
    n = len(weights.copies)
    assert n == 4 * (4 + 3 + 3) + 1        # 4 layers x (wq wk wv wo, 3 expert stacks, 3 shared) + the LM head
    assert weights.refresh() == n                                    # first forward: every copy is cast
    assert weights.refresh() == 0                                    # nothing changed
    wq = model.layers[0].attn.wq
    with torch.no_grad():
        wq.add_(1.0)                                                 # an in-place op bumps the version counter
    assert weights.refresh() == 1
    copy = weights.copies[weights.masters().index(wq)]
    assert torch.equal(copy, wq.detach().to(BF16))
    model.load_state_dict(model.state_dict(), assign=True)          # new parameter objects: all re-cast
    assert weights.refresh() == n
    # the fused AdamW step bumps no version counter: only watching the optimizer tells
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert weights.refresh() == 0 and not torch.equal(copy, wq.detach().to(BF16))
    weights.watch(optimizer)
    optimizer.step()
    assert weights.refresh() == n and torch.equal(copy, wq.detach().to(BF16))


@pytest.mark.inductor
def test_compiled_with_copies_matches_eager_and_compiles_once():
    """Inductor sees bf16 weights (the cast is the identity); the gradients still reach the fp32 masters."""
    from pipeline_testing import graph_counts

    spec = compile_spec()
    eager, compiled = _build(spec, cast_once=True), _build(spec, cast_once=True, compile=True)
    with as_the_trainer():
        start = graph_counts()
        losses = [[model(x, y) for x, y in batches(spec, 2)] for model in (eager, compiled)]
        for outs in losses:
            for out in outs:
                out.loss.backward()
        after = graph_counts()
        grads = [{k: p.grad.clone() for k, p in model.named_parameters()} for model in (eager, compiled)]
        with torch.no_grad():
            compiled.layers[0].attn.wq.mul_(0.5)                     # a changed master: re-cast, not recompiled
        compiled(*batches(spec, 1, seed=1)[0]).loss.backward()
    assert after["graphs"] - start["graphs"] == 3                    # local block, global block, head
    assert graph_counts()["graphs"] == after["graphs"]
    for e, c in zip(*losses):
        assert rel_err(c.loss, e.loss) < 1e-2
    grads_e, grads_c = grads
    assert all(g.dtype == torch.float32 for g in grads_c.values())
    errors = {k: rel_err(grads_c[k], grads_e[k]) for k in grads_e}
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
