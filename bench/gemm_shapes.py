"""Time the matmuls of one baseline.yaml layer alone, at the bench's micro-batch, on one GPU.

    python3 bench/gemm_shapes.py OUT.json [--tokens 16384]

Every matmul a layer's forward and backward runs, shaped as baseline.yaml has them (d 1024, 16 query
and 4 KV heads of 64, 64 experts of 256, top-6, one shared expert of 256, a fp32 router over 64
experts), timed alone (median of Triton's timer), with its TFLOP/s and the bf16 peak measured in the
same process the way ``grapefx bench`` measures it. Variants that compute the same products differently
sit beside the ones the compiled layer runs now:

    dense  q | k | v as three GEMMs against one over the concatenated weights (N = 1536), forward,
           input gradient (K = 1536 summed in one GEMM against three summed after) and weight gradient;
           the shared expert's gate | up likewise (N = 512)
    router the fp32 logits (N = 64) forward, input and weight gradient
    experts the seven grouped GEMMs of the routed experts (rows spread evenly over the experts:
           tokens * 6 / 64 each), and the weight gradient of W_gate | W_up as two GEMMs of N = 256
           against one of N = 512

Needs CUDA and ``torch._grouped_mm``; writes one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.bench.ways import matmul_peak  # noqa: E402


def _time(fn) -> float:
    """ms per call: median of Triton's timer, as ``bench/attention.py`` times its kernels."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gemm_shapes: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    N, C, Hq, Hkv, D, E, K, F = args.tokens, 1024, 16, 4, 64, 64, 6, 256
    R = N * K
    rows: dict[str, dict] = {}

    def record(name: str, ms: float, flop: float) -> None:
        rows[name] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)}
        print(f"{name:48s} {ms * 1e3:8.1f} us  {flop / ms / 1e9:6.1f} TFLOP/s", flush=True)

    peak = matmul_peak(torch.device(dev))                        # the bench's own peak (8192^3 bf16)
    print(f"bf16 peak {peak:.0f} TFLOP/s")

    x = torch.randn(N, C, device=dev, dtype=bf)
    outs = {"q": Hq * D, "k": Hkv * D, "v": Hkv * D}
    ws = {n: torch.randn(o, C, device=dev, dtype=bf) * 0.02 for n, o in outs.items()}
    gs = {n: torch.randn(N, o, device=dev, dtype=bf) for n, o in outs.items()}
    w_qkv = torch.cat(list(ws.values()))
    g_qkv = torch.cat(list(gs.values()), 1)
    fl = 2 * N * C * sum(outs.values())
    record("dense qkv fwd: 3 GEMMs", _time(lambda: [x @ w.t() for w in ws.values()]), fl)
    record("dense qkv fwd: 1 GEMM (N 1536)", _time(lambda: x @ w_qkv.t()), fl)
    record("dense qkv dX: 3 GEMMs + sum", _time(lambda: sum(gs[n] @ ws[n] for n in outs)), fl)
    record("dense qkv dX: 1 GEMM (K 1536)", _time(lambda: g_qkv @ w_qkv), fl)
    record("dense qkv dX: cat + 1 GEMM", _time(lambda: torch.cat(list(gs.values()), 1) @ w_qkv), fl)
    record("dense qkv dW: 3 GEMMs", _time(lambda: [gs[n].t() @ x for n in outs]), fl)
    record("dense qkv dW: 1 GEMM (M 1536)", _time(lambda: g_qkv.t() @ x), fl)
    record("dense o fwd", _time(lambda: g_qkv[:, :C] @ ws["q"]), 2 * N * C * C)

    sw = [torch.randn(F, C, device=dev, dtype=bf) * 0.02 for _ in range(2)]
    sg = [torch.randn(N, F, device=dev, dtype=bf) for _ in range(2)]
    sw2, sg2 = torch.cat(sw), torch.cat(sg, 1)
    fl = 2 * N * C * 2 * F
    record("shared gate|up fwd: 2 GEMMs", _time(lambda: [x @ w.t() for w in sw]), fl)
    record("shared gate|up fwd: 1 GEMM (N 512)", _time(lambda: x @ sw2.t()), fl)
    record("shared gate|up dX: 2 GEMMs + sum", _time(lambda: sg[0] @ sw[0] + sg[1] @ sw[1]), fl)
    record("shared gate|up dX: 1 GEMM (K 512)", _time(lambda: sg2 @ sw2), fl)
    record("shared gate|up dW: 2 GEMMs", _time(lambda: [g.t() @ x for g in sg]), fl)
    record("shared gate|up dW: 1 GEMM (M 512)", _time(lambda: sg2.t() @ x), fl)
    record("shared down fwd (K 256)", _time(lambda: sg[0] @ sw[0]), 2 * N * C * F)

    x32, wr, gr = x.float(), torch.randn(E, C, device=dev) * 0.02, torch.randn(N, E, device=dev)
    fl = 2 * N * C * E
    record("router fp32 fwd (N 64)", _time(lambda: x32 @ wr.t()), fl)
    record("router fp32 dX", _time(lambda: gr @ wr), fl)
    record("router fp32 dW", _time(lambda: gr.t() @ x32), fl)

    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (R // E)
    xs = torch.randn(R, C, device=dev, dtype=bf)
    w_gu = torch.randn(E, C, 2 * F, device=dev, dtype=bf) * 0.02
    w_down = torch.randn(E, F, C, device=dev, dtype=bf) * 0.02
    h = torch.randn(R, F, device=dev, dtype=bf)
    dy = torch.randn(R, C, device=dev, dtype=bf)
    dgu = torch.randn(R, 2 * F, device=dev, dtype=bf)
    gmm = torch._grouped_mm
    f2 = 2 * R * C * F
    record("experts fwd gate|up (N 512)", _time(lambda: gmm(xs, w_gu, offs=offs)), 2 * f2)
    record("experts fwd down (K 256)", _time(lambda: gmm(h, w_down, offs=offs)), f2)
    record("experts dX down (N 256)", _time(lambda: gmm(dy, w_down.transpose(1, 2), offs=offs)), f2)
    record("experts dW down", _time(lambda: gmm(h.t(), dy, offs=offs)), f2)
    record("experts dW gate, up: 2 GEMMs (N 256)",
           _time(lambda: [gmm(xs.t(), dgu[:, :F], offs=offs), gmm(xs.t(), dgu[:, F:], offs=offs)]), 2 * f2)
    record("experts dW gate|up: 1 GEMM (N 512)", _time(lambda: gmm(xs.t(), dgu, offs=offs)), 2 * f2)
    try:
        record("experts dW gate|up: 1 GEMM, fp32 out",
               _time(lambda: gmm(xs.t(), dgu, offs=offs, out_dtype=torch.float32)), 2 * f2)
    except (RuntimeError, TypeError) as e:
        rows["experts dW gate|up: 1 GEMM, fp32 out"] = {"error": str(e).splitlines()[0]}
        print("fp32 out:", str(e).splitlines()[0])
    record("experts dX gate|up (K 512)", _time(lambda: gmm(dgu, w_gu.transpose(1, 2), offs=offs)), 2 * f2)

    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": N,
           "peak_tflops": round(peak, 1), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
