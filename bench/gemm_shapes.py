"""Time the matmuls of one layer of a spec alone, at its micro-batch, on one GPU.

    python3 bench/gemm_shapes.py OUT.json [--spec examples/baseline.yaml] [--tokens N]

Every matmul a layer's forward and backward runs, shaped as the spec has them (default baseline.yaml:
d 1024, 16 query and 4 KV heads of 64 on the local layers, 64 experts of 256, top-6, one shared expert
of 256, the router over 64 experts; tokens = micro_batch x seq_len), timed alone (median of Triton's
timer), with its TFLOP/s and the bf16 peak measured in the same process the way ``grapefx bench``
measures it. Variants that compute the same products differently sit beside the ones the compiled
layer runs now:

    dense  q | k | v as three GEMMs against one over the concatenated weights, forward, input
           gradient (one GEMM against three summed after) and weight gradient; the shared experts'
           gate | up likewise (GQA local layers only; other mechanisms skip these rows)
    router the logits of the bf16 tokens: three fp32 GEMMs of an fp32 copy (N = E) against the bf16
           GEMMs over the three-way split of W_r that ``compiler.ops.router.router_logits`` runs
           (N = 3E with an fp32 result; dX with K = 3E; dW with M = 3E); TFLOP/s count 2 N C E
    experts the seven grouped GEMMs of the routed experts (rows spread evenly over the experts:
           tokens * K / E each), and the weight gradient of W_gate | W_up as two GEMMs of N = F
           against one of N = 2F

Needs CUDA and ``torch._grouped_mm``; writes one JSON document (the shapes under ``shapes``).
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

from compiler.ops.router import _split_bf16  # noqa: E402
from runtime.bench.ways import matmul_peak  # noqa: E402
from spec import load_spec  # noqa: E402


def layer_shapes(spec_path: str, tokens: int | None) -> dict[str, int]:
    """N (tokens), C, the local layers' Hq, Hkv, D (gqa: 1 for GQA), and E, K, F, Fs (the shared experts'
    hidden width) of the spec."""
    spec = load_spec(spec_path)
    if spec.moe is None:
        raise SystemExit(f"gemm_shapes: {spec_path} has no MoE (moe: null); this script times a MoE layer")
    a, m = spec.attention.local, spec.moe
    return dict(N=tokens or spec.train.micro_batch * spec.data.seq_len, C=spec.model.d_model, Hq=a.heads,
                Hkv=a.kv_heads, D=a.head_dim, gqa=int(a.mechanism == "gqa"), E=m.experts, K=m.top_k,
                F=m.expert_hidden, Fs=m.shared_experts * m.expert_hidden)


def _time(fn) -> float:
    """ms per call: median of Triton's timer, as ``bench/attention.py`` times its kernels."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _dense(record, x: torch.Tensor, Hq: int, Hkv: int, D: int, F: int) -> None:
    """The local layers' q | k | v and the shared experts' gate | up: one GEMM or several (module docstring)."""
    N, C = x.shape
    dev, bf = x.device, x.dtype
    outs = {"q": Hq * D, "k": Hkv * D, "v": Hkv * D}
    ws = {n: torch.randn(o, C, device=dev, dtype=bf) * 0.02 for n, o in outs.items()}
    gs = {n: torch.randn(N, o, device=dev, dtype=bf) for n, o in outs.items()}
    w_qkv = torch.cat(list(ws.values()))
    g_qkv = torch.cat(list(gs.values()), 1)
    fl = 2 * N * C * sum(outs.values())
    record("dense qkv fwd: 3 GEMMs", _time(lambda: [x @ w.t() for w in ws.values()]), fl)
    record(f"dense qkv fwd: 1 GEMM (N {w_qkv.shape[0]})", _time(lambda: x @ w_qkv.t()), fl)
    record("dense qkv dX: 3 GEMMs + sum", _time(lambda: sum(gs[n] @ ws[n] for n in outs)), fl)
    record(f"dense qkv dX: 1 GEMM (K {w_qkv.shape[0]})", _time(lambda: g_qkv @ w_qkv), fl)
    record("dense qkv dX: cat + 1 GEMM", _time(lambda: torch.cat(list(gs.values()), 1) @ w_qkv), fl)
    record("dense qkv dW: 3 GEMMs", _time(lambda: [gs[n].t() @ x for n in outs]), fl)
    record(f"dense qkv dW: 1 GEMM (M {w_qkv.shape[0]})", _time(lambda: g_qkv.t() @ x), fl)
    record("dense o fwd", _time(lambda: g_qkv[:, :Hq * D] @ ws["q"]), 2 * N * C * Hq * D)
    if not F:
        return

    sw = [torch.randn(F, C, device=dev, dtype=bf) * 0.02 for _ in range(2)]
    sg = [torch.randn(N, F, device=dev, dtype=bf) for _ in range(2)]
    sw2, sg2 = torch.cat(sw), torch.cat(sg, 1)
    fl = 2 * N * C * 2 * F
    record("shared gate|up fwd: 2 GEMMs", _time(lambda: [x @ w.t() for w in sw]), fl)
    record(f"shared gate|up fwd: 1 GEMM (N {2 * F})", _time(lambda: x @ sw2.t()), fl)
    record("shared gate|up dX: 2 GEMMs + sum", _time(lambda: sg[0] @ sw[0] + sg[1] @ sw[1]), fl)
    record(f"shared gate|up dX: 1 GEMM (K {2 * F})", _time(lambda: sg2 @ sw2), fl)
    record("shared gate|up dW: 2 GEMMs", _time(lambda: [g.t() @ x for g in sg]), fl)
    record(f"shared gate|up dW: 1 GEMM (M {2 * F})", _time(lambda: sg2.t() @ x), fl)
    record(f"shared down fwd (K {F})", _time(lambda: sg[0] @ sw[0]), 2 * N * C * F)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--spec", default="examples/baseline.yaml")
    ap.add_argument("--tokens", type=int, default=None, help="rows of the layer's input (default micro_batch x seq_len)")
    args = ap.parse_args()
    shape = layer_shapes(args.spec, args.tokens)
    print(f"{args.spec}: {shape}", flush=True)
    if not torch.cuda.is_available():
        print("gemm_shapes: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    N, C, Hq, Hkv, D, E, K, F, Fs = (shape[k] for k in ("N", "C", "Hq", "Hkv", "D", "E", "K", "F", "Fs"))
    R = N * K
    rows: dict[str, dict] = {}

    def record(name: str, ms: float, flop: float) -> None:
        rows[name] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)}
        print(f"{name:48s} {ms * 1e3:8.1f} us  {flop / ms / 1e9:6.1f} TFLOP/s", flush=True)

    peak = matmul_peak(torch.device(dev))                        # the bench's own peak (8192^3 bf16)
    print(f"bf16 peak {peak:.0f} TFLOP/s")

    x = torch.randn(N, C, device=dev, dtype=bf)
    if shape["gqa"]:
        _dense(record, x, Hq, Hkv, D, Fs)

    x32, wr, gr = x.float(), torch.randn(E, C, device=dev) * 0.02, torch.randn(N, E, device=dev)
    fl = 2 * N * C * E
    record(f"router fp32 fwd (N {E})", _time(lambda: x32 @ wr.t()), fl)
    record("router fp32 dX", _time(lambda: gr @ wr), fl)
    record("router fp32 dW", _time(lambda: gr.t() @ x32), fl)
    hi, mid, lo = _split_bf16(wr)
    w3 = torch.cat([hi, mid, lo])                                 # (3E, C)
    g_hi, g_mid, g_lo = _split_bf16(gr)
    record(f"router split fwd: 1 bf16 GEMM (N {3 * E}), fp32 out",
           _time(lambda: torch.mm(x, w3.t(), out_dtype=torch.float32)), fl)
    record(f"router split dX: 1 bf16 GEMM (K {3 * E})",
           _time(lambda: torch.cat([g_hi, g_hi, g_mid], 1) @ torch.cat([hi, mid, hi])), fl)
    record(f"router split dW: 1 bf16 GEMM (M {3 * E}), fp32 out",
           _time(lambda: torch.mm(torch.cat([g_hi, g_mid, g_lo], 1).t(), x, out_dtype=torch.float32)), fl)

    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (R // E)
    xs = torch.randn(R, C, device=dev, dtype=bf)
    w_gu = torch.randn(E, C, 2 * F, device=dev, dtype=bf) * 0.02
    w_down = torch.randn(E, F, C, device=dev, dtype=bf) * 0.02
    h = torch.randn(R, F, device=dev, dtype=bf)
    dy = torch.randn(R, C, device=dev, dtype=bf)
    dgu = torch.randn(R, 2 * F, device=dev, dtype=bf)
    gmm = torch._grouped_mm
    f2 = 2 * R * C * F
    record(f"experts fwd gate|up (N {2 * F})", _time(lambda: gmm(xs, w_gu, offs=offs)), 2 * f2)
    record(f"experts fwd down (K {F})", _time(lambda: gmm(h, w_down, offs=offs)), f2)
    record(f"experts dX down (N {F})", _time(lambda: gmm(dy, w_down.transpose(1, 2), offs=offs)), f2)
    record("experts dW down", _time(lambda: gmm(h.t(), dy, offs=offs)), f2)
    record(f"experts dW gate, up: 2 GEMMs (N {F})",
           _time(lambda: [gmm(xs.t(), dgu[:, :F], offs=offs), gmm(xs.t(), dgu[:, F:], offs=offs)]), 2 * f2)
    record(f"experts dW gate|up: 1 GEMM (N {2 * F})", _time(lambda: gmm(xs.t(), dgu, offs=offs)), 2 * f2)
    try:
        record("experts dW gate|up: 1 GEMM, fp32 out",
               _time(lambda: gmm(xs.t(), dgu, offs=offs, out_dtype=torch.float32)), 2 * f2)
    except (RuntimeError, TypeError) as e:
        rows["experts dW gate|up: 1 GEMM, fp32 out"] = {"error": str(e).splitlines()[0]}
        print("fp32 out:", str(e).splitlines()[0])
    record(f"experts dX gate|up (K {2 * F})", _time(lambda: gmm(dgu, w_gu.transpose(1, 2), offs=offs)), 2 * f2)

    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "spec": args.spec, "shapes": shape,
           "peak_tflops": round(peak, 1), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
