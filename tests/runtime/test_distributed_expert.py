"""Expert parallelism on CPU with gloo: E = 2 and 4 over 2 and 4 processes train as one process.

Two spawns (a process start costs seconds on 2 cores; each runs a list of jobs in one group):

    2 ranks:  E = 2 (DDP) for 6 steps, saving step 3;  the exchanges on a case where one expert
              gets no token and one rank sends nothing to the other (op level, against expert_ffn)
    4 ranks:  E = 4 (DDP);  E = 2 x D = 2 (FSDP2);  the E = 2 run's step 3 resumed with E = 4
    1 process: the reference (E = 1), and the E = 2 run's step 3 resumed with E = 1

Every curve (loss and gradient norm per step, validation loss, MaxVio) matches the reference to
1e-5 relative: the expert rows are summed in another order (index_add in the combine; gradients
all-reduced over other groups), so agreement is to fp32 rounding, not bitwise. The expert biases
move by +-rate on the sign of integer counts and agree exactly. Each rank's experts are the
slice [e*X/E, (e+1)*X/E) of the reference's stack.
"""

import os
import shutil

import pytest
import torch

from runtime.metrics import read_metrics
from tests.runtime.test_distributed import _assert_same_curve, _curve, _one_process, _spawn

BIASES = ("layers.0.moe.expert_bias", "layers.1.moe.expert_bias")
pytestmark = pytest.mark.timeout(240)


def _exchange_check(rank: int, group_name: str) -> float:
    """Largest relative difference between dispatch -> expert_ffn -> combine on 2 ranks and expert_ffn
    on one, forward and every gradient, on variable splits with an empty one and an idle expert."""
    from compiler.ops.experts import expert_ffn

    ops = torch.ops.grapefx
    g = torch.Generator().manual_seed(rank)
    N, C, F, X = 5, 8, 8, 4
    x = torch.randn(N, C, generator=g, requires_grad=True)
    # experts 0, 1 live on rank 0 and 2, 3 on rank 1; rank 0 routes to 1 and 0 (sends nothing to
    # rank 1), rank 1 to 0 and 3: expert 2 gets no token, the splits are [2N, 0] and [N, N]
    idx = torch.tensor([[1, 0]] * N) if rank == 0 else torch.tensor([[0, 3]] * N)
    gates = torch.rand(N, 2, generator=g, requires_grad=True)
    full = [torch.randn(s, generator=torch.Generator().manual_seed(9)) for s in ((X, C, F), (X, C, F), (X, F, C))]
    mine = [w[rank * 2:(rank + 1) * 2].clone().requires_grad_() for w in full]
    rows, local, order, splits, _ = ops.expert_dispatch(x, idx, X, 2, group_name, 0.0)
    y = ops.expert_ffn(rows, local.view(-1, 1), torch.ones(rows.shape[0], 1), *mine)
    out = ops.expert_combine(y, gates, order, splits, group_name)[0]
    grad = torch.randn(N, C, generator=g)
    dx, dgates, *dw = torch.autograd.grad(out, [x, gates, *mine], grad)
    full = [w.requires_grad_() for w in full]
    want = expert_ffn(x, idx, gates, *full)
    wx, wgates, *wdw = torch.autograd.grad(want, [x, gates, *full], grad)
    for w in wdw:            # an expert's gradient sums both ranks' tokens; each reference has its own only
        torch.distributed.all_reduce(w)
    pairs = [(out, want), (dx, wx), (dgates, wgates)] + [(d, w[rank * 2:(rank + 1) * 2]) for d, w in zip(dw, wdw)]
    errs = [(a - b).abs().max() / b.abs().max() for a, b in pairs]              # relative to the largest entry
    assert splits.tolist() == ([[2 * N, 0], [2 * N, N]] if rank == 0 else [[N, N], [0, N]]), splits
    assert dw[0].abs().sum() > 0 if rank == 0 else dw[0][0].abs().sum() == 0      # expert 2: no gradient
    return max(float(e) for e in errs)


def _worker(rank: int, world: int, port: int, jobs: list[dict], out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from runtime.distributed import process_group
    from runtime.trainer import Trainer
    from spec import spec_from_dict

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with process_group("cpu") as (w, device):
        for j, job in enumerate(jobs):
            trainer = Trainer(spec_from_dict(job["spec"]), job["run"], resume=job.get("resume", False), world=w,
                              device=device, tty=False)
            try:
                trainer.fit(job.get("until"))
            finally:
                trainer.close()
            full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
            saved = {k: v.detach().clone() for k, v in full.items()}
            saved["expert_rank"] = torch.tensor(trainer.parallel.expert_group.rank)
            if job.get("exchange"):
                saved["exchange_error"] = torch.tensor(_exchange_check(rank, trainer.parallel.expert_group.name))
            torch.save(saved, os.path.join(out, f"job{j}-rank{rank}.pt"))


def _assert_slices(ranks: list[dict], reference: dict, E: int) -> None:
    """Each rank's state equals the reference's, its experts the slice [e*X/E, (e+1)*X/E)."""
    for state in ranks:
        e = int(state.pop("expert_rank"))
        state.pop("exchange_error", None)
        assert state.keys() == reference.keys()
        for k in BIASES:
            assert torch.equal(state[k], reference[k]), k
        for k, want in reference.items():
            if ".moe.experts." in k:
                want = want[e * want.shape[0] // E:(e + 1) * want.shape[0] // E]
            torch.testing.assert_close(state[k], want, rtol=1e-4, atol=1e-6, msg=k)
    assert not torch.equal(reference[BIASES[1]], torch.zeros(4))


def _with(spec: dict, **parallel) -> dict:
    return {**spec, "parallel": parallel}


def test_expert_parallel_trains_as_one_process_and_its_checkpoints_reshard(tiny_dict, tmp_path):
    spec = tiny_dict(steps=6, micro_batch=1, global_batch=4, eval_every=3, eval_batches=2, checkpoint_every=6)
    reference = _one_process(spec, tmp_path / "one")
    e2 = str(tmp_path / "e2")                                        # the one run that also saves step 3
    (two,) = _spawn([{"spec": {**_with(spec, data="ddp", expert=2), "train": {**spec["train"], "checkpoint_every": 3}},
                      "run": e2, "exchange": True}], tmp_path, 2, _worker)
    for name in ("to-e4", "to-e1"):                                 # the E = 2 run's step 3, resumed elsewhere
        shutil.copytree(e2, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step-000006")
    four, two_by_two, resumed = _spawn([
        {"spec": _with(spec, data="ddp", expert=4), "run": str(tmp_path / "e4")},
        {"spec": _with(spec, data="fsdp", expert=2), "run": str(tmp_path / "e2d2")},
        {"spec": _with(spec, data="ddp", expert=4), "run": str(tmp_path / "to-e4"), "resume": True},
    ], tmp_path, 4, _worker)
    to_one = _one_process(spec, tmp_path / "to-e1", resume=True)

    assert max(float(s["exchange_error"]) for s in two) < 1e-5
    want = _curve(tmp_path / "one")
    assert len(want) == 6 + 2
    for run in ("e2", "e4", "e2d2", "to-e4", "to-e1"):
        _assert_same_curve(_curve(tmp_path / run), want)
    _assert_slices(two, reference, 2)
    _assert_slices(four + resumed, reference, 4)
    _assert_slices(two_by_two, reference, 2)
    _assert_slices([{**to_one, "expert_rank": torch.tensor(0)}], reference, 1)
    assert [r["step"] for r in read_metrics(tmp_path / "to-e4") if r["kind"] == "train"] == list(range(1, 7))
    assert all("dropped_assignments" not in r for r in read_metrics(tmp_path / "e2"))   # dropless by default


def test_capacity_factor_drops_and_counts_assignments(tiny_dict, tmp_path):
    # micro-batch 1 x 16 tokens, K = 2, X = 4: the even share is 8 assignments per expert; factor 0.25
    # keeps at most ceil(2) = 2 per expert, 8 of 32, so 24..32 of them are dropped per micro-batch and
    # MoE layer: 2 layers x 4 micro-batches -> 192..256 per step
    spec = {**tiny_dict(steps=2, micro_batch=1, global_batch=4, eval_every=100), "parallel": {"capacity_factor": 0.25}}
    _one_process(spec, tmp_path / "run")
    dropped = [r["dropped_assignments"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(dropped) == 2 and all(192 <= d <= 256 for d in dropped), dropped


def test_the_dumps_show_one_dispatch_and_one_combine_per_moe_block(tiny_yaml, tmp_path, capsys):
    from runtime.cli import main

    spec = tiny_yaml()
    assert main(["compile", str(spec), "--dump", str(tmp_path / "d"), "--no-compile", "--set", "parallel.expert=2"]) == 0
    fused = (tmp_path / "d" / "fused.py").read_text()
    # the tiny spec's 2 distinct blocks (local/moe, global/moe); rank 0 holds experts 0, 1 of 4
    assert fused.count("torch.ops.grapefx.expert_dispatch(") == 2 and fused.count("torch.ops.grapefx.expert_combine(") == 2
    assert "expert_dispatch(layer1_moe_tokens, layer1_moe_expert_index, 4, 2, '', 0.0)" in fused
    assert "layer1_moe_experts_w_gate" in fused and "(2, 16, 16)" in (tmp_path / "d" / "fused.txt").read_text()


@pytest.mark.parametrize("args, message", [
    (["--nproc", "3", "--set", "parallel.expert=2"], "parallel.expert: 2 does not divide the 3 processes of this run"),
    (["--set", "parallel.expert=2"], "parallel.expert: 2 does not divide the 1 process of this run"),
    (["--nproc", "4", "--set", "parallel.expert=3"], "parallel.expert: 4 experts cannot be split evenly over 3 ranks"),
])
def test_an_expert_split_that_does_not_fit_is_refused_before_launch(tiny_yaml, tmp_path, capsys, args, message):
    from runtime.cli import main

    assert main(["train", str(tiny_yaml(micro_batch=1, global_batch=12)), "--out", str(tmp_path / "run"), "--no-compile", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(str(tmp_path / "tiny.yaml")) and message in err      # names the file
    assert not (tmp_path / "run").exists()
