"""Small specs shared by the compiler tests, and the one compiled model they share."""

from types import SimpleNamespace

import pytest
import torch

from pipeline_testing import as_the_trainer, batches, compile_spec, graph_counts, sgd_step  # noqa: F401
from spec.schema import Attention, AttentionKinds, GrapeA, GrapeM, Model, MoE, Router, Spec


def small_spec(*, global_position=None, learnable_freq=True, share="model", n_layers=4, moe=True,
               first_k_dense=0, window=4, **router) -> Spec:
    """4 layers (layer 4 global), C=32, Hq=4/Hkv=2, D=8, W=4, 4 experts top-2, vocab 64."""
    local = Attention(heads=4, kv_heads=2, head_dim=8, window=window,
                      position=GrapeM(learnable_freq=learnable_freq, share=share))
    glob = Attention(heads=4, kv_heads=2, head_dim=8, position=global_position or GrapeA())
    return Spec(
        model=Model(vocab_size=64, d_model=32, n_layers=n_layers, global_every=4),
        attention=AttentionKinds(local=local, global_=glob),
        moe=MoE(experts=4, top_k=2, shared_experts=1, expert_hidden=16, first_k_dense=first_k_dense,
                router=Router(**router)) if moe else None,
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "inductor: compiles with torch.compile + Inductor (a cold CPU compile takes tens of seconds)")


@pytest.fixture
def make_spec():
    """The factory `small_spec(**overrides)`."""
    return small_spec


# ----------------------------------------------------------------------------- compiled tests
@pytest.fixture(scope="session")
def compiled_runs():
    """``compile_spec()`` compiled with every pass, beside its unfused eager graphs (same weights),
    trained 3 SGD steps on the same batches, then evaluated once under no_grad; Dynamo's counters
    around each phase. Session-scoped: a cold CPU Inductor compile costs about a minute. Runs with
    deterministic algorithms on, as the trainer does on CPU."""
    from compiler.pipeline import build_model

    spec = compile_spec()
    compiled, report = build_model(spec, "cpu")
    eager, _ = build_model(spec, "cpu", compile=False, passes=[])
    runs = SimpleNamespace(spec=spec, compiled=compiled, eager=eager, report=report, losses=[], grads=None,
                           counts={"start": graph_counts()})
    with as_the_trainer():
        for step, (tokens, targets) in enumerate(batches(spec, 3)):
            out_c, out_e = compiled(tokens, targets), eager(tokens, targets)
            out_c.loss.backward()
            out_e.loss.backward()
            runs.losses.append((out_c, out_e))
            if step == 0:
                runs.grads = ({k: p.grad.clone() for k, p in compiled.named_parameters()},
                              {k: p.grad.clone() for k, p in eager.named_parameters()})
                runs.counts["step1"] = graph_counts()
            sgd_step(compiled)
            sgd_step(eager)
        runs.counts["step3"] = graph_counts()
        with torch.no_grad():
            runs.evaluation = (compiled(*batches(spec, 1, seed=1)[0]), eager(*batches(spec, 1, seed=1)[0]))
        runs.counts["eval"] = graph_counts()
    return runs
