"""The ``grapefx`` command: one entry point, one module per subcommand.

Each module in ``COMMANDS`` exposes ``register(subparsers)``, which adds its subparser and sets
``func(args) -> int``. User errors (``GrapefxError``) print one line to stderr and exit 2. A reader
that stops early (``grapefx validate examples/*.yaml | head -1``) ends the command quietly with
status 141 (128 + SIGPIPE, what a shell reports for ``cat``), not with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from spec.errors import GrapefxError

# subcommand modules, in the order `grapefx --help` lists them
COMMANDS = [
    "runtime.commands.spec_cmds",      # validate, describe, from-megatron, to-megatron
    "runtime.commands.data_cmds",      # data prepare
    "runtime.commands.train_cmds",     # train
    "runtime.commands.ablate_cmds",    # ablate
    "runtime.commands.eval_cmds",      # eval
    "runtime.commands.compile_cmds",   # compile
    "runtime.commands.generate_cmds",  # generate
    "runtime.commands.export_cmds",    # export
    "runtime.commands.bench_cmds",     # bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grapefx",
        description="YAML-specified hybrid-attention MoE models: lower to torch.fx, fuse, compile, train.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GrapefxError as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader closed stdout: point it at /dev/null so the interpreter's final flush is quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
