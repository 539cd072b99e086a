"""The grouped GEMMs that read their rows in place, on baseline.yaml's experts: check, then time.

    PYTHONPATH=. python3 bench/grouped_gemm.py OUT.json [--tokens 16384] [--sweep SECONDS]
    TRITON_INTERPRET=1 PYTHONPATH=. python3 bench/grouped_gemm.py OUT.json --check-only   (CPU, small)

The expert step's lean path (``compiler.ops.experts``) used to copy the rows it needs into sorted order
before each grouped GEMM (x[order // K] forward and backward, grad_out[order // K] backward),
concatenate W_gate | W_up for the first GEMM, split dW_gate | dW_up with two copies and run SwiGLU as
its own pass. ``compiler.kernels.grouped_gemm`` reads the rows where they lie, takes the two weights as
they are, writes the two gradients in place and applies SwiGLU in the first GEMM's epilogue.

1. Correctness: each of its entry points against a per-expert fp32 matmul of the same bf16
   inputs, at a shape with an expert that gets no row and uneven groups: ||a - b|| / ||b|| < 1e-2.
2. Timing (median of Triton's timer) at the baseline's shapes (d 1024, 64 experts of 256, top-6;
   routing from random scores), step by step and for the whole lean forward and backward as they run
   now (``compiler.ops.experts``) against the same steps as they were (written out here), with the
   two's results compared and the autotuned tile of each kernel.

3. With ``--sweep``, instead of 2: every candidate tile of each launch timed alone (``sweep``), on
   balanced routing and on routing as a fresh router makes it (three experts take every token).

Writes one JSON document; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compiler.kernels import grouped_gemm as gg  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if torch.isfinite(a).all() else float("nan")


def _routing(N: int, E: int, K: int, dev: str, idle: int):
    """order, tok (= order // K), offs: N tokens routed to K of E experts by random scores, as the lean
    path sorts them; expert ``idle`` gets no row."""
    from compiler.ops import experts
    scores = torch.rand(N, E, device=dev)
    scores[:, idle] = -1.0
    order, offs = experts._lean_route(scores.topk(K, dim=1).indices, E)
    return order, order // K, offs


def _groups(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


def check(dev: str, dt: torch.dtype) -> dict:
    torch.manual_seed(1)
    N, C, F, E, K = 77, 128, 64, 5, 2
    order, tok, offs = _routing(N, E, K, dev, idle=3)
    R = order.numel()
    x = torch.randn(N, C, device=dev).to(dt)
    wg, wu = (torch.randn(E, C, F, device=dev) / C ** 0.5).to(dt), (torch.randn(E, C, F, device=dev) / C ** 0.5).to(dt)
    wd = (torch.randn(E, F, C, device=dev) / F ** 0.5).to(dt)
    dgu = torch.randn(R, 2 * F, device=dev).to(dt)
    hg = torch.randn(R, F, device=dev).to(dt)
    gout = torch.randn(N, C, device=dev).to(dt)
    f = lambda t: t.float()                                                     # noqa: E731
    xs = f(x)[tok]
    res = {}
    gu, h = gg.rows_mm_swiglu(x, tok, offs, wg, wu)
    ref_gu = torch.cat([torch.cat([xs[a:b] @ f(wg[e]), xs[a:b] @ f(wu[e])], 1) for e, (a, b) in enumerate(_groups(offs))])
    ref_h = torch.nn.functional.silu(f(gu[:, :F])) * f(gu[:, F:])
    res["rows_mm_swiglu gu"] = _rel(gu, ref_gu)
    res["rows_mm_swiglu h"] = _rel(h, ref_h)
    y = gg.rows_mm(gout, tok, offs, wd.transpose(1, 2))                         # W_down^T: a transposed view
    res["rows_mm gathered, transposed w"] = _rel(y, torch.cat([f(gout)[tok][a:b] @ f(wd[e]).t()
                                                               for e, (a, b) in enumerate(_groups(offs))]))
    y = gg.rows_mm(hg, None, offs, wd)
    res["rows_mm in order"] = _rel(y, torch.cat([f(hg)[a:b] @ f(wd[e]) for e, (a, b) in enumerate(_groups(offs))]))
    dwd = torch.empty(E, F, C, device=dev, dtype=dt)
    gg.weight_mm(hg, None, gout, tok, offs, dwd)
    res["weight_mm gathered b"] = _rel(dwd, torch.stack([f(hg)[a:b].t() @ f(gout)[tok][a:b]
                                                         for e, (a, b) in enumerate(_groups(offs))]))
    dwg, dwu = torch.empty_like(wg), torch.empty_like(wu)
    gg.weight_mm(x, tok, dgu, None, offs, dwg, dwu)
    ref = torch.stack([xs[a:b].t() @ f(dgu)[a:b] for e, (a, b) in enumerate(_groups(offs))])
    res["weight_mm gathered a, split"] = max(_rel(dwg, ref[..., :F]), _rel(dwu, ref[..., F:]))
    res["empty expert's gradient is zero"] = float(dwg[3].abs().max()) + float(dwd[3].abs().max())
    return res


C, F, E, K = 1024, 256, 64, 6            # baseline.yaml's experts: d 1024, 64 experts of 256, top-6


def _operands(N: int) -> tuple[torch.Tensor, ...]:
    """x (N, C), W_gate, W_up (E, C, F), W_down (E, F, C) and an output gradient (N, C), bf16 on the GPU,
    at baseline.yaml's shapes."""
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(N, C, device=dev, dtype=bf)
    wg, wu = (torch.randn(E, C, F, device=dev) * 0.03).to(bf), (torch.randn(E, C, F, device=dev) * 0.03).to(bf)
    wd = (torch.randn(E, F, C, device=dev) * 0.06).to(bf)
    return x, wg, wu, wd, torch.randn(N, C, device=dev, dtype=bf)


def timing(N: int) -> dict:
    from triton.testing import do_bench

    from compiler.kernels import moe
    from compiler.ops import experts

    def t(fn) -> float:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    torch.manual_seed(0)
    scores = torch.rand(N, E, device="cuda")
    top = scores.topk(K, dim=1)
    indices, gates = top.indices, top.values.to(torch.bfloat16)
    order, offs = experts._lean_route(indices, E)
    tok, pos = order // K, experts._inverse(order)
    R = order.numel()
    x, wg, wu, wd, gout = _operands(N)
    gmm = torch._grouped_mm
    g = gates.reshape(-1).index_select(0, order)
    rows = {}

    def before_fwd():                           # the lean forward as it was: gather, cat, GEMM, SwiGLU pass
        gu = gmm(x.index_select(0, tok), torch.cat([wg, wu], 2), offs=offs)
        y = gmm(moe.swiglu_fwd(gu), wd, offs=offs)
        return moe.gather_sum(y, pos, gates.reshape(-1), K), gu

    def before_bwd(gu):                         # the lean backward as it was
        xs, dy = x.index_select(0, tok), gout.index_select(0, tok)
        u = gmm(dy, wd.transpose(1, 2), offs=offs)
        dgu, hg, dgate = moe.swiglu_bwd(gu, u, g)
        dwd = gmm(hg.t(), dy, offs=offs)
        dwgu = gmm(xs.t(), dgu, offs=offs)
        dwg, dwu = dwgu[..., :F].contiguous(), dwgu[..., F:].contiguous()
        dxs = gmm(dgu, torch.cat([wg, wu], 2).transpose(1, 2), offs=offs)
        return moe.gather_sum(dxs, pos, None, K), dgate.index_select(0, pos).view(N, K), dwg, dwu, dwd

    def now_fwd():
        out, gu, _, _ = experts._lean_forward(x, indices, gates, wg, wu, wd)
        return out, gu

    def now_bwd(gu):
        return experts._lean_backward(gout, x, indices, gates, wg, wu, wd, gu, order, offs)

    out_b, gu_b = before_fwd()
    out_n, gu_n = now_fwd()
    rows["forward output, now vs before (rel)"] = _rel(out_n, out_b.float())
    rows["forward gu, now vs before (rel)"] = _rel(gu_n, gu_b.float())
    for name, a, b in zip(("dx", "dgates", "dw_gate", "dw_up", "dw_down"), now_bwd(gu_n), before_bwd(gu_b)):
        rows[f"backward {name}, now vs before (rel)"] = _rel(a, b.float())
    f2 = 2 * R * C * F
    u = gmm(gout.index_select(0, tok), wd.transpose(1, 2), offs=offs)
    dgu, hg, _ = moe.swiglu_bwd(gu_n, u, g)
    steps = {
        "fwd gate|up (+ gather, cat; + SwiGLU pass)": (
            lambda: moe.swiglu_fwd(gmm(x.index_select(0, tok), torch.cat([wg, wu], 2), offs=offs)),
            lambda: gg.rows_mm_swiglu(x, tok, offs, wg, wu), 2 * f2),
        "bwd u = dy W_down^T (+ gather)": (lambda: gmm(gout.index_select(0, tok), wd.transpose(1, 2), offs=offs),
                                           lambda: gg.rows_mm(gout, tok, offs, wd.transpose(1, 2)), f2),
        "bwd dW_down (dy gathered / in place)": (
            lambda: gmm(hg.t(), gout.index_select(0, tok), offs=offs),
            lambda: gg.weight_mm(hg, None, gout, tok, offs, torch.empty_like(wd)), f2),
        "bwd dW_gate|up (+ gather, split copies)": (
            lambda: [t_.contiguous() for t_ in gmm(x.index_select(0, tok).t(), dgu, offs=offs).split(F, 2)],
            lambda: gg.weight_mm(x, tok, dgu, None, offs, torch.empty_like(wg), torch.empty_like(wu)), 2 * f2),
        "whole forward (lean path)": (before_fwd, now_fwd, 3 * f2),
        "whole backward (lean path)": (lambda: before_bwd(gu_b), lambda: now_bwd(gu_n), 6 * f2),
    }
    for name, (before, now, flop) in steps.items():
        a, b = t(before), t(now)
        rows[name] = {"before_ms": round(a, 4), "now_ms": round(b, 4), "speedup": round(a / b, 3),
                      "before_tflops": round(flop / a / 1e9, 1), "now_tflops": round(flop / b / 1e9, 1)}
        print(f"{name:44s} before {a * 1e3:8.1f} us  now {b * 1e3:8.1f} us  {a / b:5.2f}x", flush=True)
    rows["configs"] = {name: {str(k): str(v) for k, v in tuner.cache.items()}
                       for name, tuner in (("rows_mm", gg._rows_tuned), ("rows_mm_swiglu", gg._swiglu_tuned),
                                           ("weight_mm", gg._weight_tuned))}
    # each tile's time in the last tuning of each kernel (Triton keeps the timings of its last tuning only)
    rows["config_timings_ms"] = {name: {str(k): [round(float(v), 4) for v in (t_ if isinstance(t_, list) else [t_])]
                                        for k, t_ in (getattr(tuner, "configs_timings", None) or {}).items()}
                                 for name, tuner in (("rows_mm", gg._rows_tuned), ("rows_mm_swiglu", gg._swiglu_tuned),
                                                     ("weight_mm", gg._weight_tuned))}
    print(json.dumps({k: rows[k] for k in ("configs", "config_timings_ms")}, indent=1))
    return rows


def sweep_grids() -> dict[str, list]:
    """Candidate tiles per launch: those whose operand buffers fit Hopper's shared memory (at most
    220 KiB: num_stages x the operand tiles in bf16) and whose fp32 accumulators fit the registers
    (at most 128 a thread)."""
    import triton
    rows, swiglu, weight = [], [], []
    for bm in (64, 128, 256):
        for bn in (64, 128, 256):
            for w in (4, 8):
                if bm * bn > 4096 * w or (w == 8 and bm * bn < 128 * 128):
                    continue
                for st in (3, 4, 5):
                    cfg = triton.Config({"BM": bm, "BN": bn, "BK": gg.ROWS_DEPTH_MULTIPLE}, num_warps=w, num_stages=st)
                    if st * (bm + bn) * 64 * 2 <= 220 * 1024:
                        rows.append(cfg)
                    if st * (bm + 2 * bn) * 64 * 2 <= 220 * 1024 and 2 * bm * bn <= 4096 * w:
                        swiglu.append(cfg)
    for bi in (64, 128, 256):
        for bo in (64, 128, 256):
            for br in (32, 64, 128):
                for w in (4, 8):
                    if bi * bo > 4096 * w or (w == 8 and bi * bo < 128 * 128):
                        continue
                    for st in (3, 4):
                        if st * (bi + bo) * br * 2 <= 220 * 1024:
                            weight.append(triton.Config({"BI": bi, "BO": bo, "BR": br}, num_warps=w, num_stages=st))
    return {"rows": rows, "swiglu": swiglu, "weight": weight}


def sweep(N: int, deadline: float) -> dict:
    """Every candidate tile (``sweep_grids``) of each grouped-GEMM launch of the expert step, timed one
    by one (the autotuner given that tile alone), on balanced routing and on routing as a fresh router
    makes it (three experts take every token): microseconds per launch, fastest first."""
    from triton.testing import do_bench

    from compiler.kernels import moe
    from compiler.ops import experts

    dev = "cuda"
    torch.manual_seed(0)
    hot = 3
    rest = torch.rand(N, E - hot, device=dev).topk(K - hot, dim=1).indices + hot
    routings = {"balanced": torch.rand(N, E, device=dev).topk(K, dim=1).indices,
                "skewed": torch.cat([torch.arange(hot, device=dev).expand(N, hot), rest], 1)}
    x, wg, wu, wd, gout = _operands(N)
    cases = {}
    for name, indices in routings.items():
        order, offs = experts._lean_route(indices, E)
        tok, R = order // K, order.numel()
        gu, _ = gg.rows_mm_swiglu(x, tok, offs, wg, wu)
        u = gg.rows_mm(gout, tok, offs, wd.transpose(1, 2))
        dgu, hg, _ = moe.swiglu_bwd(gu, u, torch.rand(R, device=dev, dtype=torch.bfloat16))
        dwg, dwu, dwd = torch.empty_like(wg), torch.empty_like(wu), torch.empty_like(wd)
        cases[name] = {
            "gate|up + SwiGLU": ("swiglu", gg._swiglu_tuned, functools.partial(gg.rows_mm_swiglu, x, tok, offs, wg, wu)),
            "u = dy W_down^T": ("rows", gg._rows_tuned, functools.partial(gg.rows_mm, gout, tok, offs, wd.transpose(1, 2))),
            "dW_gate | dW_up": ("weight", gg._weight_tuned, functools.partial(gg.weight_mm, x, tok, dgu, None, offs, dwg, dwu)),
            "dW_down": ("weight", gg._weight_tuned, functools.partial(gg.weight_mm, hg, None, gout, tok, offs, dwd)),
        }
    grids = sweep_grids()
    out: dict = {}
    for n, launch_name in enumerate(cases["balanced"]):
        grid_name, tuner, _ = cases["balanced"][launch_name]
        saved = tuner.configs
        current = [str(c) for c in saved]
        grid = sorted(grids[grid_name], key=lambda c: str(c) not in current)        # the built-in tiles first
        until = time.monotonic() + (deadline - time.monotonic()) / (len(cases["balanced"]) - n)   # a fair share
        results = []
        for cfg in grid:
            if time.monotonic() > until:
                break
            tuner.configs, tuner.cache = [cfg], {}
            row = {"tile": str(cfg)}
            try:
                for routing, launches in cases.items():
                    row[routing + "_us"] = round(float(do_bench(launches[launch_name][2], warmup=10, rep=40,
                                                                return_mode="median")) * 1e3, 1)
            except Exception as e:                  # noqa: BLE001 - a tile the compiler refuses: reported, skipped
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            results.append(row)
        tuner.configs, tuner.cache = saved, {}
        results.sort(key=lambda r: r.get("balanced_us", 1e9) + r.get("skewed_us", 1e9))
        out[launch_name] = {"timed": len(results), "of": len(grids[grid_name]), "fastest": results[:8],
                            "built_in": [r for r in results if r["tile"] in current]}
        print(f"{launch_name}: {json.dumps(out[launch_name]['fastest'][:4])}", flush=True)
        print(f"  built-in tiles: {json.dumps(out[launch_name]['built_in'])}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--sweep", type=float, metavar="SECONDS", default=0.0,
                    help="instead of the timing: time every candidate tile of each launch for up to SECONDS")
    args = ap.parse_args()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    dev = "cpu" if interp else "cuda"
    if interp:                                   # the interpreter cannot time configs: take the first of each
        for tuner in (gg._rows_tuned, gg._swiglu_tuned, gg._weight_tuned):
            tuner.configs = tuner.configs[:1]
    doc = {"device": "triton interpreter" if interp else torch.cuda.get_device_name(), "torch": torch.__version__}
    doc["check"] = check(dev, torch.float32 if interp else torch.bfloat16)
    failed = [k for k, v in doc["check"].items() if not v < 1e-2]
    for k, v in doc["check"].items():
        print(f"{'ok  ' if k not in failed else 'FAIL'} {k}: {v:.2e}", flush=True)
    if args.sweep and not interp:
        doc["sweep"] = sweep(args.tokens, time.monotonic() + args.sweep)
    elif not args.check_only and not interp:
        doc["timing"] = timing(args.tokens)
    doc["failed"] = failed
    Path(args.out).write_text(json.dumps(doc, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
