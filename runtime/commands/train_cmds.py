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
                    "and stops; --resume continues from the newest complete one. Before launching or allocating "
                    "anything it checks that global_batch splits over the ranks and that the training state "
                    "(16 B per parameter) fits in the device's memory.")
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
    from runtime.distributed import launched_by_torchrun, process_group
    from spec import load_spec

    if args.nproc is not None and args.nproc < 1:           # before any rule that divides by it
        raise GrapefxError(f"--nproc: {args.nproc} processes; give N >= 1")
    overrides = list(args.overrides)
    overrides += [f"train.steps={args.steps}"] if args.steps is not None else []
    overrides += ["compile.enabled=false"] if args.no_compile else []
    spec = load_spec(args.spec, overrides)                  # a user error stops here, before any launch
    preflight(spec, args.spec, args.nproc)                  # and so does a batch or a size this launch cannot run
    run = Path(args.out or spec.output or Path("runs") / spec.name)
    if args.nproc is not None:
        return _launch(args, launched_by_torchrun())
    if not launched_by_torchrun():
        return _fit(spec, run, args)
    with process_group() as (world, device):
        return _fit(spec, run, args, world=world, device=device)


def preflight(spec, file: str, nproc: int | None) -> None:
    """Refuse, before launching or allocating, what the ranks would refuse or could not hold.

    ranks = ``--nproc`` (or torchrun's WORLD_SIZE):

    - ``parallel.expert`` E must divide the ranks (``runtime.distributed.check_expert_split``, the rule the
      ranks apply), checked first since the state below assumes groups of E ranks;
    - the global batch must split into whole micro-batches on every rank: global_batch % (micro_batch x ranks)
      == 0;
    - the training state alone must fit in one GPU's memory, or on CPU in the system RAM for all the processes of
      this machine. Per rank, with ``spec.derive.TRAIN_STATE_BYTES_PER_PARAM`` = 16 B per parameter and
      X the routed-expert parameters (``param_counts(spec).groups["routed_experts"]``) when E > 1, else 0::

          (total - X) x 16 / (ranks under FSDP, else 1)  +  X x 16 / E

      since the parameters are replicated under DDP and sharded over all ranks under FSDP2, except, when E > 1,
      the routed experts: they stay outside both wrappers and each rank holds its expert group's 1/E of them,
      whatever parallel.data is (``runtime.distributed.Parallel``). With E = 1 they are ordinary parameters.
    """
    from runtime.distributed import check_expert_split
    from spec.derive import TRAIN_STATE_BYTES_PER_PARAM, largest_groups, param_counts
    from spec.errors import SpecError
    from spec.report import human

    t, E = spec.train, spec.parallel.expert
    ranks = nproc if nproc is not None else int(os.environ.get("WORLD_SIZE", "1"))
    check_expert_split(E, ranks, file)
    step = t.micro_batch * max(ranks, 1)
    if t.global_batch % step:
        lower = t.global_batch // step * step
        raise SpecError(file, "train.global_batch",
                        f"{t.global_batch} sequences cannot be split into micro-batches of {t.micro_batch} on {ranks} "
                        f"ranks: global_batch must be a multiple of micro_batch x ranks = {step} (e.g. "
                        + (f"{lower} or " if lower else "") + f"{lower + step}); or change micro_batch or the "
                        "number of processes")
    counts = param_counts(spec)
    total = counts.total
    experts = counts.groups["routed_experts"] if E > 1 else 0      # split apart from the rest only when E > 1
    fsdp = spec.parallel.data == "fsdp" and ranks > 1
    per_rank = ((total - experts) * TRAIN_STATE_BYTES_PER_PARAM // (ranks if fsdp else 1)
                + experts * TRAIN_STATE_BYTES_PER_PARAM // E)
    memory, where, processes = _memory(nproc)
    need = per_rank * processes
    if memory is not None and need > memory:
        if E > 1:
            split = f", routed experts ({experts:,}) split over {E} ranks" + (
                f", the other {total - experts:,} sharded over {ranks} ranks" if fsdp else "")
        else:
            split = f", sharded over {ranks} ranks" if fsdp else ""
        groups = ", ".join(f"{g.replace('_', ' ')} {human(n)} ({', '.join(fields)})"
                           for g, n, fields in largest_groups(spec))
        raise SpecError(file, None,
                        f"the training state alone needs {human(need, 'B')} ({total:,} parameters x "
                        f"{TRAIN_STATE_BYTES_PER_PARAM} B: fp32 weights, gradients, AdamW m and v{split}"
                        + (f", for {processes} processes" if processes > 1 else "")
                        + f"), more than {where} holds ({human(memory, 'B')}); lower the largest parameter groups: "
                        f"{groups}")


def _memory(nproc: int | None) -> tuple[int | None, str, int]:
    """(bytes, what they are, how many processes share them): one GPU's memory (one process per GPU), or the
    system RAM shared by this machine's processes; None where the system does not say."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"one GPU ({props.name})", 1
    processes = nproc if nproc is not None else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None, "", processes
    return ram, "this machine's RAM", max(processes, 1)


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
