"""How Triton pipelines the expert step's grouped GEMMs at each autotuned tile, from the compiled IR.

    python3 bench/kernel_ir.py [OUT.json] [--arch 90] [--first N]

Needs triton, not a GPU: each launch of ``compiler.kernels.grouped_gemm`` (as
``compiler.kernels.pipelining.GROUPED_GEMM_LAUNCHES`` describes it) is compiled for sm``arch`` with
the facts a launch specializes on, and its main loop read from the IR: shared memory, asynchronous
copies, how many tiles of each operand it keeps in flight and how many MMAs overlap. A check: every
tile must keep each operand ``num_stages`` deep (exit 1 otherwise); tiles needing more shared memory
than a Hopper block may use (227 KiB) are marked, the autotuner skips them there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HOPPER_BLOCK_SHARED = 232448        # bytes of shared memory one block may use on an H100 / H200


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="JSON file for the reports")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    ap.add_argument("--first", type=int, default=None, help="only the first N tiles of each launch")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_ir: unset TRITON_INTERPRET (interpreted kernels are not compiled)", file=sys.stderr)
        return 2
    from compiler.kernels.pipelining import GROUPED_GEMM_LAUNCHES, pipelining

    doc, short = {"arch": args.arch, "launches": {}}, []
    for name, (fn, signature, constexprs, unit, configs) in GROUPED_GEMM_LAUNCHES.items():
        rows = doc["launches"][name] = []
        for c in configs[:args.first]:
            r = pipelining(fn, signature, {**constexprs, **c.kwargs}, c.num_warps, c.num_stages, unit,
                           target=(args.arch, 32))
            r.update(tile=c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                     fits=r["shared_bytes"] <= HOPPER_BLOCK_SHARED)
            rows.append(r)
            deep = bool(r["operand_buffers"]) and all(b == c.num_stages for b in r["operand_buffers"])
            if not deep:
                short.append(f"{name} {c.kwargs}")
            print(f"{name:42s} {str(c.kwargs):36s} w{c.num_warps} s{c.num_stages}  buffers {r['operand_buffers']}  "
                  f"mma in flight {r['mma_waits']}  shared {r['shared_bytes'] // 1024} KiB"
                  + ("" if r["fits"] else "  (over a Hopper block's 227 KiB)") + ("" if deep else "  SHALLOW"),
                  flush=True)
    doc["shallow"] = short
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
