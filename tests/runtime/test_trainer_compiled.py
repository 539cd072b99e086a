"""End to end: the trainer with compile on (fusion passes + Inductor per block graph, CPU) trains to
the losses of the unfused eager graphs. The model is the one tests/compiler compiles (same graphs
and shapes), so Inductor's cache folder for the test session usually serves these compiles."""

import pytest

from runtime.metrics import read_metrics
from spec import spec_from_dict
from trainer_testing import losses, train


def test_compiled_training_matches_unfused_eager(tiny_dict, tmp_path):
    spec = tiny_dict(steps=3, eval_every=100)
    compiled = spec_from_dict({**spec, "compile": {"enabled": True}})                  # every pass, Inductor
    unfused = spec_from_dict({**spec, "compile": {"enabled": False, "passes": []}})   # the lowered graphs, eager
    trainer, _ = train(compiled, tmp_path / "compiled")
    train(unfused, tmp_path / "eager")
    assert len(trainer.model.compiled_graphs) == 3                                     # local, global, head
    got, want = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert [s for s, _, _ in got] == [1, 2, 3]
    for (step, loss, norm), (_, loss_e, norm_e) in zip(got, want):
        assert loss == pytest.approx(loss_e, rel=1e-5), step
        assert norm == pytest.approx(norm_e, rel=1e-4), step
    evals = [r for r in read_metrics(tmp_path / "compiled") if r["kind"] == "eval"]
    evals_e = [r for r in read_metrics(tmp_path / "eager") if r["kind"] == "eval"]
    assert evals[0]["val_loss"] == pytest.approx(evals_e[0]["val_loss"], rel=1e-5)


def test_compiled_resume_continues_the_curve(tiny_dict, tmp_path):
    """N steps + resume + N steps, compiled: the losses of 2N straight steps within 1e-6."""
    spec = spec_from_dict({**tiny_dict(steps=4, eval_every=100, checkpoint_every=2), "compile": {"enabled": True}})
    train(spec, tmp_path / "straight")
    train(spec, tmp_path / "resumed", until=2)
    train(spec, tmp_path / "resumed", resume=True)
    got, want = losses(tmp_path / "resumed"), losses(tmp_path / "straight")
    assert [s for s, _, _ in got] == [1, 2, 3, 4]
    for (step, loss, _), (_, loss_s, _) in zip(got, want):
        assert loss == pytest.approx(loss_s, rel=1e-6, abs=1e-7), step
