"""The router's fp32 logits from bf16 GEMMs (``compiler.ops.router.router_logits``): check, then time.

    PYTHONPATH=. python3 bench/router_logits.py OUT.json [--tokens 16384]

1. Correctness at baseline.yaml's router (d 1024, 64 experts; x bf16, W_r fp32 of std 0.02): the
   logits, dx and dW_r of the three-way split against fp64, beside the fp32 GEMMs' own errors and a
   bf16 GEMM's; the same through ``torch.compile`` against eager.
2. Timing (median of Triton's timer): forward and backward of sigmoid(x W_r^T) compiled, the fp32
   GEMMs of the bf16 tokens (as before) against the split; and the split's weight-gradient GEMM
   alone, one (3E, N) x (N, C) GEMM against S-way split-K batches summed after.

Writes one JSON document; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compiler.ops.router import _split_bf16, _SplitLogits, router_logits  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(N: int, C: int, E: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, C, device="cuda", generator=g).bfloat16()
    w = torch.randn(E, C, device="cuda", generator=g) * 0.02
    grad = torch.randn(N, E, device="cuda", generator=g) * 1e-3
    return x, w, grad


def _fwd_bwd(fn, x, w, grad):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(x, w)
    out.backward(grad)
    return out.detach(), x.grad, w.grad


def _old(x, w):
    return torch.sigmoid(F.linear(x.float(), w))


def _new(x, w):
    return torch.sigmoid(router_logits(x, w))


def check(N: int, C: int, E: int) -> dict:
    x, w, grad = _inputs(N, C, E)
    x64, w64, g64 = x.double(), w.double(), grad.double()
    logits64, dx64, dw64 = x64 @ w64.t(), g64 @ w64, g64.t() @ x64
    rows = {}
    for name, fn in (("fp32 GEMMs", lambda a, b: F.linear(a.float(), b)), ("split", _SplitLogits.apply),
                     ("one bf16 GEMM (for scale)", lambda a, b: F.linear(a, b.bfloat16()).float())):
        out, dx, dw = _fwd_bwd(fn, x, w, grad)
        rows[name] = {"logits": _rel(out, logits64), "dx": _rel(dx, dx64), "dw": _rel(dw, dw64)}
    eager = _fwd_bwd(_new, x, w, grad)
    compiled = _fwd_bwd(torch.compile(_new, fullgraph=True), x, w, grad)
    rows["compiled vs eager"] = {k: _rel(a, b) for k, a, b in zip(("scores", "dx", "dw"), compiled, eager)}
    # fp32-level for the logits and dW_r (a bf16 weight gives ~2e-3), bf16-level for dx; compiled as eager
    split, comp = rows["split"], rows["compiled vs eager"]
    ok = (split["logits"] < 1e-5 and split["dw"] < 1e-5 and split["dx"] < 4e-3
          and comp["scores"] < 1e-5 and comp["dw"] < 1e-5 and comp["dx"] < 4e-3
          and router_logits(x, w).dtype == torch.float32)
    return {"ok": ok, "errors": rows}


def timing(N: int, C: int, E: int) -> dict:
    from triton.testing import do_bench

    def ms(fn, grads=None):
        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median"))

    x, w, grad = _inputs(N, C, E)
    out = {}
    for name, fn in (("fp32 GEMMs", _old), ("split", _new)):
        f = torch.compile(fn, fullgraph=True)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out[name] = {"forward_ms": ms(lambda f=f: f(x, w)),
                     "forward_backward_ms": ms(lambda f=f, xr=xr, wr=wr: f(xr, wr).backward(grad), [xr, wr])}
    gs = torch.cat(_split_bf16(grad), 1)                                 # (N, 3E)
    dw = {"fp32 GEMM": ms(lambda: grad.t() @ x.float()),
          "one GEMM": ms(lambda: torch.mm(gs.t(), x, out_dtype=torch.float32).view(3, E, C).sum(0))}
    for S in (4, 8, 16):
        a, b = gs.view(S, N // S, 3 * E).transpose(1, 2), x.view(S, N // S, C)
        dw[f"split-K {S}"] = ms(lambda a=a, b=b, S=S: torch.bmm(a, b, out_dtype=torch.float32).view(S * 3, E, C).sum(0))
    out["weight gradient alone"] = dw
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    doc["check"] = check(args.tokens, 1024, 64)
    print(json.dumps(doc["check"], indent=1), flush=True)
    doc["timing"] = timing(args.tokens, 1024, 64)
    print(json.dumps(doc["timing"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0 if doc["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
