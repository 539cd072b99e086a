"""GPU check of the lean step's CUDA paths against fp32 references (issue 7), before any timing.

    python3 bench/experts_loss_check.py [--out FILE.json] [--only TEXT]

1. Versions: python, torch (>= 2.11 required: exit 3 otherwise), triton, CUDA, the GPU.
2. ``grapefx::expert_ffn`` lean path (bf16, ``torch._grouped_mm``, Triton SwiGLU / combine) against
   the op's fp32 reference path on the same (bf16-rounded) inputs: output and the five gradients,
   ||a - b|| / ||b|| < 2e-2 (MATH.md §6, bf16), at shapes with an expert that gets no token and
   with a token count that is no multiple of anything; fresh random inputs each; NaN never passes.
   Also: the lean forward + backward run with ``torch.cuda.set_sync_debug_mode("error")``
   (any host synchronisation raises). One case runs the op under torch.compile and reports whether
   Inductor's generated code launches the lean kernels itself (the traced ``triton_op`` path).
3. ``grapefx::linear_cross_entropy`` (bf16, Triton rows kernel, several chunks) against
   ``F.cross_entropy(F.linear(x, W).float())`` in fp32 on the same inputs, with ignored targets:
   loss, dx, dW.

4. ``grapefx::router_topk`` (the Triton selection kernel on CUDA) against the op's torch version on
   the CPU over the same scores, baseline.yaml's shape (16,384 x 64, top-6) with ties, -0 / +0 and
   masked experts: indices and counts equal, and no host synchronisation.

Prints one line per check and a summary last; exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BF16_TOL = 2e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def versions() -> dict:
    from runtime.bench import environment
    return environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def check_experts(N: int, C: int, F_: int, E: int, K: int, idle: int | None, seed: int,
                  compiled: bool = False, masters: bool = False) -> dict:
    """``compiled``: run the op under torch.compile and also report whether Inductor's code launches
    the lean kernels itself (the traced ``triton_op`` path) or calls an opaque op. ``masters``: fp32
    weights (not bf16 values), as the model passes them; the eager op's output and every gradient must
    then equal, bit for bit, those of the eager op given the weights cast to bf16 (the gradients cast back)."""
    experts = importlib.import_module("compiler.ops.experts")
    from compiler.ops import expert_ffn as op

    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16
    t = lambda *s, scale=1.0: (torch.randn(*s, device=dev, generator=g) * scale).to(bf)
    x, gates = t(N, C), torch.rand(N, K, device=dev, generator=g).to(bf)
    wg, wu, wd = t(E, C, F_, scale=C ** -0.5), t(E, C, F_, scale=C ** -0.5), t(E, F_, C, scale=F_ ** -0.5)
    if masters:                                                   # fp32 values between the bf16 ones
        wg, wu, wd = (w.float() * (1 + 1e-3 * torch.rand(w.shape, device=dev, generator=g)) for w in (wg, wu, wd))
    scores = torch.rand(N, E, device=dev, generator=g)
    if idle is not None:
        scores[:, idle] = -1.0                                     # no token routes to this expert
    idx = torch.topk(scores, K).indices
    grad = t(N, C)
    assert experts._lean_applies(x, wg, wu, wd), "the lean path does not apply to bf16 CUDA inputs"
    leaves = [a.clone().requires_grad_(True) for a in (x, gates, wg, wu, wd)]
    expert_ffn, inductor_code = op, []
    if compiled:                                                  # compile fwd + bwd, keep Inductor's code
        from torch._inductor.utils import run_and_get_code
        expert_ffn = torch.compile(op, fullgraph=True, dynamic=False)
        _, inductor_code = run_and_get_code(
            lambda: torch.autograd.grad(expert_ffn(leaves[0], idx, *leaves[1:]), leaves, grad))
    out = expert_ffn(leaves[0], idx, *leaves[1:])
    grads = torch.autograd.grad(out, leaves, grad)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")                        # a second run: any host sync raises
    try:
        torch.autograd.grad(expert_ffn(leaves[0], idx, *leaves[1:]), leaves, grad)
        no_sync = True
    except RuntimeError as e:
        no_sync = f"host sync: {str(e).splitlines()[0][:200]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref_in = [a.float() for a in (x, gates, wg, wu, wd)]
    ref = experts._reference_forward(ref_in[0], idx, *ref_in[1:])
    ref_grads = experts._reference_backward(grad.float(), ref_in[0], idx, *ref_in[1:])
    errs = {"out": rel(out, ref)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(("x", "gates", "w_gate", "w_up", "w_down"), grads, ref_grads)})
    if idle is not None:
        errs["idle_expert_grad_max"] = float(max(grads[k][idle].abs().max() for k in (2, 3, 4)))
    ok = all(e < BF16_TOL for k, e in errs.items() if k != "idle_expert_grad_max") and \
        errs.get("idle_expert_grad_max", 0.0) == 0.0
    res = {"shape": dict(N=N, C=C, F=F_, E=E, K=K, idle=idle), "errors": errs, "no_host_sync": no_sync, "ok": ok}
    if masters:
        cast = [a.detach().clone().requires_grad_(True) for a in (x, gates)] + \
               [w.bfloat16().requires_grad_(True) for w in (wg, wu, wd)]
        out_m, out_c = op(leaves[0], idx, *leaves[1:]), op(cast[0], idx, *cast[1:])     # both eager
        grads_m, grads_c = torch.autograd.grad(out_m, leaves, grad), torch.autograd.grad(out_c, cast, grad)
        res["bitwise_as_cast_outside"] = bool(torch.equal(out_m, out_c) and all(
            a.dtype == w.dtype and torch.equal(a, b.to(a.dtype)) for a, b, w in zip(grads_m, grads_c, leaves)))
        res["ok"] = ok and res["bitwise_as_cast_outside"]
    if compiled:
        code = "\n".join(inductor_code)
        res["inductor_launches_lean_kernels"] = all(k in code for k in ("_rows_kernel", "_weight_kernel",
                                                                        "_swiglu_bwd_kernel", "_gather_sum_kernel"))
        res["inductor_calls_opaque_op"] = "expert_ffn_fwd" in code or "expert_ffn_lean" in code
    return res


def check_lce(N: int, C: int, V: int, chunk_rows: int, seed: int) -> dict:
    lce = importlib.import_module("compiler.ops.linear_cross_entropy")
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, C, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(V, C, device="cuda", generator=g) * C ** -0.5).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    targets[:: 7] = -100
    saved = lce.CHUNK_BYTES
    lce.CHUNK_BYTES = chunk_rows * V * 2
    try:
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = lce.linear_cross_entropy(xl, wl, targets)
        dx, dw = torch.autograd.grad(loss * 2.0, (xl, wl))
        with torch.no_grad():
            loss_nograd = lce.linear_cross_entropy(x, w, targets)
    finally:
        lce.CHUNK_BYTES = saved
    xr, wr = x.float().requires_grad_(True), w.float().requires_grad_(True)
    ref = F.cross_entropy(F.linear(xr, wr), targets, ignore_index=-100)
    rdx, rdw = torch.autograd.grad(ref * 2.0, (xr, wr))
    errs = {"loss": abs(float(loss) - float(ref)) / abs(float(ref)),
            "loss_no_grad_path": abs(float(loss_nograd) - float(ref)) / abs(float(ref)),
            "dx": rel(dx, rdx), "dW": rel(dw, rdw)}
    ok = errs["loss"] < 2e-3 and errs["loss_no_grad_path"] < 2e-3 and errs["dx"] < BF16_TOL and errs["dW"] < BF16_TOL
    return {"shape": dict(N=N, C=C, V=V, chunk_rows=chunk_rows), "errors": errs, "ok": ok}


def check_router(N: int, E: int, K: int, seed: int) -> dict:
    from compiler.ops import router_topk
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(N, E, generator=g)
    s[::5] = torch.randint(0, 4, (len(s[::5]), E), generator=g).float() / 4       # many ties
    s[1::5, ::2] = -0.0                                                            # -0 ties +0
    s[2::5, : E // 2] = float("-inf")                                              # masked experts
    want_idx, want_counts = router_topk(s, K, 1, 1)                                # the torch version (CPU)
    s = s.cuda()                                                                   # (the copy itself syncs)
    router_topk(s, K, 1, 1)                                                        # compiles the kernel
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx, counts = router_topk(s, K, 1, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    errs = {"indices_differing": float((idx.cpu() != want_idx).sum()),
            "counts_differing": float((counts.cpu() != want_counts).sum())}
    return {"shape": dict(N=N, E=E, K=K), "errors": errs, "no_host_sync": True,
            "ok": errs["indices_differing"] == 0 and errs["counts_differing"] == 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results here as JSON")
    ap.add_argument("--only", default="", metavar="TEXT", help="run only the checks whose name contains TEXT")
    args = ap.parse_args()
    doc = {"versions": versions(), "checks": []}
    v = doc["versions"]
    print("versions: " + ", ".join(f"{k} {v[k]}" for k in v))
    major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if major_minor < (2, 11):
        print(f"torch {torch.__version__} is older than 2.11: stop")
        return 3
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 3
    cases = [("expert_ffn bench shape", check_experts, dict(N=4096, C=768, F_=1024, E=16, K=2, idle=None, seed=1)),
             ("expert_ffn compiled, idle expert", check_experts,
              dict(N=1003, C=256, F_=512, E=8, K=2, idle=5, seed=6, compiled=True)),
             ("expert_ffn idle expert, odd N", check_experts, dict(N=1003, C=256, F_=512, E=8, K=2, idle=5, seed=2)),
             ("expert_ffn top-1", check_experts, dict(N=777, C=128, F_=256, E=4, K=1, idle=0, seed=3)),
             ("expert_ffn fp32 masters, compiled", check_experts,
              dict(N=1003, C=256, F_=512, E=8, K=2, idle=5, seed=9, compiled=True, masters=True)),
             ("linear_cross_entropy 3 chunks", check_lce, dict(N=5000, C=768, V=32768, chunk_rows=2048, seed=4)),
             ("linear_cross_entropy 1 chunk", check_lce, dict(N=300, C=256, V=1000, chunk_rows=4096, seed=5)),
             ("router_topk baseline shape", check_router, dict(N=16384, E=64, K=6, seed=7)),
             ("router_topk 48 experts, odd N", check_router, dict(N=1001, E=48, K=8, seed=8))]
    cases = [c for c in cases if args.only in c[0]]
    if not cases:
        print(f"--only {args.only!r}: no check's name contains it")
        return 2
    for name, fn, kw in cases:
        t0 = time.perf_counter()
        try:
            res = fn(**kw)
        except Exception as e:  # noqa: BLE001 -- report every check
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        res["name"], res["seconds"] = name, time.perf_counter() - t0
        doc["checks"].append(res)
        errs = ", ".join(f"{k} {e:.2e}" for k, e in res.get("errors", {}).items())
        sync = "" if "no_host_sync" not in res else f"; no host sync: {res['no_host_sync']}"
        if "bitwise_as_cast_outside" in res:
            sync += f"; bitwise as cast outside the op: {res['bitwise_as_cast_outside']}"
        if "inductor_launches_lean_kernels" in res:
            sync += (f"; Inductor launches the lean kernels: {res['inductor_launches_lean_kernels']}, "
                     f"calls an opaque expert op: {res['inductor_calls_opaque_op']}")
        print(f"{'PASS' if res['ok'] else 'FAIL'}  {name}: {errs or res.get('error')}{sync}", flush=True)
    passed = sum(c["ok"] for c in doc["checks"])
    print(f"experts_loss_check: {passed} passed, {len(doc['checks']) - passed} failed")
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if passed == len(doc["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
