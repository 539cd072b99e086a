"""Fused attention kernels on one GPU: correctness, then the issue-7 microbenchmark. One command:

    python3 bench/attention_check_and_bench.py $OUT/attention.json

1. Version check: torch >= 2.11, triton, a CUDA GPU (exit 2 otherwise). Prints torch, triton, GPU.
2. Compile ahead: worker processes run every planned kernel configuration and FlexAttention graph
   once, so the Triton / Inductor caches are warm when timing starts (skippable: --no-prewarm).
3. Card ceilings measured here: a bf16 8192^3 matmul (FLOP/s) and a device-to-device copy (B/s).
4. Correctness of the default configurations against a dense fp32 reference (autograd through
   rotation, mask, bias and softmax) on bf16 and fp32 inputs: out and every gradient (dq, dk, dv,
   dtheta, dslopes) by ||got - ref|| / ||ref||; T not a multiple of any tile, W >= T, Hq/Hkv in
   {12/4, 16/4, 8/1}, D 64 and 128; through the kernels' wrappers and through
   torch.ops.grapefx.attention (the op must reach the kernels: same numbers), and on two cases the
   op under torch.compile (same numbers, and Inductor's code launches the kernels). Outputs are
   allocated over NaN-poisoned memory so an unwritten element fails the check.
5. Microbenchmark, W = 128, bf16: (B=8, T=4096, Hq=12, Hkv=4, D=64) and (B=8, T=2048, Hq=16,
   Hkv=4, D=128); local = sliding window + GRAPE-M rotation in-kernel (theta learnable: dtheta
   computed), global = causal + ALiBi (fixed slopes). Forward and forward+backward medians
   (triton.testing.do_bench) of: ours with the default configuration (kernel wrappers, the op
   with autograd, and the op inside torch.compile as the model runs it), ours with the best of a few alternative configurations (each checked against
   the default's outputs), FlexAttention compiled (block mask `q - k < W` with causal; ALiBi as
   score_mod; local adds a separately compiled rotation of q and k), SDPA causal (flash with GQA,
   and cuDNN with K/V repeated) as the no-bias ceiling. FLOP and byte floors beside them.
A failing case is recorded (with its traceback) and the run goes on. JSON is rewritten after every
step; the short table is printed last. Budget: config sweeps stop at --deadline seconds (default
400) so the whole run stays under 8 minutes on an H100.
"""

import argparse
import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEVICE = "cuda"
DTYPE = torch.bfloat16           # the benchmark's (and most checks') input dtype

T_START = time.time()
WINDOW = 128
SHAPES = [dict(B=8, T=4096, Hq=12, Hkv=4, D=64), dict(B=8, T=2048, Hq=16, Hkv=4, D=128)]
KINDS = ("local", "global")
TARGETS = {("local", 64): 2.5, ("local", 128): 2.5, ("global", 64): 1.25}   # flex fwd+bwd / ours fwd+bwd
BF16_TOL = {"out": 2e-2, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2, "dtheta": 5e-2, "dslopes": 5e-2}
FP32_TOL = {name: 1e-4 for name in BF16_TOL}
# dtheta and dslopes are sums over every (batch, head, position) with cancellation: a CPU emulation
# of the kernels' bf16 rounding points gave 1.1e-2 for dtheta against 3e-3 for the other gradients.

# Correctness cases: T not a multiple of any tile; mostly divisible by 16 (Triton specialises
# integer arguments on that, so these share compiled kernels with the benchmark where the flags
# match), one odd T for the other specialisation.
CHECK_CASES = [
    dict(name="local D64 12/4 T1008 W128", B=2, Hq=12, Hkv=4, T=1008, D=64, window=128, rotate=True, alibi=False,
         compiled=True),
    dict(name="local D128 16/4 T784 W128", B=2, Hq=16, Hkv=4, T=784, D=128, window=128, rotate=True, alibi=False),
    dict(name="rotate D64 8/1 T528 W>=T", B=2, Hq=8, Hkv=1, T=528, D=64, window=600, rotate=True, alibi=False),
    dict(name="global D64 12/4 T1008 alibi", B=2, Hq=12, Hkv=4, T=1008, D=64, window=0, rotate=False, alibi=True,
         compiled=True),
    dict(name="global D128 16/4 T784 alibi", B=2, Hq=16, Hkv=4, T=784, D=128, window=0, rotate=False, alibi=True),
    dict(name="global D128 8/1 T528 alibi", B=2, Hq=8, Hkv=1, T=528, D=128, window=0, rotate=False, alibi=True),
    dict(name="all flags D64 8/1 T999 W100", B=2, Hq=8, Hkv=1, T=999, D=64, window=100, rotate=True, alibi=True),
    dict(name="fp32 local D64 12/4 T1008 W128", B=1, Hq=12, Hkv=4, T=1008, D=64, window=128, rotate=True,
         alibi=False, dtype="float32"),
    dict(name="fp32 global D128 16/4 T784", B=1, Hq=16, Hkv=4, T=784, D=128, window=0, rotate=False, alibi=True,
         dtype="float32"),
]


def elapsed() -> float:
    return time.time() - T_START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# configurations tried per case (Tiles: q rows, k/v rows, warps, stages, one loop)

def sweep_configs(kind: str, D: int):
    """(fwd candidates, bwd candidates) as AttnConfig; the default comes first in each list."""
    from compiler.kernels.attention import AttnConfig, Tiles, default_config
    window, T = (WINDOW, 4096) if kind == "local" else (0, 4096)
    base = default_config(D, window, T)
    # around the defaults (the earlier runs' winners, bench/RESULTS.md): stages, tile shapes, warps
    if kind == "local":
        fwd = [Tiles(64, 64, 4, 3, True), Tiles(128, 64, 4, 3, True), Tiles(128, 32, 8, 3, True),
               Tiles(64, 32, 4, 3, True)]
        bwd = [(Tiles(32, 64, 4, 2, True), Tiles(64, 64, 4, 2, True), False),
               (Tiles(64, 64, 4, 3, True), Tiles(64, 64, 4, 3, True), False),
               (Tiles(32, 64, 4, 3, True), Tiles(64, 32, 4, 3, True), False),
               (Tiles(32, 64, 4, 3, True), Tiles(64, 64, 4, 3, True), True),
               (Tiles(32, 128, 4, 3, True), Tiles(128, 64, 8, 3, True), False)]
    else:
        fwd = [Tiles(64, 64, 4, 2), Tiles(128, 64, 8, 3), Tiles(64, 64, 4, 4), Tiles(128, 32, 4, 3)]
        bwd = [(Tiles(32, 64, 4, 2), Tiles(64, 64, 4, 2), False),
               (Tiles(32, 64, 4, 3), Tiles(64, 64, 4, 3), False),
               (Tiles(64, 64, 4, 3), Tiles(64, 64, 4, 3), False),
               (Tiles(32, 64, 4, 4), Tiles(64, 64, 4, 4), False),
               (Tiles(64, 128, 8, 3), Tiles(128, 64, 8, 3), False)]
    fwd_cfgs = [base] + [AttnConfig(fwd=t, dkdv=base.dkdv, dq=base.dq, atomic_dq=base.atomic_dq)
                         for t in fwd if t != base.fwd]
    bwd_cfgs = [base] + [AttnConfig(fwd=base.fwd, dkdv=a, dq=b, atomic_dq=c) for a, b, c in bwd
                         if (a, b, c) != (base.dkdv, base.dq, base.atomic_dq)]
    return fwd_cfgs, bwd_cfgs


def cfg_str(cfg, part: str) -> str:
    t = lambda x: f"{x.block_m}x{x.block_n}/w{x.num_warps}/s{x.num_stages}{'/1loop' if x.one_loop else ''}"
    if part == "fwd":
        return t(cfg.fwd)
    return f"dkdv {t(cfg.dkdv)} + " + ("atomic dq" if cfg.atomic_dq else f"dq {t(cfg.dq)}")


# ---------------------------------------------------------------------------------------------
# inputs and references

def make_inputs(B, Hq, Hkv, T, D, rotate, alibi, dtype, seed, grad=False, jitter=False):
    from compiler.ops.alibi import alibi_slopes
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device=DEVICE, generator=g, dtype=torch.float32).to(dtype).requires_grad_(grad)
    q, k, v = rnd(B, Hq, T, D), rnd(B, Hkv, T, D), rnd(B, Hkv, T, D)
    theta = slopes = None
    if rotate:                      # RoPE's spectrum (GRAPE-M at init); jittered like a trained one
        theta = 10000.0 ** (-torch.arange(D // 2, device=DEVICE, dtype=torch.float64) * 2 / D)
        if jitter:
            theta = theta * (1 + 0.2 * torch.rand(D // 2, device=DEVICE, generator=g, dtype=torch.float64))
        theta = theta.float().requires_grad_(grad)
    if alibi:
        slopes = torch.tensor(alibi_slopes(Hq), device=DEVICE, dtype=torch.float32)
        if jitter:
            slopes = slopes * (1 + 0.2 * torch.rand(Hq, device=DEVICE, generator=g))
    return q, k, v, theta, slopes


def dense_reference(q, k, v, theta, slopes, window, scale, rotated_dtype=None):
    """softmax(scale (R q)(R k)^T - m_h (i - j), masked) v in fp32, K/V repeated per query head; the
    angle is fp32 n * theta like the kernels'. Differentiable in every input.

    ``rotated_dtype``: round the rotated q and k to this dtype, as the op defines it (the fused op
    rounds them to the input dtype exactly like ``grape_m_rotate`` in the unfused graph), with the
    gradient of the exact rotation (straight-through). The theta gradient is a sum over every
    position and head with heavy cancellation: against a reference that skips this rounding, a bf16
    run differs by several per cent in dtheta from the rounding alone (measured on CPU with the
    interpreter in fp16 at T=999: 1.3e-2 without the rounding, 1.9e-3 with it)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    q, k, v = q.float(), k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    if theta is not None:
        ang = torch.arange(T, device=q.device, dtype=torch.float32)[:, None] * theta[None, :]    # (T, D/2)
        c, s = ang.cos(), ang.sin()

        def rot(x):
            x1, x2 = x.chunk(2, -1)
            r = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
            return r if rotated_dtype is None else r + (r.to(rotated_dtype).float() - r).detach()
        q, k = rot(q), rot(k)
    i = torch.arange(T, device=q.device)
    dist = (i[:, None] - i[None, :]).float()                                                    # i - j
    s = torch.matmul(q, k.transpose(-1, -2)) * scale                                            # (B, Hq, T, T)
    if slopes is not None:
        s = s - slopes[:, None, None] * dist
    vis = dist >= 0
    if 0 < window:
        vis = vis & (dist <= window - 1)
    return torch.matmul(torch.softmax(s.masked_fill(~vis, float("-inf")), -1), v)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else a.norm().item()


def poison(*like):
    """Fill freshly freed allocator blocks of these sizes with NaN, so outputs allocated next start as
    NaN: an element the kernels do not write shows up as a failure."""
    junk = [torch.full_like(x, float("nan")) for x in like]
    del junk


# ---------------------------------------------------------------------------------------------
# the implementations timed

def ours_fns(q, k, v, theta, slopes, window, scale, cfg, grad_out, need_dtheta=True, need_dslopes=False):
    from compiler.kernels.attention import attention_bwd, attention_fwd

    def fwd():
        return attention_fwd(q, k, v, theta, slopes, window, scale, cfg)
    saved = fwd()

    def bwd():
        return attention_bwd(grad_out, q, k, v, saved[0], saved[1], theta, slopes, window, scale, cfg,
                             need_dtheta=need_dtheta, need_dslopes=need_dslopes)

    def fwd_bwd():
        o, lse = fwd()
        return attention_bwd(grad_out, q, k, v, o, lse, theta, slopes, window, scale, cfg,
                             need_dtheta=need_dtheta, need_dslopes=need_dslopes)
    return fwd, bwd, fwd_bwd, saved


_FLEX = {}


def flex_fns(q, k, v, theta, slopes, window, scale, grad_out):
    """FlexAttention as a strong user writes it: compiled flex_attention with a block mask (window
    `q - k < W` and causal), ALiBi as score_mod, and for local layers a separately compiled GRAPE-M
    rotation of q and k. Leaves require grad; returns (fwd, fwd_bwd, leaves)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "flex" not in _FLEX:
        _FLEX["flex"] = torch.compile(flex_attention, dynamic=False)

        def rotate_qk(q, k, theta):
            T = q.shape[-2]
            ang = torch.arange(T, device=q.device, dtype=torch.float32)[:, None] * theta[None, :]
            c, s = torch.cos(ang), torch.sin(ang)

            def r(x):
                x1, x2 = x.float().chunk(2, dim=-1)
                return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)
            return r(q), r(k)
        _FLEX["rot"] = torch.compile(rotate_qk, dynamic=False)
    flex, rot = _FLEX["flex"], _FLEX["rot"]
    T = q.shape[2]
    W = window

    if W:
        def mask(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < W)
    else:
        def mask(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    block_mask = create_block_mask(mask, None, None, T, T, device=DEVICE)
    if slopes is not None:
        m = slopes

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - m[h] * (q_idx - kv_idx)
    else:
        score_mod = None
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    th = theta.detach().requires_grad_() if theta is not None else None
    if th is not None:
        leaves.append(th)

    def fwd():
        qq, kk = rot(leaves[0], leaves[1], th) if th is not None else (leaves[0], leaves[1])
        return flex(qq, kk, leaves[2], score_mod=score_mod, block_mask=block_mask, enable_gqa=True, scale=scale)

    def fwd_bwd():
        fwd().backward(grad_out)
    return fwd, fwd_bwd, leaves


def sdpa_fns(q, k, v, scale, grad_out, backend: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    G = q.shape[1] // k.shape[1]
    if backend == "flash":
        be, kk, vv, kw = SDPBackend.FLASH_ATTENTION, k, v, dict(enable_gqa=True)
    else:
        be, kk, vv, kw = SDPBackend.CUDNN_ATTENTION, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), {}
    leaves = [x.detach().requires_grad_() for x in (q, kk, vv)]

    def fwd():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale, **kw)

    def fwd_bwd():
        fwd().backward(grad_out)
    return fwd, fwd_bwd, leaves


def bench_ms(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench
    fn()
    return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))


# ---------------------------------------------------------------------------------------------
# floors

def floors(shape, kind, ceil):
    from compiler.kernels.attention import flops
    B, T, Hq, Hkv, D = shape["B"], shape["T"], shape["Hq"], shape["Hkv"], shape["D"]
    window = WINDOW if kind == "local" else 0
    f_fwd = flops(B, Hq, T, D, window)
    f_all = 3.5 * f_fwd                                    # fwd 2 matmuls + bwd 5 (dq by atomics)
    q_el, kv_el, rows = B * Hq * T * D, B * Hkv * T * D, B * Hq * T
    b_fwd = 2 * (2 * q_el + 2 * kv_el) + 4 * rows          # read q k v, write out, lse
    b_bwd = 2 * (3 * q_el + 2 * kv_el) + 4 * rows + 2 * (q_el + 2 * kv_el)   # q o dO k v lse; dq dk dv
    out = dict(fwd_flops=f_fwd, fwdbwd_flops=f_all, fwd_bytes=b_fwd, fwdbwd_bytes=b_fwd + b_bwd)
    if ceil.get("matmul_tflops") and ceil.get("copy_tbps"):
        fl, by = ceil["matmul_tflops"] * 1e12, ceil["copy_tbps"] * 1e12
        out.update(fwd_flop_floor_ms=f_fwd / fl * 1e3, fwd_byte_floor_ms=b_fwd / by * 1e3,
                   fwdbwd_flop_floor_ms=f_all / fl * 1e3, fwdbwd_byte_floor_ms=(b_fwd + b_bwd) / by * 1e3)
    return out


# ---------------------------------------------------------------------------------------------
# steps

def version_check():
    from runtime.bench import environment
    info = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print("versions:", json.dumps(info), flush=True)
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    problems = []
    if (major, minor) < (2, 11):
        problems.append(f"torch {torch.__version__} < 2.11")
    if not torch.cuda.is_available():
        problems.append("no CUDA device")
    if info["triton"] is None:
        problems.append("triton is not installed")
    if problems:
        print("cannot run: " + "; ".join(problems), flush=True)
        sys.exit(2)
    return info


def ceilings():
    a = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    mm = bench_ms(lambda: a @ b)
    src = torch.randn(2 ** 28, device=DEVICE)                    # 1 GiB fp32
    dst = torch.empty_like(src)
    cp = bench_ms(lambda: dst.copy_(src))
    return dict(matmul_tflops=2 * 8192 ** 3 / mm / 1e9, copy_tbps=2 * src.numel() * 4 / cp / 1e9,
                matmul_ms=mm, copy_ms=cp)


def check_case(case):
    import compiler.ops  # noqa: F401  (defines torch.ops.grapefx)
    from compiler.kernels.attention import attention_bwd, attention_fwd
    dtype = getattr(torch, case["dtype"]) if "dtype" in case else DTYPE
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    B, Hq, Hkv, T, D, W = case["B"], case["Hq"], case["Hkv"], case["T"], case["D"], case["window"]
    scale = D ** -0.5
    q, k, v, theta, slopes = make_inputs(B, Hq, Hkv, T, D, case["rotate"], case["alibi"], dtype, seed=T + D,
                                         jitter=True)
    go = torch.randn(B, Hq, T, D, device=DEVICE, dtype=torch.float32).to(dtype)
    # fp32 reference with autograd
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    th = theta.detach().clone().requires_grad_() if theta is not None else None
    sl = slopes.detach().clone().requires_grad_() if slopes is not None else None
    ref = dense_reference(*leaves, th, sl, W, scale, rotated_dtype=dtype)
    ref.backward(go.float())
    want = dict(out=ref.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad,
                dtheta=None if th is None else th.grad, dslopes=None if sl is None else sl.grad)
    del ref
    # the kernels, directly
    poison(q, q)
    out, lse = attention_fwd(q, k, v, theta, slopes, W, scale)
    poison(q, k, v)
    dq, dk, dv, dtheta, dslopes = attention_bwd(go, q, k, v, out, lse, theta, slopes, W, scale)
    got = dict(out=out, dq=dq, dk=dk, dv=dv, dtheta=dtheta, dslopes=dslopes)
    errs = {name: rel(got[name], want[name]) for name in want if want[name] is not None}
    # the op with autograd: must reach the same kernels
    op_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    op_th = theta.detach().clone().requires_grad_() if theta is not None else None
    op_sl = slopes.detach().clone().requires_grad_() if slopes is not None else None
    op_out = torch.ops.grapefx.attention(*op_leaves, op_th, op_sl, W, scale)
    op_out.backward(go)
    op_got = dict(out=op_out, dq=op_leaves[0].grad, dk=op_leaves[1].grad, dv=op_leaves[2].grad,
                  dtheta=None if op_th is None else op_th.grad, dslopes=None if op_sl is None else op_sl.grad)
    op_vs_kernels = max(rel(op_got[name], got[name]) for name in errs)
    passed = all(errs[n] <= tol[n] for n in errs) and op_vs_kernels <= 1e-6
    res = dict(case=case["name"], dtype=str(dtype).replace("torch.", ""), rel_err=errs,
               tolerance={n: tol[n] for n in errs}, op_vs_kernels=op_vs_kernels)
    if case.get("compiled"):     # the op under torch.compile: Inductor must launch the kernels itself
        from torch._inductor.utils import run_and_get_code
        fn = torch.compile(lambda *a: torch.ops.grapefx.attention(*a, W, scale), fullgraph=True, dynamic=False)
        c_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        c_th = theta.detach().clone().requires_grad_() if theta is not None else None
        c_sl = slopes.detach().clone().requires_grad_() if slopes is not None else None
        wrt = c_leaves + [t for t in (c_th, c_sl) if t is not None]
        (c_out, c_grads), code = run_and_get_code(lambda: (lambda o: (o, torch.autograd.grad(o, wrt, go)))(
            fn(*c_leaves, c_th, c_sl)))
        c_got = dict(out=c_out, dq=c_grads[0], dk=c_grads[1], dv=c_grads[2])
        if c_th is not None:
            c_got["dtheta"] = c_grads[3]
        if c_sl is not None:
            c_got["dslopes"] = c_grads[-1]
        code = "\n".join(code)
        res["compiled_vs_kernels_each"] = {name: rel(c_got[name], got[name]) for name in errs}
        res["compiled_vs_kernels"] = max(res["compiled_vs_kernels_each"].values())
        res["inductor_launches_kernels"] = "_bwd_dkdv" in code and "attention_fwd.default" not in code
        # the same kernels; Inductor sums the per-tile dtheta / dslopes partials in its own order (fp32)
        passed = passed and res["compiled_vs_kernels"] <= 1e-5 and res["inductor_launches_kernels"]
    res["passed"] = bool(passed)
    return res


def case_inputs(shape, kind):
    """A timed case's (window, scale, q, k, v, theta, slopes, grad_out): bf16, seed 1; local = window W
    and rotation, global = causal and ALiBi."""
    B, T, Hq, Hkv, D = shape["B"], shape["T"], shape["Hq"], shape["Hkv"], shape["D"]
    q, k, v, theta, slopes = make_inputs(B, Hq, Hkv, T, D, kind == "local", kind == "global", DTYPE, seed=1)
    go = torch.randn(B, Hq, T, D, device=DEVICE, dtype=DTYPE)
    return (WINDOW if kind == "local" else 0), D ** -0.5, q, k, v, theta, slopes, go


def bench_case(shape, kind, ceil, rec):
    """Baselines and ours with the default configuration."""
    import compiler.ops  # noqa: F401
    from compiler.kernels.attention import default_config
    window, scale, q, k, v, theta, slopes, go = case_inputs(shape, kind)
    rec["floors"] = floors(shape, kind, ceil)
    impl = rec.setdefault("impl", {})
    errors = rec.setdefault("errors", {})

    cfg = default_config(shape["D"], window, shape["T"])
    fwd, bwd, fwd_bwd, saved = ours_fns(q, k, v, theta, slopes, window, scale, cfg, go)
    impl["ours"] = dict(config=cfg_str(cfg, "fwd") + " | " + cfg_str(cfg, "bwd"), fwd_ms=bench_ms(fwd),
                        bwd_ms=bench_ms(bwd), fwdbwd_ms=bench_ms(fwd_bwd))
    log(f"  ours default: {impl['ours']}")

    try:      # the op with autograd (what the model runs), theta learnable, slopes fixed
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        th = theta.detach().requires_grad_() if theta is not None else None
        gtn = leaves + ([th] if th is not None else [])
        op_fwd = lambda: torch.ops.grapefx.attention(*leaves, th, slopes, window, scale)
        impl["ours_op"] = dict(fwd_ms=bench_ms(op_fwd),
                               fwdbwd_ms=bench_ms(lambda: op_fwd().backward(go), grad_to_none=gtn))
        log(f"  ours via op: {impl['ours_op']}")
    except Exception:
        errors["ours_op"] = traceback.format_exc()
        log("  ours via op FAILED: " + errors["ours_op"].strip().splitlines()[-1][:300])

    try:      # the same op inside torch.compile (how the model runs it): Inductor launches the kernels
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        th = theta.detach().requires_grad_() if theta is not None else None
        gtn = leaves + ([th] if th is not None else [])
        c_fwd = torch.compile(lambda *a: torch.ops.grapefx.attention(*a, th, slopes, window, scale),
                              fullgraph=True, dynamic=False)
        c_fwd(*leaves).backward(go)
        impl["ours_compiled"] = dict(fwd_ms=bench_ms(lambda: c_fwd(*leaves)),
                                     fwdbwd_ms=bench_ms(lambda: c_fwd(*leaves).backward(go), grad_to_none=gtn))
        log(f"  ours via op, compiled: {impl['ours_compiled']}")
    except Exception:
        errors["ours_compiled"] = traceback.format_exc()
        log("  ours compiled FAILED: " + errors["ours_compiled"].strip().splitlines()[-1][:300])

    try:
        t0 = time.time()
        f_fwd, f_fwd_bwd, leaves = flex_fns(q, k, v, theta, slopes, window, scale, go)
        f_fwd_bwd()
        flex_out = f_fwd().detach()
        compile_s = time.time() - t0
        impl["flex"] = dict(fwd_ms=bench_ms(f_fwd), fwdbwd_ms=bench_ms(f_fwd_bwd, grad_to_none=leaves),
                            first_call_s=compile_s, rel_diff_vs_ours=rel(flex_out, saved[0]))
        log(f"  flex{' + compiled rotation' if kind == 'local' else ' + score_mod'}: {impl['flex']}")
    except Exception:
        errors["flex"] = traceback.format_exc()
        log("  flex FAILED: " + errors["flex"].strip().splitlines()[-1][:300])

    for backend in ("flash", "cudnn"):
        try:
            s_fwd, s_fwd_bwd, leaves = sdpa_fns(q, k, v, scale, go, backend)
            impl[f"sdpa_{backend}_causal"] = dict(fwd_ms=bench_ms(s_fwd),
                                                  fwdbwd_ms=bench_ms(s_fwd_bwd, grad_to_none=leaves))
            log(f"  sdpa {backend} causal: {impl[f'sdpa_{backend}_causal']}")
        except Exception:
            errors[f"sdpa_{backend}"] = traceback.format_exc().splitlines()[-1]
            log(f"  sdpa {backend} FAILED: {errors[f'sdpa_{backend}']}")


def _row_str(row, key) -> str:
    if key in row:
        return f"{row['config']}: {row[key]:.3f} ms (diff vs default {row['diff_vs_default']:.1e})"
    if "error" in row:
        return f"{row['config']}: ERROR {row['error'].strip().splitlines()[-1][:200]}"
    return f"{row['config']}: skipped ({row.get('skipped')})"


def sweep_case(shape, kind, rec, deadline):
    """Alternative configurations; each is checked against the default's outputs."""
    import compiler.kernels.attention as ka
    window, scale, q, k, v, theta, slopes, go = case_inputs(shape, kind)
    fwd_cfgs, bwd_cfgs = sweep_configs(kind, shape["D"])
    base = fwd_cfgs[0]
    ref_fwd = ka.attention_fwd(q, k, v, theta, slopes, window, scale, base)
    ref_bwd = ka.attention_bwd(go, q, k, v, *ref_fwd, theta, slopes, window, scale, base, need_dslopes=False)
    rows = rec.setdefault("sweep", {"fwd": [], "bwd": []})
    for cfg in fwd_cfgs:
        if elapsed() > deadline:
            rows["fwd"].append(dict(config=cfg_str(cfg, "fwd"), skipped="deadline"))
            continue
        try:
            fwd, _, _, saved = ours_fns(q, k, v, theta, slopes, window, scale, cfg, go)
            diff = rel(saved[0], ref_fwd[0])
            rows["fwd"].append(dict(config=cfg_str(cfg, "fwd"), fwd_ms=bench_ms(fwd), diff_vs_default=diff,
                                    ok=diff < 1e-2, cfg=cfg))
        except Exception:
            rows["fwd"].append(dict(config=cfg_str(cfg, "fwd"), error=traceback.format_exc()))
        log(f"  fwd {_row_str(rows['fwd'][-1], 'fwd_ms')}")
    for cfg in bwd_cfgs:
        if elapsed() > deadline:
            rows["bwd"].append(dict(config=cfg_str(cfg, "bwd"), skipped="deadline"))
            continue
        try:
            _, bwd, _, _ = ours_fns(q, k, v, theta, slopes, window, scale, cfg, go)
            got = bwd()
            diff = max(rel(a, b) for a, b in zip(got, ref_bwd) if b is not None)
            rows["bwd"].append(dict(config=cfg_str(cfg, "bwd"), bwd_ms=bench_ms(bwd), diff_vs_default=diff,
                                    ok=diff < 1e-2, cfg=cfg))
        except Exception:
            rows["bwd"].append(dict(config=cfg_str(cfg, "bwd"), error=traceback.format_exc()))
        log(f"  bwd {_row_str(rows['bwd'][-1], 'bwd_ms')}")
    good_f = [r for r in rows["fwd"] if r.get("ok")]
    good_b = [r for r in rows["bwd"] if r.get("ok")]
    if not good_f or not good_b:
        return
    bf, bb = min(good_f, key=lambda r: r["fwd_ms"]), min(good_b, key=lambda r: r["bwd_ms"])
    best = ka.AttnConfig(fwd=bf["cfg"].fwd, dkdv=bb["cfg"].dkdv, dq=bb["cfg"].dq, atomic_dq=bb["cfg"].atomic_dq)
    fwd, bwd, fwd_bwd, _ = ours_fns(q, k, v, theta, slopes, window, scale, best, go)
    best_rec = dict(config=cfg_str(best, "fwd") + " | " + cfg_str(best, "bwd"), fwd_ms=bench_ms(fwd),
                    bwd_ms=bench_ms(bwd), fwdbwd_ms=bench_ms(fwd_bwd), literal=repr(best))
    # the op path with the best configuration in place of the default
    key = (shape["D"] <= 64, kind == "local")
    old = ka.DEFAULT_CONFIGS[key]
    ka.DEFAULT_CONFIGS[key] = best
    try:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        th = theta.detach().requires_grad_() if theta is not None else None
        gtn = leaves + ([th] if th is not None else [])
        op_fwd = lambda: torch.ops.grapefx.attention(*leaves, th, slopes, window, scale)
        best_rec["op_fwdbwd_ms"] = bench_ms(lambda: op_fwd().backward(go), grad_to_none=gtn)
    finally:
        ka.DEFAULT_CONFIGS[key] = old
    rec["impl"]["ours_best"] = best_rec
    log(f"  ours best: {best_rec}")
    for r in rows["fwd"] + rows["bwd"]:
        r.pop("cfg", None)


# ---------------------------------------------------------------------------------------------
# compile ahead in worker processes (warm Triton / Inductor caches)

def _warm(job):
    t0 = time.time()
    try:
        import compiler.ops  # noqa: F401
        import compiler.kernels.attention as ka
        what, shape, kind = job["what"], job["shape"], job["kind"]
        B, T, Hq, Hkv, D = shape["B"], shape["T"], shape["Hq"], shape["Hkv"], shape["D"]
        window = job.get("window", WINDOW if kind == "local" else 0)
        rotate, alibi = job.get("rotate", kind == "local"), job.get("alibi", kind == "global")
        dtype = getattr(torch, job["dtype"]) if job.get("dtype") else DTYPE
        q, k, v, theta, slopes = make_inputs(B, Hq, Hkv, T, D, rotate, alibi, dtype, seed=0)
        go = torch.randn_like(q)
        scale = D ** -0.5
        if what == "ours":
            for cfg in job["cfgs"]:
                o, lse = ka.attention_fwd(q, k, v, theta, slopes, window, scale, cfg)
                for need in job["need_dslopes"]:
                    ka.attention_bwd(go, q, k, v, o, lse, theta, slopes, window, scale, cfg, need_dslopes=need)
        else:
            f_fwd, f_fwd_bwd, _ = flex_fns(q, k, v, theta, slopes, window, scale, go)
            f_fwd_bwd()
            f_fwd()
        torch.cuda.synchronize()
        return job["name"], "ok", time.time() - t0
    except Exception as e:
        return job["name"], f"error {e!r}"[:300], time.time() - t0


def prewarm_jobs():
    jobs = []
    for c in CHECK_CASES:
        shape = dict(B=c["B"], T=c["T"], Hq=c["Hq"], Hkv=c["Hkv"], D=c["D"])
        jobs.append(dict(name="check " + c["name"], what="ours", shape=shape, kind="x", window=c["window"],
                         rotate=c["rotate"], alibi=c["alibi"], dtype=c.get("dtype"),
                         cfgs=[None], need_dslopes=[True]))         # None: the default for the dtype
    for shape in SHAPES:
        for kind in KINDS:
            fwd_cfgs, bwd_cfgs = sweep_configs(kind, shape["D"])
            tag = f"{kind} D{shape['D']}"
            jobs.append(dict(name=f"flex {tag}", what="flex", shape=shape, kind=kind))
            for i, cfg in enumerate(fwd_cfgs + bwd_cfgs[1:]):   # the default (#0) also runs as the op does
                jobs.append(dict(name=f"ours {tag} #{i}", what="ours", shape=shape, kind=kind, cfgs=[cfg],
                                 need_dslopes=[False, True] if i == 0 and kind == "global" else [False]))
    return jobs


def prewarm(timeout_s: float):
    import multiprocessing as mp
    jobs = prewarm_jobs()
    n = max(1, min(len(jobs), (os.cpu_count() or 4) - 2, 12))
    log(f"compiling ahead: {len(jobs)} jobs on {n} processes")
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(n)
    results = []
    try:
        it = pool.imap_unordered(_warm, jobs)
        end = time.time() + timeout_s
        for _ in jobs:
            results.append(it.next(timeout=max(1.0, end - time.time())))
    except Exception as e:
        log(f"compile-ahead stopped early: {e!r}")
    finally:
        pool.terminate()
        pool.join()
    bad = [r for r in results if r[1] != "ok"]
    log(f"compile-ahead: {len(results)} done, {len(bad)} with errors"
        + "".join(f"\n    {r[0]}: {r[1][:160]}" for r in bad[:5]))
    return dict(jobs=len(jobs), done=len(results), errors=[list(r) for r in bad],
                slowest=sorted(([r[0], round(r[2], 1)] for r in results), key=lambda r: -r[1])[:5])


# ---------------------------------------------------------------------------------------------

def table(res) -> str:
    lines = ["", "attention microbenchmark (ms, median; ratio = flex fwd+bwd / this fwd+bwd)"]
    for name, rec in res.get("bench", {}).items():
        fl = rec.get("floors", {})
        lines.append(f"{name}")
        flex = rec.get("impl", {}).get("flex", {}).get("fwdbwd_ms")
        for impl in ("ours", "ours_best", "ours_op", "ours_compiled", "flex", "sdpa_flash_causal", "sdpa_cudnn_causal"):
            r = rec.get("impl", {}).get(impl)
            if not r:
                continue
            fb = r.get("fwdbwd_ms")
            ratio = f"{flex / fb:5.2f}x" if flex and fb else "   - "
            lines.append(f"  {impl:18s} fwd {r.get('fwd_ms', float('nan')):7.3f}  fwd+bwd {fb if fb else float('nan'):7.3f}  {ratio}"
                         + (f"  [op {r['op_fwdbwd_ms']:.3f}]" if "op_fwdbwd_ms" in r else ""))
        if "fwd_flop_floor_ms" in fl:
            lines.append(f"  {'floors flop/byte':18s} fwd {fl['fwd_flop_floor_ms']:.3f}/{fl['fwd_byte_floor_ms']:.3f}"
                         f"  fwd+bwd {fl['fwdbwd_flop_floor_ms']:.3f}/{fl['fwdbwd_byte_floor_ms']:.3f}")
        if rec.get("target"):
            t = rec["target"]
            lines.append(f"  target flex/ours fwd+bwd >= {t['required']}: {t['achieved']:.2f}x -> "
                         f"{'MET' if t['met'] else 'MISSED'}")
        if rec.get("impl", {}).get("ours_best"):
            lines.append(f"  best config: {rec['impl']['ours_best']['config']}")
        for k, v in rec.get("errors", {}).items():
            lines.append(f"  ERROR {k}: {str(v).strip().splitlines()[-1][:150]}")
    checks = res.get("correctness", [])
    n_ok = sum(1 for c in checks if c.get("passed"))
    lines.append(f"correctness: {n_ok}/{len(checks)} passed"
                 + "".join(f"\n  FAILED {c['case']}: {c.get('rel_err', c.get('error', ''))}"[:400]
                           + (f" op-vs-kernels {c['op_vs_kernels']:.1e}" if "op_vs_kernels" in c else "")
                           for c in checks if not c.get("passed")))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=os.path.join(os.environ.get("OUT", "."), "attention.json"))
    ap.add_argument("--no-prewarm", action="store_true")
    ap.add_argument("--deadline", type=float, default=400.0, help="seconds after which config sweeps stop")
    args = ap.parse_args()
    res = dict(versions=version_check(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        res["elapsed_s"] = round(elapsed(), 1)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)

    import compiler.ops  # noqa: F401
    import compiler.kernels  # noqa: F401  (registers the kernels with the op)
    from compiler.ops.attention import _cuda_impl
    hooked = _cuda_impl()
    res["op_hook"] = None if hooked is None else [f.__module__ + "." + f.__name__ for f in hooked]
    log(f"op hook: {res['op_hook']}")

    if not args.no_prewarm:
        try:
            res["prewarm"] = prewarm(timeout_s=min(240.0, args.deadline / 2))
        except Exception:
            res["prewarm"] = dict(error=traceback.format_exc())
        save()

    try:
        res["ceilings"] = ceilings()
    except Exception:
        res["ceilings"] = dict(error=traceback.format_exc())
    log(f"ceilings: {res['ceilings']}")
    save()

    res["correctness"] = []
    for case in CHECK_CASES:
        try:
            r = check_case(case)
        except Exception:
            r = dict(case=case["name"], passed=False, error=traceback.format_exc())
        res["correctness"].append(r)
        detail = r.get("rel_err") or r.get("error", "").strip().splitlines()[-1][:300]
        log(f"check {case['name']}: {'ok' if r['passed'] else 'FAILED'} {detail}"
            + (f" op-vs-kernels {r['op_vs_kernels']:.1e}" if "op_vs_kernels" in r else "")
            + (f" compiled-vs-kernels {r['compiled_vs_kernels']:.1e} Inductor launches the kernels: "
               f"{r['inductor_launches_kernels']}" if "compiled_vs_kernels" in r else ""))
        torch.cuda.empty_cache()
        save()

    res["bench"] = {}
    for shape in SHAPES:
        for kind in KINDS:
            name = f"{kind} B{shape['B']} T{shape['T']} H{shape['Hq']}/{shape['Hkv']} D{shape['D']}" + \
                   (f" W{WINDOW} +rotation" if kind == "local" else " causal +ALiBi")
            rec = res["bench"].setdefault(name, dict(shape=shape, kind=kind))
            if elapsed() > args.deadline + 80:          # keep the whole run inside the device's 10 minutes
                rec.setdefault("errors", {})["case"] = "skipped: out of time"
                continue
            log(f"bench {name}")
            try:
                bench_case(shape, kind, res.get("ceilings", {}), rec)
            except Exception:
                rec.setdefault("errors", {})["case"] = traceback.format_exc()
                log("  FAILED: " + rec["errors"]["case"].strip().splitlines()[-1][:300])
            torch.cuda.empty_cache()
            save()
    for shape in SHAPES:
        for kind in KINDS:
            name = next(n for n, r in res["bench"].items() if r["shape"] == shape and r["kind"] == kind)
            rec = res["bench"][name]
            log(f"sweep {name}")
            try:
                sweep_case(shape, kind, rec, args.deadline)
            except Exception:
                rec.setdefault("errors", {})["sweep"] = traceback.format_exc()
                log("  sweep FAILED: " + rec["errors"]["sweep"].strip().splitlines()[-1][:300])
            torch.cuda.empty_cache()
            save()
    for rec in res["bench"].values():
        req = TARGETS.get((rec["kind"], rec["shape"]["D"]))
        impl = rec.get("impl", {})
        flex = impl.get("flex", {}).get("fwdbwd_ms")
        ours = min([impl[k]["fwdbwd_ms"] for k in ("ours", "ours_best") if k in impl] or [float("nan")])
        if flex and "ours_compiled" in impl:         # what the model runs: the op inside torch.compile
            rec["ratio_flex_over_ours_compiled_fwdbwd"] = flex / impl["ours_compiled"]["fwdbwd_ms"]
        if flex and ours == ours:
            rec["ratio_flex_over_ours_fwdbwd"] = flex / ours
            if req:
                rec["target"] = dict(required=req, achieved=flex / ours, met=flex / ours >= req)
    save()
    print(table(res), flush=True)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
