"""`grapefx export RUN --out DIR [--dtype fp32|bf16] [--format grapefx|hf]`: weights (safetensors), spec, config,
tokenizer; ``--format hf`` for Hugging Face transformers (docs/hf-export.md)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's weights as safetensors with its spec, config and tokenizer",
        description="Write the newest complete checkpoint of RUN into DIR: model.safetensors, spec.yaml, "
                    "config.json and (BPE) tokenizer.json. grapefx generate DIR loads it back. --format hf writes a "
                    "folder that transformers loads instead: AutoModelForCausalLM.from_pretrained(DIR, "
                    "trust_remote_code=True) and AutoTokenizer.from_pretrained(DIR).")
    p.add_argument("run", metavar="RUN", help="the run folder (grapefx train --out)")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder (new, or empty)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weight dtype: fp32 (default, exact) or bf16 (matrices only; vectors stay fp32)")
    p.add_argument("--format", choices=("grapefx", "hf"), default="grapefx",
                   help="grapefx (default: loadable by grapefx generate) or hf (Hugging Face transformers, "
                        "trust_remote_code=True; lm-evaluation-harness loads it)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from runtime.export import export

    done = export(args.run, args.out, dtype=args.dtype, format=args.format)
    what = "" if args.format == "grapefx" else ", Hugging Face format"
    print(f"exported step {done.step} of {args.run} to {done.folder} ({done.bytes / 2**20:.2f} MiB of weights, "
          f"{args.dtype}{what})")
    if done.note:
        print(done.note)
    return 0
