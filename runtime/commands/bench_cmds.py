"""``grapefx bench SPEC --out FILE.json [--ways a,b] [--steps N] [--warmup N] [--profile DIR] [--set k=v]``.

Runs the five ways of ``runtime.bench`` (eager, compile, flex, reference, grapefx) on the same
batches in one process and writes FILE.json after each way; prints a short table last.
Exit status 0 when every way asked for ran, 1 when one failed or was skipped, 2 on a user error.
"""

from __future__ import annotations

import argparse

from runtime.commands import add_overrides
from spec.errors import GrapefxError

WAY_NAMES = ("eager", "compile", "flex", "reference", "grapefx")


def _ways(text: str, what: str) -> list[str]:
    if text.strip().lower() == "none":
        return []
    ways = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in ways if w not in WAY_NAMES]
    if bad:
        raise GrapefxError(f"{what}: unknown way(s) {', '.join(bad)}; choose from {', '.join(WAY_NAMES)}")
    return ways


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time the training step five ways (eager, compile, flex, reference, grapefx)",
        description="Benchmark a full training step (forward, backward, AdamW) of SPEC at its micro-batch and "
                    "sequence length, five ways, on the same random batches: tokens/s, step time, MFU against a "
                    "bf16 matmul peak measured in the run and the datasheet peak, peak memory, cold and warm "
                    "compile time, and the first step's loss (every way starts from the same weights).")
    p.add_argument("spec", metavar="SPEC", help="a YAML spec, e.g. examples/bench-small.yaml")
    p.add_argument("--out", required=True, metavar="FILE.json", help="where the results go (rewritten after each way)")
    p.add_argument("--ways", default=",".join(WAY_NAMES), metavar="A,B",
                   help="which ways to run (default: all five; they run in the order grapefx, reference, flex, eager, compile)")
    p.add_argument("--steps", type=int, default=10, metavar="N",
                   help="timed steps per window (the median of the last window is reported; another window, up "
                        "to 3, follows while the halves of the last differ by more than 3%%; default 10)")
    p.add_argument("--warmup", type=int, default=3, metavar="N",
                   help="untimed steps first, the compiling one included (default 3)")
    p.add_argument("--profile", metavar="DIR", help="profile a few steps per way: kernel-group table in the JSON and "
                                                    "DIR/kernels.md, Chrome traces for --trace-ways")
    p.add_argument("--profile-steps", type=int, default=3, metavar="N", help="steps under the profiler (default 3)")
    p.add_argument("--trace-ways", default="grapefx,reference", metavar="A,B",
                   help="ways whose profiler trace is written as DIR/trace_WAY.json.gz (default grapefx,reference)")
    p.add_argument("--warm-compile", default="grapefx,reference", metavar="A,B",
                   help="ways whose warm compile is timed (dynamo reset, caches warm); 'none' for none "
                        "(default grapefx,reference)")
    p.add_argument("--time-budget", type=float, metavar="S", help="skip the ways that would start after S seconds")
    add_overrides(p, "compile.activation_checkpointing=true")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import sys

    from runtime.bench import format_table, run_bench
    from spec import load_spec

    ways = _ways(args.ways, "--ways")
    if not ways:
        raise GrapefxError("--ways: name at least one way")
    spec = load_spec(args.spec, args.overrides)
    doc = run_bench(spec, args.out, ways=ways, steps=args.steps, warmup=args.warmup, profile_dir=args.profile,
                    profile_steps=args.profile_steps, trace_ways=_ways(args.trace_ways, "--trace-ways"),
                    warm_compile=_ways(args.warm_compile, "--warm-compile"), time_budget=args.time_budget,
                    command=["grapefx", "bench", *sys.argv[2:]] if len(sys.argv) > 1 else [],
                    say=lambda m: print(m, flush=True))
    print()
    print(format_table(doc))
    print(f"results: {args.out}")
    return 0 if all(doc["ways"].get(w, {}).get("status") == "ok" for w in ways) else 1
