"""`grapefx ablate MATRIX [--out DIR] [--gpus 0,1|all] [--report-only] [--run NAME] [--set key=value ...]`.

An ablation matrix as one command (``runtime/ablate``): every run trained and scored by position on
the same rows, then the report.

Exit status: 0 done (report written), 2 a user error (an unfair matrix, a bad file; message on
stderr), 3 a run's loss became NaN/Inf, 130 interrupted by Ctrl-C (the run saved a checkpoint; the
same command continues).
"""

from __future__ import annotations

import argparse

from runtime.commands import add_overrides


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", help="train and compare the variants of an ablation matrix",
        description="Train every (variant, seed) run of MATRIX (see examples/ablation.yaml) into DIR/runs with "
                    "the same data order, initialisation, optimiser and schedule; evaluate each at the training "
                    "context and longer ones; write DIR/report.md, report.json, loss.png and grape_m_spectrum.png. "
                    "Refuses when variants differ in more than their overlays declare. Re-running the same command "
                    "skips finished runs and resumes unfinished ones.")
    p.add_argument("matrix", help="the matrix YAML file")
    p.add_argument("--out", metavar="DIR", help="folder for the runs and the report (default: runs/<matrix name>)")
    p.add_argument("--report-only", action="store_true", help="train and evaluate nothing: rewrite the report from "
                   "the eval.json, metrics.jsonl and env.json of DIR/runs/* (e.g. run folders copied from a GPU machine)")
    p.add_argument("--gpus", metavar="0,1|all", help="run the matrix's runs at the same time, one per listed GPU "
                   "(each its own process and normal run folder), then write the same report")
    p.add_argument("--run", metavar="NAME", help="train and evaluate only this run (e.g. baseline-seed1), no report; "
                   "what --gpus starts on each GPU")
    add_overrides(p, "train.steps=50", "a spec value in every run")
    p.set_defaults(func=_ablate)


def _command(args: argparse.Namespace) -> list[str]:
    cmd = ["grapefx", "ablate", args.matrix] + (["--out", args.out] if args.out else [])
    cmd += ["--report-only"] if args.report_only else []
    cmd += ["--gpus", args.gpus] if args.gpus else []
    cmd += ["--run", args.run] if args.run else []
    for o in args.overrides:
        cmd += ["--set", o]
    return cmd


def _ablate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from runtime.ablate.matrix import load_matrix
    from runtime.ablate.runner import ablate

    out = Path(args.out) if args.out else Path("runs") / load_matrix(args.matrix).name
    return ablate(args.matrix, out, args.overrides, command=_command(args), report_only=args.report_only,
                  only=args.run, gpus=args.gpus)
