"""`grapefx train SPEC [--out RUN] [--steps N] [--resume] [--no-compile] [--set key=value ...]`.

Exit status: 0 done, 2 a user error (message on stderr), 3 the loss became NaN/Inf (the last good
checkpoint is kept), 130 interrupted by Ctrl-C after saving a checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path


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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.micro_batch=4 (repeatable)")
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
    from runtime.trainer import Trainer
    from spec import load_spec

    overrides = list(args.overrides)
    overrides += [f"train.steps={args.steps}"] if args.steps is not None else []
    overrides += ["compile.enabled=false"] if args.no_compile else []
    spec = load_spec(args.spec, overrides)
    run = Path(args.out or spec.output or Path("runs") / spec.name)
    trainer = Trainer(spec, run, resume=args.resume, command=_command(args))
    try:
        status = trainer.fit()
    finally:
        trainer.close()
    print(f"run folder: {run}")
    return status
