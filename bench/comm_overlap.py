"""How much of a distributed step's communication overlaps computation (run under torchrun).

    torchrun --standalone --nproc-per-node N bench/comm_overlap.py SPEC OUT.json [--set key=value ...]

Every rank builds the trainer of SPEC (``runtime.trainer.Trainer``, with ``parallel`` as the
spec and ``--set`` say), trains WARM steps, then PROFILED steps under ``torch.profiler``. Rank 0
writes OUT.json and prints the profiler table (top 15 by device time). On CUDA, from the kernel
timeline of rank 0:

    comm      = the union of the intervals of NCCL kernels (all-gather, reduce-scatter, all-reduce,
                all-to-all)
    compute   = the union of the intervals of every other kernel
    overlap   = |comm ∩ compute| / |comm|     the share of communication hidden behind compute

FSDP2's prefetch (the next block's all-gather issued during this block) raises it; the expert
all-to-all sits on the critical path (its result is needed next) and hides little. On CPU (a dry
run with gloo) there are no kernels: the JSON has the table and overlap null.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in intervals)


def _intersection(x: list[tuple[int, int]], y: list[tuple[int, int]]) -> int:
    """Total length of the intersection of two sorted disjoint interval lists."""
    i = j = total = 0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def overlap(kernels: list[tuple[str, int, int]]) -> dict:
    """kernels: (name, start ns, end ns) on the device -> comm and compute time and their overlap."""
    comm = _union([(s, e) for n, s, e in kernels if "nccl" in n.lower()])
    compute = _union([(s, e) for n, s, e in kernels if "nccl" not in n.lower()])
    c = _length(comm)
    hidden = _intersection(comm, compute)
    return {"comm_ms": c / 1e6, "compute_ms": _length(compute) / 1e6, "hidden_comm_ms": hidden / 1e6,
            "overlap": hidden / c if c else None}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("out")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--profiled", type=int, default=2)
    args = p.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from runtime.distributed import process_group
    from runtime.trainer import Trainer
    from spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    with process_group() as (world, device), tempfile.TemporaryDirectory() as run:
        trainer = Trainer(spec, Path(run) / "run", world=world, device=device, tty=False)
        for _ in range(args.warm):                  # the compile, then steady steps
            trainer._train_step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.profiled):
                trainer._train_step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        trainer.close()
        if world.coordinator:
            kernels = [(e.name(), e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events()
                       if e.device_type() == torch.autograd.DeviceType.CUDA]
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=15)
            doc = {"spec": args.spec, "overrides": args.overrides, "ranks": world.size, "device": str(device),
                   "parallel": {"data": spec.parallel.data, "expert": spec.parallel.expert},
                   "profiled_steps": args.profiled, **(overlap(kernels) if kernels else {"overlap": None}),
                   "table": table}
            Path(args.out).write_text(json.dumps(doc, indent=1))
            print(table)
            print(f"communication hidden behind compute: {doc['overlap']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    sys.exit(main())
