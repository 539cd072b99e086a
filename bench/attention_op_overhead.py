"""Where the fused attention op spends time beyond its kernels (local layer, B8 T4096 Hq12/Hkv4 D64 W128).

The microbenchmark measured the Triton kernels called directly at 0.74 ms fwd+bwd and the same
kernels through ``torch.ops.grapefx.attention`` with autograd at 1.52 ms. This profiles both
and prints the GPU kernels of each path with their time per call, plus the wall time, so the
difference can be attributed (extra kernels vs host overhead). ``compiled_op``: the op inside
torch.compile, where Inductor launches the kernels (the traced ``triton_op`` path the model runs). Run on a GPU:
``python3 bench/attention_op_overhead.py [OUT.json]``.
"""

import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, ".")
import compiler.kernels  # noqa: E402,F401  (registers the CUDA implementation)
from compiler.kernels.attention import attention_bwd, attention_fwd  # noqa: E402

B, Hq, Hkv, T, D, W = 8, 12, 4, 4096, 64, 128
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(B, h, T, D, device=dev, generator=g).bfloat16() for h in (Hq, Hkv, Hkv))
theta = (10000.0 ** (-torch.arange(D // 2, device=dev, dtype=torch.float32) * 2 / D))
go = torch.randn(B, Hq, T, D, device=dev, generator=g).bfloat16()
scale = D ** -0.5


def raw():
    o, lse = attention_fwd(q, k, v, theta, None, W, scale)
    return attention_bwd(go, q, k, v, o, lse, theta, None, W, scale)


leaves = [x.detach().requires_grad_() for x in (q, k, v)]
th = theta.detach().requires_grad_()


def op():
    out = torch.ops.grapefx.attention(*leaves, th, None, W, scale)
    return torch.autograd.grad(out, [*leaves, th], go)


def op_no_theta_grad():
    out = torch.ops.grapefx.attention(*leaves, theta, None, W, scale)
    return torch.autograd.grad(out, leaves, go)


compiled_op = torch.compile(lambda *a: torch.ops.grapefx.attention(*a, None, W, scale), fullgraph=True, dynamic=False)


def compiled():
    out = compiled_op(*leaves, th)
    return torch.autograd.grad(out, [*leaves, th], go)


result = {}
for name, fn in [("raw", raw), ("op", op), ("op_theta_fixed", op_no_theta_grad), ("compiled_op", compiled)]:
    ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        if e.device_time_total > 0 and e.cpu_time_total == 0 or "kernel" in e.key.lower() or e.key.startswith("_"):
            if e.device_time_total > 0:
                kernels[e.key[:70]] = (round(e.device_time_total / 5 / 1e3, 4), e.count // 5)
    result[name] = {"ms": ms, "kernels_ms_per_call": kernels}
    print(f"{name}: {ms:.3f} ms")
    for kname, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"   {t:8.4f} ms  x{n}  {kname}")
if len(sys.argv) > 1:
    json.dump(result, open(sys.argv[1], "w"), indent=1)
