"""`grapefx train` refuses before launching or allocating: a global batch that does not split over the
ranks of --nproc, and a training state (16 B per parameter) larger than the device's memory."""

from pathlib import Path

import pytest

from runtime.cli import main
from runtime.commands import train_cmds

TINY = str(Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml")


@pytest.fixture
def no_launch(monkeypatch):
    """Record what would be launched or trained instead of doing it."""
    calls = []
    monkeypatch.setattr(train_cmds, "_launch", lambda args, under: calls.append(("launch", args.nproc)) or 0)
    monkeypatch.setattr(train_cmds, "_fit", lambda spec, run, args, **where: calls.append(("fit", None)) or 0)
    return calls


def test_nproc_with_a_global_batch_that_does_not_split_is_refused_before_launch(no_launch, capsys):
    # tiny: global_batch 8, micro_batch 8; 3 ranks need a multiple of 24
    assert main(["train", TINY, "--nproc", "3"]) == 2
    assert capsys.readouterr().err == (
        f"{TINY}: train.global_batch: 8 sequences cannot be split into micro-batches of 8 on 3 ranks: global_batch "
        "must be a multiple of micro_batch x ranks = 24 (e.g. 24); or change micro_batch or the number of processes\n")
    assert main(["train", TINY, "--nproc", "2", "--set", "train.global_batch=36", "--set", "train.micro_batch=4"]) == 2
    assert "global_batch must be a multiple of micro_batch x ranks = 8 (e.g. 32 or 40)" in capsys.readouterr().err
    assert no_launch == []
    assert main(["train", TINY, "--nproc", "2", "--set", "train.micro_batch=4"]) == 0    # 8 = 4 x 2
    assert no_launch == [("launch", 2)]


def test_a_state_larger_than_the_memory_is_refused_naming_the_fields(no_launch, monkeypatch, capsys):
    # tiny has 2,053,264 parameters (tests/spec/test_derive.py's groups): 16 B each = 32,852,224 B = 31.33 MiB
    monkeypatch.setattr(train_cmds, "_memory", lambda nproc: (16 * 2**20, "one GPU (test)", 1))
    assert main(["train", TINY]) == 2
    assert capsys.readouterr().err == (
        f"{TINY}: the training state alone needs 31.33 MiB (2,053,264 parameters x 16 B: fp32 weights, gradients, "
        "AdamW m and v), more than one GPU (test) holds (16.00 MiB); lower the largest parameter groups: routed "
        "experts 1.57M (moe.experts, moe.expert_hidden, model.n_layers), attention 196.61K (attention.<kind>.heads, "
        "attention.<kind>.head_dim, model.n_layers), shared experts 196.61K (moe.shared_experts, moe.expert_hidden, "
        "model.n_layers)\n")
    # FSDP over 2 ranks: 16,426,112 B per GPU fits in 16 MiB
    assert main(["train", TINY, "--nproc", "2", "--set", "train.micro_batch=4", "--set", "parallel.data=fsdp"]) == 0
    assert no_launch == [("launch", 2)]


def test_on_cpu_the_processes_of_the_machine_share_its_ram(no_launch, monkeypatch, capsys):
    monkeypatch.setattr(train_cmds.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 12_000}[name])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    # 12,000 pages of 4 KiB = 46.88 MiB: one process (31.33 MiB) fits, two DDP processes (62.66 MiB) do not
    assert main(["train", TINY]) == 0 and no_launch == [("fit", None)]
    assert main(["train", TINY, "--nproc", "2", "--set", "train.micro_batch=4"]) == 2
    assert capsys.readouterr().err.startswith(
        f"{TINY}: the training state alone needs 62.66 MiB (2,053,264 parameters x 16 B: fp32 weights, gradients, "
        "AdamW m and v, for 2 processes), more than this machine's RAM holds (46.88 MiB); ")


# tiny's groups (spec/derive.py, C = d_model 128, F = expert_hidden 128, X = 8 experts, all 4 layers MoE):
# routed experts 4 layers x 3*C*F*X = 4 x 3*128*128*8 = 4 x 393,216 = 1,572,864; the other parameters
# 2,053,264 - 1,572,864 = 480,400. At 16 B: routed 25,165,824 B, the rest 7,686,400 B.


def test_expert_parallelism_counts_only_the_experts_a_rank_holds(no_launch, monkeypatch, capsys):
    monkeypatch.setattr(train_cmds, "_memory", lambda nproc: (16 * 2**20, "one GPU (test)", 1))
    four = ["--nproc", "4", "--set", "train.micro_batch=2"]
    # DDP over 4 ranks, E = 1: every rank holds all 2,053,264 x 16 = 32,852,224 B = 31.33 MiB > 16 MiB
    assert main(["train", TINY, *four]) == 2
    assert "needs 31.33 MiB (2,053,264 parameters x 16 B: fp32 weights, gradients, AdamW m and v), more than" in (
        capsys.readouterr().err)
    # E = 4: 7,686,400 + 25,165,824 / 4 = 7,686,400 + 6,291,456 = 13,977,856 B = 13.33 MiB <= 16 MiB
    assert main(["train", TINY, *four, "--set", "parallel.expert=4"]) == 0
    assert no_launch == [("launch", 4)]


def test_under_fsdp_the_experts_are_split_over_e_ranks_not_sharded_over_all(no_launch, monkeypatch, capsys):
    monkeypatch.setattr(train_cmds, "_memory", lambda nproc: (12 * 2**20, "one GPU (test)", 1))
    fsdp = ["--nproc", "4", "--set", "train.micro_batch=2", "--set", "parallel.data=fsdp"]
    # FSDP over 4 ranks, E = 2: 7,686,400 / 4 + 25,165,824 / 2 = 1,921,600 + 12,582,912 = 14,504,512 B
    # = 13.83 MiB > 12 MiB (sharding the experts too would give 32,852,224 / 4 = 7.83 MiB: they are not)
    assert main(["train", TINY, *fsdp, "--set", "parallel.expert=2"]) == 2
    assert capsys.readouterr().err == (
        f"{TINY}: the training state alone needs 13.83 MiB (2,053,264 parameters x 16 B: fp32 weights, gradients, "
        "AdamW m and v, routed experts (1,572,864) split over 2 ranks, the other 480,400 sharded over 4 ranks), more "
        "than one GPU (test) holds (12.00 MiB); lower the largest parameter groups: routed experts 1.57M "
        "(moe.experts, moe.expert_hidden, model.n_layers), attention 196.61K (attention.<kind>.heads, "
        "attention.<kind>.head_dim, model.n_layers), shared experts 196.61K (moe.shared_experts, moe.expert_hidden, "
        "model.n_layers)\n")
    # E = 4: 1,921,600 + 25,165,824 / 4 = 1,921,600 + 6,291,456 = 8,213,056 B = 7.83 MiB fits
    assert main(["train", TINY, *fsdp, "--set", "parallel.expert=4"]) == 0
    assert no_launch == [("launch", 4)]


def test_an_expert_split_that_does_not_divide_the_ranks_is_refused_before_the_memory(no_launch, monkeypatch, capsys):
    monkeypatch.setattr(train_cmds, "_memory", lambda nproc: (2**20, "one GPU (test)", 1))
    assert main(["train", TINY, "--set", "parallel.expert=2"]) == 2
    assert capsys.readouterr().err.startswith(f"{TINY}: parallel.expert: 2 does not divide the 1 process of this run")
    assert no_launch == []
