"""compiler.pipeline: lower -> passes -> torch.compile once per distinct block graph.

The compiled tests share one compiled model (``compiled_runs`` in conftest.py: 4 layers, two block
graphs, every pass on, CPU Inductor) trained side by side with the unfused eager graphs.
"""

import pytest
import torch
from torch import nn

from compiler.lower import lower
from compiler.passes import PASSES
from compiler.pipeline import (StateRunner, block_groups, build_model, checkpoint_blocks, lift_state,
                               structure_key)
from pipeline_testing import as_the_trainer, batches, compile_spec, graph_counts


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------- eager pieces
def test_build_model_eager(make_spec):
    model, report = build_model(make_spec(), "cpu", compile=False)
    assert report.compute_dtype == "fp32" and not report.compiled
    assert [(g.label, g.layers) for g in report.groups] == [("local/moe", [0, 1, 2]), ("global/moe", [3])]
    assert report.passes.order == list(make_spec().compile.passes)
    assert model.runners == list(model.layers) and model.head_runner is None
    assert report.lowered is None
    unfused, report = build_model(make_spec(), "cpu", compile=False, passes=[], keep_lowered=True)
    assert not any(e.matches for e in report.passes.entries.values())
    assert [gm.code for gm in report.lowered] == [gm.code for gm in unfused.layers]


def test_lowered_graphs_follow_the_model_to_its_device(make_spec):
    # the dumps propagate shapes through the lowered graphs on the model's device: a buffer left behind
    # (expert_bias on the CPU beside CUDA parameters) failed `grapefx compile --dump` on a GPU
    _, report = build_model(make_spec(), "meta", compile=False, keep_lowered=True)
    for gm in report.lowered:
        assert {t.device.type for t in [*gm.parameters(), *gm.buffers()]} == {"meta"}


def test_structure_key_ignores_names_not_structure(make_spec):
    model = lower(make_spec())
    keys = [structure_key(layer) for layer in model.layers]
    assert keys[0] == keys[1] == keys[2] != keys[3]
    assert model.layers[0].code != model.layers[1].code              # the names differ
    assert [g.layers for g in block_groups(model)] == [[0, 1, 2], [3]]


def test_state_runner_reads_the_layers_own_tensors_at_every_call(make_spec):
    model = lower(make_spec())
    stateless, names = lift_state(model.layers[0])
    assert "attn.wq" in names and "moe.expert_bias" in names
    assert not list(stateless.parameters()) and not list(stateless.buffers())
    x = torch.randn(2, 12, 32)
    run = StateRunner(model.layers[1], names, stateless)             # layer 1's graph, layer 2's tensors
    want = model.layers[1](x, model.grape_m.log_freq)
    got = run(x, model.grape_m.log_freq)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    model.layers[1].attn.wq = nn.Parameter(torch.zeros_like(model.layers[1].attn.wq))   # replaced after
    assert all(torch.equal(a, b) for a, b in zip(run(x, model.grape_m.log_freq),
                                                  model.layers[1](x, model.grape_m.log_freq)))


def test_activation_checkpointing_eager_matches(make_spec):
    spec = make_spec()
    from dataclasses import replace
    spec_ac = replace(spec, compile=replace(spec.compile, activation_checkpointing=True))
    plain, _ = build_model(spec, "cpu", compile=False)
    ac, report = build_model(spec_ac, "cpu", compile=False)
    assert report.activation_checkpointing
    tokens, targets = batches(compile_spec(), 1)[0]
    tokens, targets = tokens % 64, targets % 64
    plain(tokens, targets).loss.backward()
    ac(tokens, targets).loss.backward()
    for (name, a), (_, b) in zip(ac.named_parameters(), plain.named_parameters()):
        assert torch.equal(a.grad, b.grad), name


# ----------------------------------------------------------------------------- compiled (shared fixture)
@pytest.mark.inductor
def test_compiled_training_matches_the_unfused_eager_graphs(compiled_runs):
    for step, (c, e) in enumerate(compiled_runs.losses):
        assert rel_err(c.loss, e.loss) < 1e-5, step
        assert rel_err(c.ce_loss, e.ce_loss) < 1e-5, step
        assert torch.equal(c.counts, e.counts), step                 # the same experts were picked
    grads_c, grads_e = compiled_runs.grads
    assert set(grads_c) == set(grads_e)
    errors = {k: rel_err(grads_c[k], grads_e[k]) for k in grads_e}
    assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    assert len(grads_c) == len(list(compiled_runs.eager.parameters()))   # every parameter got one


@pytest.mark.inductor
def test_gradients_reach_each_layers_own_parameters(compiled_runs):
    grads_c, grads_e = compiled_runs.grads
    for i in range(4):
        for name in ("attn.wq", "attn.wo", "moe.router.weight", "moe.experts.w_up"):
            key = f"layers.{i}.{name}"
            assert rel_err(grads_c[key], grads_e[key]) < 1e-5, key
    assert not torch.equal(grads_c["layers.0.attn.wq"], grads_c["layers.2.attn.wq"])   # one graph, own weights
    assert rel_err(grads_c["grape_m.log_freq"], grads_e["grape_m.log_freq"]) < 1e-5


@pytest.mark.inductor
def test_identical_blocks_share_one_compiled_graph(compiled_runs):
    model, counts = compiled_runs.compiled, compiled_runs.counts
    assert [(g.label, g.layers) for g in model.compiled_graphs] == [("local/moe", [0, 2]), ("global/moe", [1, 3]),
                                                                    ("head", [])]
    assert model.runners[0].fn is model.runners[2].fn and model.runners[1].fn is model.runners[3].fn
    # four layers, three graphs (two block graphs + the head): Dynamo compiled three, not five
    assert counts["step1"]["graphs"] - counts["start"]["graphs"] == 3


@pytest.mark.inductor
def test_no_recompilation_across_steps(compiled_runs):
    counts = compiled_runs.counts
    assert counts["step3"]["graphs"] == counts["step1"]["graphs"]
    assert counts["step3"]["misses"] == counts["step1"]["misses"]


@pytest.mark.inductor
def test_evaluation_under_no_grad(compiled_runs):
    c, e = compiled_runs.evaluation
    assert rel_err(c.loss, e.loss) < 1e-5
    # no_grad is another guard: one inference graph per compiled graph, once
    assert compiled_runs.counts["eval"]["graphs"] - compiled_runs.counts["step3"]["graphs"] == 3


@pytest.mark.inductor
def test_state_dict_and_parameters_are_the_eager_ones(compiled_runs):
    assert list(compiled_runs.compiled.state_dict()) == list(compiled_runs.eager.state_dict())
    assert [n for n, _ in compiled_runs.compiled.named_modules()] == [n for n, _ in compiled_runs.eager.named_modules()]


@pytest.mark.inductor
def test_activation_checkpointing_around_compiled_blocks(compiled_runs):
    model = compiled_runs.compiled
    tokens, targets = batches(compiled_runs.spec, 1, seed=2)[0]
    runners = list(model.runners)
    before = graph_counts()
    with as_the_trainer():
        model(tokens, targets).loss.backward()
        plain = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        try:
            checkpoint_blocks(model)
            model(tokens, targets).loss.backward()
        finally:
            model.runners = runners
    for k, p in model.named_parameters():
        assert rel_err(p.grad, plain[k]) < 1e-6, k
    model.zero_grad(set_to_none=True)
    assert graph_counts()["graphs"] == before["graphs"]              # the same compiled graphs, recomputed


@pytest.mark.inductor
def test_no_graph_breaks(compiled_runs):
    # near the end: torch._dynamo.explain resets Dynamo (the compiled frames are traced again after it)
    from torch._dynamo.utils import counters
    assert not counters["graph_break"]
    model = compiled_runs.compiled
    x = torch.randn(2, 16, 16)
    for graph in model.compiled_graphs[:2]:
        index = graph.layers[0]
        state = StateRunner(model.layers[index], graph.names, None).state()
        inputs = (x, model.grape_m.log_freq) if model.takes_log_freq[index] else (x,)
        explained = torch._dynamo.explain(graph.stateless.forward)(*state, *inputs)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, graph.label


@pytest.mark.inductor
def test_warm_compile_is_served_from_the_cache(compiled_runs):
    # last: torch._dynamo.reset() drops every compiled frame; Inductor's on-disk FX graph cache stays
    torch._dynamo.reset()
    before = graph_counts()
    model, _ = build_model(compiled_runs.spec, "cpu")
    tokens, targets = batches(compiled_runs.spec, 1)[0]
    with as_the_trainer():
        model(tokens, targets).loss.backward()
    after = graph_counts()
    assert after["graphs"] - before["graphs"] == 3
    assert after["misses"] == before["misses"]
    assert after["hits"] - before["hits"] == 6                       # 3 graphs x (forward, backward)


def test_the_default_passes_are_every_pass_but_concat_linear_in_registry_order(make_spec):
    assert tuple(make_spec().compile.passes) == tuple(name for name in PASSES if name != "concat_linear")
