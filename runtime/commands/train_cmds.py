"""`grapefx train SPEC [--out RUN] [--steps N] [--resume] [--no-compile] [--set key=value ...] [--nproc N]`.

Exit status: 0 done, 2 a user error (message on stderr), 3 the loss became NaN/Inf (the last good
checkpoint is kept), 130 interrupted by Ctrl-C after saving a checkpoint.

Several processes (data parallel, ``runtime.distributed``): under torchrun
(``torchrun --nproc-per-node N -m runtime.cli train SPEC ...``) each process joins the job and
trains its rank. ``--nproc N`` is the single-machine shortcut: it checks the spec, then runs
``python -m torch.distributed.run --standalone --nproc-per-node N -m runtime.cli train ...`` with
the other arguments, in its own session, and passes Ctrl-C (SIGINT) and SIGTERM on to it, once per
press: torchrun hands the signal to every rank, the ranks finish the step, save a checkpoint
together and exit. The exit status is torchrun's (0, or 1 when a rank failed: its summary names
the rank and that rank's status), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from runtime.commands import add_overrides
from spec.errors import GrapefxError

# seconds torchrun waits for the ranks to save their checkpoint after Ctrl-C before killing them
# (recent torch reads this variable, 2.13 does; older versions wait a fixed 30 s)
SHUTDOWN_TIMEOUT = "300"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a spec (the main job)",
        description="Train SPEC: prepare its data (cached), build the model, train to train.steps, writing "
                    "metrics, checkpoints and a loss plot into the run folder. Ctrl-C saves a checkpoint "
                    "and stops; --resume continues from the newest complete one.")
    p.add_argument("spec", help="the spec YAML file")
    p.add_argument("--out", metavar="RUN", help="run folder (default: the spec's output, else runs/<name>)")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps (same as --set train.steps=N)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in RUN")
    p.add_argument("--no-compile", action="store_true", help="run the graphs eagerly (same as --set compile.enabled=false)")
    add_overrides(p, "train.micro_batch=4")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel in N processes on this machine (one per GPU; parallel.data picks "
                        "ddp or fsdp) by launching torchrun --standalone --nproc-per-node N; for several "
                        "machines run torchrun on each (docs/distributed.md)")
    p.set_defaults(func=_train)


def _command(args: argparse.Namespace) -> list[str]:
    cmd = ["grapefx", "train", args.spec]
    cmd += ["--out", args.out] if args.out else []
    cmd += ["--steps", str(args.steps)] if args.steps is not None else []
    cmd += ["--resume"] if args.resume else []
    cmd += ["--no-compile"] if args.no_compile else []
    for o in args.overrides:
        cmd += ["--set", o]
    return cmd


def _train(args: argparse.Namespace) -> int:
    from runtime.distributed import check_expert_split, launched_by_torchrun, process_group
    from spec import load_spec

    overrides = list(args.overrides)
    overrides += [f"train.steps={args.steps}"] if args.steps is not None else []
    overrides += ["compile.enabled=false"] if args.no_compile else []
    spec = load_spec(args.spec, overrides)                  # a user error stops here, before any launch
    run = Path(args.out or spec.output or Path("runs") / spec.name)
    check_expert_split(spec.parallel.expert, args.nproc or int(os.environ.get("WORLD_SIZE", 1)))
    if args.nproc is not None:
        return _launch(args, launched_by_torchrun())
    if not launched_by_torchrun():
        return _fit(spec, run, args)
    with process_group() as (world, device):
        return _fit(spec, run, args, world=world, device=device)


def _fit(spec, run: Path, args: argparse.Namespace, **where) -> int:
    from runtime.trainer import Trainer

    trainer = Trainer(spec, run, resume=args.resume, command=_command(args), **where)
    try:
        status = trainer.fit()
    finally:
        trainer.close()
    if trainer.world.coordinator:
        print(f"run folder: {run}")
    return status


def torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    """The torchrun command line ``--nproc`` runs: ``train_args`` are what follows ``grapefx train``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "runtime.cli", "train", *train_args]


def _launch(args: argparse.Namespace, under_torchrun: bool) -> int:
    import torch

    if under_torchrun:
        raise GrapefxError("--nproc: this process was started by torchrun already; drop --nproc "
                           "(torchrun's --nproc-per-node sets the number of processes)")
    if args.nproc < 1:
        raise GrapefxError(f"--nproc: {args.nproc} processes; give N >= 1")
    if torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        raise GrapefxError(f"--nproc: {args.nproc} processes but this machine has {torch.cuda.device_count()} GPUs; "
                           "one process per GPU, so use at most that many")
    env = dict(os.environ)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT)
    proc = subprocess.Popen(torchrun_command(args.nproc, _command(args)[2:]), env=env, start_new_session=True)
    signals = []

    def forward(signum, frame):
        signals.append(signum)
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 130 if signal.SIGINT in signals else status
