"""The training loop on a tiny model (CPU, eager): exact resume, Ctrl-C, NaN stop, metrics, run folder."""

import json
import os
import signal

import pytest
import torch
import yaml

from runtime.checkpoint import MARKER
from runtime.metrics import read_metrics
from runtime.trainer import INTERRUPTED, NonFiniteLoss, Trainer
from spec import GrapefxError, load_spec, spec_from_dict
from trainer_testing import losses, train

CPU = torch.device("cpu")   # the bitwise promises are for CPU eager, also on a machine with a GPU


def _train(spec, run, *, until=None, resume=False):
    return train(spec, run, until=until, resume=resume, device=CPU)


def test_n_steps_plus_resume_plus_n_steps_is_bitwise_2n_steps(tiny_spec, tmp_path, capsys):
    # accumulation (2 micro-batches per step), expert-bias updates and evaluations in between
    spec = tiny_spec(steps=6, eval_every=2, checkpoint_every=2)
    straight, _ = _train(spec, tmp_path / "a")
    _train(spec, tmp_path / "b", until=3)
    assert [p.name for p in sorted((tmp_path / "b" / "checkpoints").iterdir())] == ["step-000002", "step-000003"]
    (tmp_path / "b" / "checkpoints" / "step-000005").mkdir()       # cut short by a crash: must be skipped
    resumed, _ = _train(spec, tmp_path / "b", resume=True)
    out = capsys.readouterr().out
    assert "step-000005" in out and "cut short" in out and "resumed from" in out and "(step 3," in out

    assert losses(tmp_path / "a") == losses(tmp_path / "b")      # floats from JSON: bitwise equal
    assert len(losses(tmp_path / "a")) == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                 # parameters and expert biases
    assert not torch.equal(a["layers.1.moe.expert_bias"], torch.zeros(4))
    assert straight.tokens == resumed.tokens == 6 * 4 * 16


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tiny_spec, tmp_path, monkeypatch):
    spec = tiny_spec(steps=4, eval_every=100)
    _train(spec, tmp_path / "a")
    trainer = Trainer(spec, tmp_path / "b", device=CPU, tty=False)
    real = trainer.sampler.next_batch
    calls = []

    def interrupting():
        calls.append(1)
        if len(calls) == 3:                                        # the first micro-batch of step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real()

    monkeypatch.setattr(trainer.sampler, "next_batch", interrupting)
    assert trainer.fit() == INTERRUPTED
    trainer.close()
    assert trainer.step == 2
    assert (tmp_path / "b" / "checkpoints" / "step-000002" / MARKER).is_file()
    _train(spec, tmp_path / "b", resume=True)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_spec, tmp_path):
    spec = tiny_spec(steps=5, checkpoint_every=1, keep_checkpoints=1)
    trainer = Trainer(spec, tmp_path, device=CPU, tty=False)
    assert trainer.fit(until=2) == 0
    with torch.no_grad():
        trainer.model.embed.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss) as e:
        trainer.fit()
    trainer.close()
    assert e.value.exit_code == 3
    assert str(e.value).startswith("step 3: loss is nan; training stopped")
    assert "step-000002" in str(e.value) and "--resume" in str(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000002"]


def test_a_nan_between_metrics_lines_is_found_at_the_next_line_naming_its_step(tiny_spec, tmp_path, monkeypatch):
    # the host reads losses only at a metrics line, evaluation or checkpoint: step 2 goes bad, step 3
    # runs on, and the read after step 4 names step 2; the only checkpoint is the one of step 1 (the
    # end of the first fit)
    spec = tiny_spec(steps=8, log_every=4, eval_every=100, checkpoint_every=4, keep_checkpoints=5)
    trainer = Trainer(spec, tmp_path, device=CPU, tty=False)
    assert trainer.fit(until=1) == 0
    real = trainer._accumulate_and_step

    def poisoning(n):
        if n == 2:
            with torch.no_grad():
                trainer.model.embed.weight.fill_(float("nan"))
        return real(n)

    monkeypatch.setattr(trainer, "_accumulate_and_step", poisoning)
    with pytest.raises(NonFiniteLoss, match=r"^step 2: loss is nan; training stopped") as e:
        trainer.fit()
    trainer.close()
    assert trainer.step == 4 and "step-000001" in str(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


def test_metrics_lines_plot_and_run_record(tiny_spec, tmp_path):
    spec = tiny_spec(steps=2, eval_every=2, log_every=1)
    _train(spec, tmp_path)
    records = read_metrics(tmp_path)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [2]
    assert set(train[0]) == {"kind", "step", "loss", "ce_loss", "aux_loss", "lr", "grad_norm", "tokens", "tokens_per_s",
                             "mfu", "max_vio", "max_vio_worst", "max_vio_worst_layer", "expert_bias",
                             "zero_token_experts", "memory_gib", "elapsed_s"}
    assert train[0]["mfu"] is None and train[0]["max_vio_worst_layer"] in (1, 2) and train[0]["memory_gib"] > 0
    assert set(train[0]["expert_bias"]) == {"1", "2"} and set(train[0]["expert_bias"]["2"]) == {"min", "max", "mean", "std"}
    assert train[0]["lr"] == pytest.approx(0.5 * 3e-4)              # warmup 2: step 1 at half the peak
    assert set(evals[0]) == {"kind", "step", "val_loss", "tokens", "max_vio", "max_vio_worst", "max_vio_worst_layer"}
    assert evals[0]["tokens"] == 2 * 2 * 16                        # eval_batches x micro_batch x seq_len
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "tb").iterdir())                       # TensorBoard events (tensorboard is installed)

    env = json.loads((tmp_path / "env.json").read_text())
    assert {"command", "python", "torch", "git_commit", "device", "mfu", "inductor_cache_dir"} <= set(env)
    assert env["mfu"]["peak_flops"] is None and "CPU" in env["mfu"]["note"]
    assert load_spec(tmp_path / "spec.resolved.yaml") == spec
    assert "train" in yaml.safe_load((tmp_path / "spec.resolved.yaml").read_text())
    passes = json.loads((tmp_path / "passes.json").read_text())      # layer 1 local GRAPE-M, layer 2 global GRAPE-A
    assert passes["rotary_attention"]["layers"] == [1] and passes["bias_softmax"]["layers"] == [2]
    assert passes["linear_cross_entropy"]["graph"] == "head" and passes["linear_cross_entropy"]["matches"] == 1


def test_evaluation_never_moves_the_expert_bias(tiny_spec, tmp_path):
    trainer = Trainer(tiny_spec(), tmp_path, device=CPU, tty=False)
    bias = trainer.model.get_buffer("layers.1.moe.expert_bias").clone()
    record = trainer.evaluate()
    trainer.close()
    assert torch.equal(trainer.model.get_buffer("layers.1.moe.expert_bias"), bias)
    assert trainer.balancer.step(1, 0) is None                      # no counts were collected
    assert record["val_loss"] > 0 and record["max_vio"] >= 0


def test_fresh_start_refuses_a_folder_with_checkpoints(tiny_spec, tmp_path):
    _train(tiny_spec(steps=2), tmp_path)
    with pytest.raises(GrapefxError, match="already holds checkpoints .*pass --resume"):
        Trainer(tiny_spec(steps=2), tmp_path, device=CPU, tty=False)


def test_a_dense_model_trains_with_null_balance_metrics(tiny_dict, tmp_path):
    d = tiny_dict(steps=2, eval_every=2)
    d["moe"] = None
    _train(spec_from_dict(d), tmp_path)
    records = read_metrics(tmp_path)
    assert [r["kind"] for r in records] == ["train", "train", "eval"]
    assert all(r["max_vio"] is None and r["max_vio_worst_layer"] is None for r in records)


def test_out_of_memory_names_the_settings_to_lower(tiny_spec, tmp_path, monkeypatch):
    trainer = Trainer(tiny_spec(), tmp_path, device=CPU, tty=False)

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "model", oom)
    with pytest.raises(GrapefxError, match=r"step 1: out of GPU memory during training; lower train.micro_batch "
                                           r"\(now 2; .*data.seq_len \(now 16\), or set compile.activation_checkpointing: true"):
        trainer.fit()
    trainer.close()


def test_cuda_graph_bookkeeping_changes_no_number(tiny_spec, tmp_path, monkeypatch):
    """With Inductor's CUDA graphs (GPU only) the loop marks a graph step before every forward and moves
    the gradients out of graph memory after the first of several accumulated micro-batches (later ones
    add into them in place). Forced on here (CPU, eager), that bookkeeping must run where it should and
    leave every loss and parameter bitwise unchanged."""
    spec = tiny_spec(steps=3, eval_every=100, global_batch=8)         # 4 micro-batches of 2 per step
    plain, _ = _train(spec, tmp_path / "a")
    marks, moves = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    own = Trainer._own_gradients
    monkeypatch.setattr(Trainer, "_own_gradients", lambda self: (moves.append(1), own(self)))
    trainer = Trainer(spec, tmp_path / "b", device=CPU, tty=False)
    trainer._graph_outputs = True
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = plain.model.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = spec.train.eval_batches                                    # the final evaluation's forwards
    assert (len(moves), len(marks)) == (3 * 1, 3 * 4 + evals)          # one move per step, a mark per forward


def _bf16(tiny_dict, **train):
    d = tiny_dict(**train)
    d["precision"] = {"cpu_compute": "bf16"}
    return spec_from_dict(d)


def test_bf16_weights_cast_once_per_step_change_no_number(tiny_dict, tmp_path, monkeypatch, capsys):
    """Several micro-batches in one process: the weights are cast to bf16 once per optimizer step and each
    micro-batch's gradient is added into the fp32 one by a hook (compiler.compute_weights). Losses, gradient
    norms and weights must be bitwise those of the cast in every forward, through evaluations and a resume."""
    import runtime.trainer
    from runtime.optim import param_groups

    spec = _bf16(tiny_dict, steps=4, eval_every=2, checkpoint_every=2, global_batch=8)   # 4 micro-batches of 2
    # the optimizer on CUDA: fused AdamW, which writes the weights without bumping their version counters
    monkeypatch.setattr(runtime.trainer, "build_optimizer", lambda model, spec: torch.optim.AdamW(
        param_groups(model, spec), lr=spec.train.optimizer.lr, betas=spec.train.optimizer.betas, fused=True))
    _train(spec, tmp_path / "copies", until=2)
    copies, _ = _train(spec, tmp_path / "copies", resume=True)
    assert copies.model.compute_weights is not None and len(copies.model.compute_weights.copies) == 2 * 10 + 1
    # 2 layers x (wq 16x16, wk 8x16, wv 8x16, wo 16x16 = 768; experts 3 x 4x16x16 = 3072; shared 3 x 16x16 = 768)
    # + the LM head over the vocabulary padded to 320: 320x16 = 5120; 14,336 bf16 numbers = 28,672 B = 28 KiB
    assert ("accumulation: 21 weights are cast to bf16 once per optimizer step, not in each of its 4 micro-batches "
            "(the copies hold 28.00 KiB)") in capsys.readouterr().out
    build = runtime.trainer.build_model
    monkeypatch.setattr(runtime.trainer, "build_model", lambda *a, **k: build(*a, **{**k, "cast_once": False}))
    plain, _ = _train(spec, tmp_path / "plain")
    assert plain.model.compute_weights is None
    assert losses(tmp_path / "copies") == losses(tmp_path / "plain") and len(losses(tmp_path / "plain")) == 4
    a, b = copies.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_micro_batch_per_step_keeps_the_cast_in_the_graphs(tiny_dict, tmp_path):
    """One micro-batch per step: nothing to save, and the copies would cost 2 B per parameter."""
    trainer, _ = _train(_bf16(tiny_dict, steps=1, eval_every=100, global_batch=2), tmp_path / "a")
    assert trainer.model.compute_weights is None


def test_a_step_hours_long_on_this_cpu_is_announced_before_the_compile(tiny_spec, tmp_path, monkeypatch, capsys):
    import runtime.trainer
    from spec.derive import flops_per_token

    spec = tiny_spec(steps=1, eval_every=100)                        # 4 sequences of 16 tokens per step
    per_token = flops_per_token(spec).per_token
    # a CPU whose matmuls run at 1/7200 of the step's FLOPs per second: 2 hours per step
    monkeypatch.setattr(runtime.trainer, "cpu_matmul_flops", lambda: per_token * 64 / 7200)
    _train(spec, tmp_path / "slow")
    out = capsys.readouterr().out
    assert (f"note: on this CPU one optimizer step takes at least 2.0 h: 64 tokens x {per_token / 1e9:.2f} GFLOPs "
            f"per token = {per_token * 64:.2e} FLOPs, at the {per_token * 64 / 7200 / 1e9:.3g} GFLOP/s of a 1024 x 1024 matmul here. Train this spec "
            "on a GPU; on a CPU use a small spec (examples/tiny.yaml) or lower train.global_batch and data.seq_len") in out
    monkeypatch.setattr(runtime.trainer, "cpu_matmul_flops", lambda: per_token * 64 / 599)    # under 10 minutes
    _train(spec, tmp_path / "fast")
    assert "one optimizer step takes" not in capsys.readouterr().out
