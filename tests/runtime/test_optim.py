"""Weight-decay groups and the learning-rate schedule, with hand-computed values."""

import dataclasses

import pytest
import torch

from compiler.lower import lower
from runtime.optim import build_optimizer, build_scheduler, clip_gradients, decays, lr_factor
from spec.schema import Schedule


def _decaying(spec):
    model = lower(spec)
    return {name for name, p in model.named_parameters() if decays(name, p, spec)}, \
           {name for name, p in model.named_parameters() if not decays(name, p, spec)}


def _with(spec, **changes):
    """Replace nested fields: _with(spec, **{"train.optimizer.decay_embeddings": True})."""
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        chain = [spec]
        for p in parents:
            chain.append(getattr(chain[-1], p))
        new = dataclasses.replace(chain[-1], **{leaf: value})
        for obj, p in zip(reversed(chain[:-1]), reversed(parents)):
            new = dataclasses.replace(obj, **{p: new})
        spec = new
    return spec


def test_matrices_decay_norms_embeddings_frequencies_and_slopes_do_not(tiny_spec):
    spec = _with(tiny_spec(), **{"attention.global_.position": dataclasses.replace(
        tiny_spec().attention.global_.position, learnable=True)})
    decay, no_decay = _decaying(spec)
    assert {"layers.0.attn.wq", "layers.0.attn.wo", "layers.1.moe.router.weight", "layers.1.moe.experts.w_gate",
            "layers.1.moe.shared.w_down", "head.lm_head.weight"} <= decay
    assert {"embed.weight", "grape_m.log_freq", "layers.0.attn_norm.weight", "layers.1.ffn_norm.weight",
            "head.norm.weight", "layers.1.attn.alibi.slope_logit"} <= no_decay
    assert all(not n.endswith("norm.weight") for n in decay)


def test_embedding_and_grape_m_decay_only_when_the_spec_says_so(tiny_spec):
    spec = tiny_spec()
    local = spec.attention.local
    spec = _with(spec, **{"train.optimizer.decay_embeddings": True,
                          "attention.local": dataclasses.replace(
                              local, position=dataclasses.replace(local.position, weight_decay=True, share="layer"))})
    decay, _ = _decaying(spec)
    assert {"embed.weight", "layers.0.attn.grape_m.log_freq"} <= decay


def test_optimizer_groups_carry_the_decay(tiny_spec):
    spec = tiny_spec()
    opt = build_optimizer(lower(spec), spec)
    groups = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert groups == {"decay": 0.1, "no_decay": 0.0}
    assert not opt.defaults["fused"]                 # fused only for CUDA parameters (CPU keeps foreach)


@pytest.mark.parametrize("taken, factor", [
    (0, 0.25),    # n = 1 of a 4-step warmup: 1/4
    (3, 1.0),     # n = 4: the peak
    (5, 0.1 + 0.45 * (1 + 0.7071067811865476)),   # n = 6: progress (6-4)/8 = 1/4, cos(pi/4)
    (7, 0.55),    # n = 8: progress 1/2, cos = 0: 0.1 + 0.9/2
    (11, 0.1),    # n = 12 = S: the minimum
])
def test_warmup_then_cosine_by_hand(taken, factor):
    assert lr_factor(taken, Schedule(warmup_steps=4, kind="cosine", min_lr_ratio=0.1), 12) == pytest.approx(factor, abs=1e-12)


def test_constant_and_no_warmup():
    assert lr_factor(7, Schedule(warmup_steps=4, kind="constant"), 12) == 1.0
    assert lr_factor(0, Schedule(warmup_steps=0, kind="cosine", min_lr_ratio=0.0), 2) == pytest.approx(0.5)  # n=1 of 2


def test_scheduler_sets_the_lr_of_each_step(tiny_spec):
    spec = tiny_spec(steps=12, schedule={"warmup_steps": 4, "min_lr_ratio": 0.1}, optimizer={"lr": 1e-3})
    model = lower(spec)
    opt = build_optimizer(model, spec)
    sched = build_scheduler(opt, spec)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25e-3) and lrs[3] == pytest.approx(1e-3) and lrs[11] == pytest.approx(1e-4)
    assert torch.tensor(lrs[4:]).diff().le(0).all()   # non-increasing after the warmup


@pytest.mark.parametrize("fused", [False, True])
def test_clipping_scales_the_gradient_by_hand(fused):
    # g = (3, 4): norm 5, clipped to norm 1 -> (0.6, 0.8). AdamW's first step with lr 1, eps 1 and
    # no decay moves p by -g_hat / (|g_hat| + 1): -(0.6 / 1.6, 0.8 / 1.8) = -(0.375, 0.4444...);
    # unclipped it would be -(0.75, 0.8). The fused optimizer clips inside its kernel (grad_scale).
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    opt = torch.optim.AdamW([p], lr=1.0, eps=1.0, weight_decay=0.0, **({"fused": True} if fused else {}))
    norm = torch.nn.utils.get_total_norm([p.grad])
    clip_gradients(opt, [p], 1.0, norm)
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.tensor([0.6 / 1.6, 0.8 / 1.8]), rtol=1e-5, atol=1e-6)
    assert hasattr(opt, "grad_scale") == fused
