"""``grapefx validate | describe | from-megatron | to-megatron``: the spec layer's subcommands.

Every command that takes a spec also takes ``--set KEY=VALUE`` (repeatable, applied in order).
User errors raise ``GrapefxError``; ``runtime.cli`` prints them (first stderr line
``FILE: key.path: message``) and exits 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from runtime.commands import add_overrides
from spec import dump_spec, load_spec, spec_from_dict

from spec.errors import GrapefxError, SpecError
from spec.megatron import import_megatron, megatron_notes, to_megatron
from spec.megatron.patterns import RECIPE
from spec.report import describe, describe_text, summary_line


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="a YAML spec, e.g. examples/baseline.yaml")
    add_overrides(p, "train.steps=50", "one value")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("validate", help="check specs (or ablation matrices): an 'ok' line per good file, "
                                               "every problem of the others (exit 2 if any fails)",
                              description="Check each SPEC: load it, merge `extends:`, apply --set, check every rule. "
                                          "Prints `ok: FILE (layers; MoE; parameters; training state)` for each good "
                                          "file and `FILE: key.path: message` for every problem of the others; exit "
                                          "status 2 if any file fails.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="YAML specs, e.g. examples/*.yaml")
    add_overrides(p, "train.steps=50", "one value (in every SPEC)")
    p.set_defaults(func=cmd_validate)

    p = subparsers.add_parser("describe", help="per-layer table, parameters, FLOPs/token, KV cache, resolved spec")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable, everything the text shows: layers (with KV "
                                                       "bytes), params (with groups), training state, FLOPs, KV cache, "
                                                       "router, attention costs, the resolved spec")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="context length for the KV-cache figures (default: data.seq_len)")
    p.set_defaults(func=cmd_describe)

    p = subparsers.add_parser("from-megatron", help="a YAML spec from Megatron-LM flags (after --)",
                              description="Translate a Megatron-LM recipe: grapefx from-megatron [--out FILE] "
                                          "-- --num-layers 24 ... (or --file RECIPE.txt)")
    p.add_argument("--out", metavar="FILE", help="write the YAML here instead of stdout")
    p.add_argument("--strict", action="store_true", help="refuse flags grapefx cannot model instead of warning")
    p.add_argument("--file", metavar="RECIPE", help="read the flags from a file (shell words; # comments)")
    p.add_argument("flags", nargs="*", metavar="FLAGS", help="Megatron flags, after --")
    p.set_defaults(func=cmd_from_megatron)

    p = subparsers.add_parser("to-megatron", help="Megatron-LM flags for a spec")
    _add_spec_args(p)
    p.set_defaults(func=cmd_to_megatron)


def cmd_validate(args: argparse.Namespace) -> int:
    """Each file on its own: one ``ok`` line, or its problems; exit 2 when any file fails."""
    failed = 0
    for file in args.specs:
        try:
            print(f"ok: {file} ({_validate_one(file, args.overrides)})", flush=True)
        except GrapefxError as e:
            print(str(e), file=sys.stderr, flush=True)
            failed += 1
    if failed and len(args.specs) > 1:
        print(f"{failed} of {len(args.specs)} files failed", file=sys.stderr)
    return 2 if failed else 0


def _validate_one(file: str, overrides: list[str]) -> str:
    """What the ``ok`` line says about ``file`` (a spec or an ablation matrix); raises its problems."""
    from runtime.ablate.matrix import check_variants, is_matrix_file, load_matrix, run_spec
    if is_matrix_file(file):          # an ablation matrix: every run's spec, and the fairness check
        matrix = load_matrix(file)
        for variant in matrix.variants:
            for seed in matrix.seeds:
                run_spec(matrix, variant, seed, overrides)
        diffs = check_variants(matrix, overrides)
        differing = "; ".join(f"{name}: {', '.join(c.key for c in changes) or 'the baseline'}"
                              for name, changes in diffs.items())
        return f"ablation matrix: {len(matrix.variants)} variants x {len(matrix.seeds)} seeds; {differing}"
    return summary_line(load_spec(file, overrides))


def cmd_describe(args: argparse.Namespace) -> int:
    if args.context is not None and args.context < 1:
        raise SpecError("--context", None, f"{args.context} tokens: the context must be >= 1")
    spec = load_spec(args.spec, args.overrides)
    if args.json:
        print(json.dumps(describe(spec, args.context), indent=2))
    else:
        print(describe_text(spec, args.spec, args.context))
    return 0


def _recipe_words(args: argparse.Namespace) -> list[str]:
    words = list(args.flags)
    if args.file:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except OSError as e:
            raise SpecError(args.file, None, f"cannot read the recipe: {e.strerror}") from None
        try:
            words = shlex.split(text.replace("\\\n", " "), comments=True) + words
        except ValueError as e:
            raise SpecError(args.file, None, f"not readable as shell words: {e}") from None
    if not words:
        raise SpecError(RECIPE, None, "no flags: pass them after --, e.g. grapefx from-megatron -- --num-layers 24 "
                                      "--hidden-size 1024 --num-attention-heads 16, or use --file RECIPE")
    return words


def cmd_from_megatron(args: argparse.Namespace) -> int:
    result = import_megatron(_recipe_words(args), strict=args.strict)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    d = result.spec
    if args.out:
        d = dict(d, name=Path(args.out).stem)
    text = dump_spec(spec_from_dict(d, file=RECIPE))
    header = ["# Generated by `grapefx from-megatron`.",
              "# Flags the recipe omits take Megatron-LM's defaults; these were applied:"]
    header += [f"#   {x}" for x in result.defaults]
    if result.warnings:
        header.append("# Warnings:")
        header += [f"#   {w}" for w in result.warnings]
    out = "\n".join(header) + "\n" + text
    if args.out:
        Path(args.out).write_text(out, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(out)
    return 0


def cmd_to_megatron(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    try:
        flags = to_megatron(spec)
    except SpecError as e:
        raise SpecError(args.spec, e.key, e.message) from None
    for note in megatron_notes(spec):
        print(f"# note: {note}", file=sys.stderr)
    lines, i = [], 0
    while i < len(flags):
        j = i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            j += 1
        lines.append(" ".join(shlex.quote(w) for w in flags[i:j]))
        i = j
    print(" \\\n".join(lines))
    return 0
