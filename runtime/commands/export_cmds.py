"""`grapefx export RUN --out DIR [--dtype fp32|bf16]`: weights (safetensors), spec, config, tokenizer."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's weights as safetensors with its spec, config and tokenizer",
        description="Write the newest complete checkpoint of RUN into DIR: model.safetensors, spec.yaml, "
                    "config.json and (BPE) tokenizer.json. grapefx generate DIR loads it back.")
    p.add_argument("run", metavar="RUN", help="the run folder (grapefx train --out)")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder (new, or empty)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weight dtype: fp32 (default, exact) or bf16 (matrices only; vectors stay fp32)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from runtime.export import export

    done = export(args.run, args.out, dtype=args.dtype)
    print(f"exported step {done.step} of {args.run} to {done.folder} ({done.bytes / 2**20:.2f} MiB of weights, "
          f"{args.dtype})")
    return 0
