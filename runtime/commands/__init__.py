"""The subcommands of ``grapefx`` (one module each; ``runtime.cli`` lists them)."""

import argparse


def add_overrides(parser: argparse.ArgumentParser, example: str, what: str = "a spec value") -> None:
    """``--set KEY=VALUE`` (repeatable, applied in order) into ``args.overrides``: every command that
    takes a spec takes it."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override {what}, e.g. --set {example} (repeatable)")
