"""One training step of a spec, this tree against another (an earlier commit), side by side on one machine.

    git archive REV | (mkdir -p .dev/before && tar -x -C .dev/before)       # where git is, before the call
    python3 bench/ab.py .dev/before [--out DIR] [--spec examples/baseline.yaml] [--steps 8] [--limit 240]
                        [--trace] [--set KEY=VALUE ...]

Runs ``grapefx bench SPEC --ways grapefx`` (profiled, one micro-batch of SPEC per step, ``--set
train.global_batch=...`` to change it) in the other tree, then in this one, each in its own process
with its own empty ``TORCHINDUCTOR_CACHE_DIR``: Inductor's cache key does not cover what our ops
call, so a cache shared between two trees can serve one tree's compiled kernels to the other.
Prints and writes (``DIR/ab.json``, the two bench JSONs, ``DIR/kernels.md``) tokens/s, step time,
the ratio, peak memory, compile time, the losses at the first step and at step warmup + steps,
whether the step times settled, and the kernel groups of both. ``--limit`` bounds each run (seconds).
``--trace`` also takes each run's profiler trace, so that ``DIR/kernels.md`` says where each GPU sat
idle in the step and which host op it waited on (``runtime.bench.gaps``): for a change that moves
kernel time one way and the step the other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("tokens_per_s", "step_ms", "peak_memory_gib", "compile_cold_s", "loss_step1", "loss_last", "steady")


def bench(tree: Path, name: str, args, out: Path) -> dict:
    """``grapefx bench`` of ``args.spec`` in ``tree``; its grapefx way's record (``status`` says how it went)."""
    result, prof = out / f"bench_{name}.json", out / f"profile_{name}"
    cmd = [sys.executable, "-m", "runtime.cli", "bench", args.spec, "--out", str(result), "--ways", "grapefx",
           "--steps", str(args.steps), "--warmup", "3", "--warm-compile", "none",
           "--trace-ways", "grapefx" if args.trace else "none",
           "--profile", str(prof)] + [a for s in args.set for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=str(tree), TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix=f"ab-inductor-{name}-"))
    print(f"== {name}: {tree}", flush=True)
    try:
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=args.limit)
    except subprocess.TimeoutExpired:
        return {"status": f"cut off after {args.limit} s"}
    print("\n".join(p.stdout.splitlines()[-4:]), flush=True)
    if p.returncode or not result.is_file():
        last = (p.stderr or p.stdout).strip().splitlines()
        return {"status": "error", "error": last[-1] if last else f"exit status {p.returncode}, no output"}
    return json.loads(result.read_text())["ways"]["grapefx"]


def _cell(v, key: str = "") -> str:
    return "-" if v is None else f"{v:,.0f}" if key == "tokens_per_s" else f"{v:.6g}" if isinstance(v, float) else str(v)


def compare(before: dict, after: dict) -> list[str]:
    """The side-by-side table, Markdown."""
    lines = ["| | before | after |", "|---|---|---|"]
    lines += [f"| {k} | {_cell(before.get(k), k)} | {_cell(after.get(k), k)} |" for k in ("status",) + FIELDS]
    if before.get("tokens_per_s") and after.get("tokens_per_s"):
        lines.append(f"| after / before tokens/s | | **{after['tokens_per_s'] / before['tokens_per_s']:.3f}x** |")
    b_groups, a_groups = ((r.get("profile") or {}).get("groups_ms_per_step", {}) for r in (before, after))
    for g in sorted(set(b_groups) | set(a_groups)):
        lines.append(f"| {g} (ms a step) | {_cell(b_groups.get(g))} | {_cell(a_groups.get(g))} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", help="the other tree (a folder holding an earlier commit's files)")
    ap.add_argument("--out", default=os.environ.get("OUT", "ab-out"))
    ap.add_argument("--spec", default="examples/baseline.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--limit", type=int, default=240, help="seconds each run may take")
    ap.add_argument("--trace", action="store_true", help="take profiler traces: where the GPU sat idle, and why")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    before_tree = Path(args.before).resolve()
    if not (before_tree / "runtime" / "cli.py").is_file():
        print(f"ab: {args.before} holds no grapefx tree (no runtime/cli.py); export one with "
              "`git archive REV | tar -x -C DIR`", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    before = bench(before_tree, "before", args, out)
    after = bench(ROOT, "after", args, out)
    table = compare(before, after)
    print("\n".join(table))
    kernels = [(out / f"profile_{n}" / "kernels.md") for n in ("before", "after")]
    (out / "kernels.md").write_text("\n".join(f"# {n}\n\n" + k.read_text() for n, k in zip(("before", "after"), kernels)
                                              if k.is_file()))
    (out / "ab.json").write_text(json.dumps({"spec": args.spec, "before_tree": str(before_tree), "steps": args.steps,
                                             "set": args.set, "before": before, "after": after}, indent=1))
    return 0 if before.get("status") == after.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
