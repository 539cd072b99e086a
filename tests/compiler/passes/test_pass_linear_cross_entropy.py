"""The head pass linear_cross_entropy: the LM head -> cross-entropy chain becomes one
grapefx.linear_cross_entropy node; the model's loss and every gradient stay the same (fp32 < 1e-5)."""

import dataclasses

import torch

from compiler.lower import lower
from compiler.passes import apply_passes
from compiler.passes.linear_cross_entropy import linear_cross_entropy_pass
from compiler.passes.match import is_custom
from pass_testing import rel_err

LCE = torch.ops.grapefx.linear_cross_entropy


def loss_and_grads(model, tokens, targets):
    out = model(tokens, targets)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(out.loss, list(params.values()))
    return out.loss.detach(), dict(zip(params, grads))


def check_same(spec, seq_len=8):
    eager, fused = lower(spec), lower(spec)
    e = apply_passes(fused, ["linear_cross_entropy"]).entries["linear_cross_entropy"]   # by name, like any pass
    assert (e.graph, e.matches, e.layers, e.reasons) == ("head", 1, [], {})
    assert [n for n in fused.head.graph.nodes if is_custom(n, LCE)]
    assert not [n for n in fused.head.graph.nodes if n.op == "call_function" and "cross_entropy" == getattr(n.target, "__name__", "")]
    g = torch.Generator().manual_seed(0)
    V = spec.model.vocab_size
    tokens = torch.randint(0, V, (2, seq_len), generator=g)
    targets = torch.randint(0, V, (2, seq_len), generator=g)
    targets[0, :3] = -100
    (l0, g0), (l1, g1) = loss_and_grads(eager, tokens, targets), loss_and_grads(fused, tokens, targets)
    assert abs(l0.item() - l1.item()) < 1e-5 * abs(l0.item())
    assert g0.keys() == g1.keys()
    for name in g0:
        assert rel_err(g1[name], g0[name]) < 1e-5, name


def test_fused_head_keeps_loss_and_gradients(make_spec):
    check_same(make_spec())


def test_tied_embeddings(make_spec):
    spec = make_spec()
    check_same(dataclasses.replace(spec, model=dataclasses.replace(spec.model, tied_embeddings=True)))


def test_declines_label_smoothing_and_reports_absence(make_spec):
    model = lower(make_spec())
    ce = next(n for n in model.head.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.cross_entropy)
    ce.kwargs = {**ce.kwargs, "label_smoothing": 0.1}
    model.head.recompile()
    result = linear_cross_entropy_pass(model.head)
    assert result.matches == 0 and [r.code for r in result.declined] == ["ce_options"]
    assert "label smoothing" in result.declined[0]
    block = linear_cross_entropy_pass(model.layers[0])
    assert block.matches == 0 and block.absent.code == "absent" and block.absent == "no cross_entropy in the graph"
