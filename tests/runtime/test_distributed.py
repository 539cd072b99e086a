"""Data-parallel training on CPU with gloo: 2 ranks (DDP and FSDP2) against 1 process, sharded resume.

The ranks are real processes (``torch.multiprocessing``, spawn) that join through torchrun's
environment variables with ``runtime.distributed.process_group``, so the code under test is the
one ``torchrun -m runtime.cli train`` runs. Each spawn runs a list of jobs in one process group
(a process start costs seconds on 2 cores); each rank saves its full model state after each job.

The blocks run eagerly (CI has no time for Inductor), once as the modules themselves and once
through the pipeline's state runners (``compile_model`` with the stateless graphs left
uncompiled): the runners call the graph without calling the module, so under FSDP2 they must
still get the module's hooks (``through_fsdp_hooks``) to see gathered parameters.

Equivalence is "within fp32 tolerance": 2 ranks sum the same per-token terms in another order
(DDP / FSDP2 average two partial gradients), so the numbers agree to rounding, not bitwise. The
expert biases move by +-rate on the sign of integer counts, so they agree exactly.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from runtime.cli import main
from runtime.metrics import read_metrics
from runtime.trainer import Trainer
from spec import spec_from_dict

CPU = torch.device("cpu")
BIASES = ("layers.0.moe.expert_bias", "layers.1.moe.expert_bias")
pytestmark = pytest.mark.timeout(120)   # a rank stuck in a collective must not hang CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list[dict], out: str) -> None:
    from unittest import mock

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    from compiler import pipeline
    from runtime.distributed import process_group

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with process_group("cpu") as (w, device):
        for j, job in enumerate(jobs):
            trainer = Trainer(spec_from_dict(job["spec"]), job["run"], resume=job.get("resume", False), world=w,
                              device=device, tty=False)
            if job.get("runners"):     # the compiled path's runners, with the stateless graphs run eagerly
                with mock.patch.object(pipeline, "_compile", lambda gm, options: gm.forward):
                    pipeline.compile_model(trainer.model)
            try:
                trainer.fit(job.get("until"))
            finally:
                trainer.close()
            full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))   # collective
            saved = {k: v.detach().clone() for k, v in full.items()}
            saved["sharded_params"] = torch.tensor(sum(isinstance(p, DTensor) for p in trainer.model.parameters()))
            torch.save(saved, os.path.join(out, f"job{j}-rank{rank}.pt"))


def _then_exit(rank: int, worker, *args) -> None:
    """Run ``worker`` and leave the process without interpreter finalization (``os._exit(0)``).

    Every result is in files by then and the process group is destroyed, but gloo's threads can
    still abort a finished rank while the interpreter shuts down ("terminate called without an active
    exception", SIGABRT: seen in CI in this file's and in test_distributed_expert.py's spawns, after every
    job had saved its state), and the spawn reports that as a failure. A worker that raises still
    fails the spawn with its traceback."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(jobs: list[dict], out, world: int = 2, worker=_worker) -> list[list[dict]]:
    """Run ``jobs`` on ``world`` ranks with ``worker``; per job, each rank's state dict as the worker saved it."""
    mp.start_processes(_then_exit, args=(worker, world, _free_port(), jobs, str(out)), nprocs=world,
                       start_method="spawn")
    return [[torch.load(out / f"job{j}-rank{r}.pt", weights_only=True) for r in range(world)] for j in range(len(jobs))]


def _one_process(spec_dict: dict, run, *, until=None, resume=False) -> dict:
    trainer = Trainer(spec_from_dict(spec_dict), run, resume=resume, device=CPU, tty=False)
    try:
        trainer.fit(until)
    finally:
        trainer.close()
    return trainer.model.state_dict()


def _curve(run) -> list[tuple]:
    """(kind, step, loss / val_loss, grad_norm (0 for evaluations), max_vio) of every metrics line."""
    return [(r["kind"], r["step"], r.get("loss", r.get("val_loss")), r.get("grad_norm", 0.0), r["max_vio"])
            for r in read_metrics(run)]


def _assert_same_curve(a, b):
    assert [r[:2] for r in a] == [r[:2] for r in b]
    for ra, rb in zip(a, b):
        assert ra[2:4] == pytest.approx(rb[2:4], rel=1e-5, abs=1e-6), (ra, rb)
        assert ra[4] == rb[4], (ra, rb)                  # MaxVio: of integer counts summed over ranks


def _assert_states(ranks: list[dict], reference: dict, *, sharded: bool):
    for state in ranks:
        n = int(state.pop("sharded_params"))
        # FSDP2: all 30 parameters are DTensors (the state's other 3 are buffers: expert biases, ALiBi slopes)
        assert n == (30 if sharded else 0) and len(reference) == 33
        assert state.keys() == reference.keys()
        for k in BIASES:                                  # identical on every rank and to one process
            assert torch.equal(state[k], reference[k]), k
        for k in reference:
            torch.testing.assert_close(state[k], reference[k], rtol=1e-4, atol=1e-6, msg=k)
    assert not torch.equal(reference[BIASES[1]], torch.zeros(4))


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_train_as_one_process_with_the_same_global_batch(tiny_dict, tmp_path, kind):
    # global batch 8 of micro-batches of 2: one process accumulates 4, each of 2 ranks 2 (no_sync on DDP)
    spec = tiny_dict(steps=4, global_batch=8, eval_every=2, eval_batches=3)    # 3 eval batches: 2 ranks pad one
    spec["parallel"] = {"data": kind}
    reference = _one_process(spec, tmp_path / "one")
    modules, runners = _spawn([{"spec": spec, "run": str(tmp_path / "two")},
                               {"spec": spec, "run": str(tmp_path / "runners"), "runners": True}], tmp_path)
    for run in ("two", "runners"):
        _assert_same_curve(_curve(tmp_path / run), _curve(tmp_path / "one"))
    _assert_states(modules + runners, reference, sharded=kind == "fsdp")
    assert len(read_metrics(tmp_path / "two")) == 4 + 2                       # rank 0 alone writes metrics


def test_sharded_checkpoint_resumes_on_two_ranks_and_on_one(tiny_dict, tmp_path):
    spec = tiny_dict(steps=3, global_batch=4, eval_every=100, eval_batches=1, checkpoint_every=2)
    spec["parallel"] = {"data": "fsdp"}
    straight = _one_process(spec, tmp_path / "straight")
    _one_process(spec, tmp_path / "one", until=2)                             # 1 rank saves step 2 ...
    (ranks_two_two, ranks_one_two) = _spawn([
        {"spec": spec, "run": str(tmp_path / "two"), "until": 2},           # 2 ranks save step 2, sharded
        {"spec": spec, "run": str(tmp_path / "two"), "resume": True},       # ... and resume it on 2 ranks
        {"spec": spec, "run": str(tmp_path / "one"), "resume": True},       # ... 1 rank's, resumed on 2
    ], tmp_path)[1:]
    step2 = tmp_path / "two" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in step2.iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]

    shutil.copytree(tmp_path / "two", tmp_path / "two-to-one")               # 2 ranks' step 2, resumed on 1
    shutil.rmtree(tmp_path / "two-to-one" / "checkpoints" / "step-000003")
    two_to_one = _one_process(spec, tmp_path / "two-to-one", resume=True)

    want = _curve(tmp_path / "straight")
    for run in ("two", "one", "two-to-one"):
        _assert_same_curve(_curve(tmp_path / run), want)
    _assert_states(ranks_two_two + ranks_one_two, straight, sharded=True)
    _assert_states([{**two_to_one, "sharded_params": torch.tensor(0)}], straight, sharded=False)


def test_grapefx_train_nproc_launches_torchrun_and_ctrl_c_saves_on_every_rank(tiny_yaml, tmp_path):
    spec = tiny_yaml(steps=300, global_batch=8, log_every=1, eval_every=1000, checkpoint_every=1000)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "runtime.cli", "train", str(spec), "--out", str(run), "--no-compile", "--nproc", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    seen = []
    for line in proc.stdout:                              # rank 0's progress lines, through torchrun
        seen.append(line)
        if line.startswith("step 2/300"):
            proc.send_signal(signal.SIGINT)               # Ctrl-C to the launcher, which passes it on
            break
    seen += proc.stdout.readlines()
    assert proc.wait(timeout=90) == 130, "".join(seen)
    out = "".join(seen)
    assert sum("step 1/300" in line for line in seen) == 1            # progress from rank 0 only
    stopped = int(re.search(r"interrupted: stopped after step (\d+)", out).group(1))
    assert (run / "checkpoints" / f"step-{stopped:06d}" / "complete.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints" / f"step-{stopped:06d}").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]                               # both ranks took part in the save
    # the 2 ranks' checkpoint resumes in one process
    assert main(["train", str(spec), "--out", str(run), "--no-compile", "--steps", str(stopped + 1), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == list(range(1, stopped + 2))
