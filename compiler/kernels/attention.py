"""Python side of the Triton attention kernels: launch wrappers, tile configurations, the op hook.

    out, lse = attention_fwd(q, k, v, theta, slopes, window, scale)
    dq, dk, dv, dtheta, dslopes = attention_bwd(grad_out, q, k, v, out, lse, theta, slopes, window, scale)

Semantics are those of ``grapefx::attention`` (``compiler/ops/attention.py``, MATH.md §1–§3):
q (B, Hq, T, D), k and v (B, Hkv, T, D); query head h reads KV head h // G; causal always;
``window`` W > 0 lets query i see keys i-W+1..i (W >= T or 0: full causal); ``theta`` (D/2,) fp32
rotates q and k at positions 0..T-1 (GRAPE-M, half-split pairs); ``slopes`` (Hq,) fp32 adds
-slopes[h] * (i - j) after the scaling. lse is the natural-log logsumexp (B, Hq, T) fp32.
dtheta (D/2,) and dslopes (Hq,) are fp32, or None when theta / slopes is None (or not asked for).

q, k, v may be strided views, e.g. (B, T, H, D) projections seen as (B, H, T, D): the kernels read
them where they are (any batch, head and row strides, the last dim contiguous) and write out, dq,
dk, dv in the same layouts, so neither side of the op copies (``_dense``, ``_like``).

Supported here: CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``), dtype bf16, fp16 or
fp32 (fp32 dots in IEEE precision, not tf32), D in {32, 64, 128} (D = 16 also under the
interpreter), theta and slopes fp32. ``supports(...)`` says whether a call qualifies;
``cuda_forward``/``cuda_backward`` (the opaque ops' CUDA hook) send everything else to the op's
reference. Launches go through ``compiler.kernels.launch``, so the same wrappers serve the traceable
``triton_op``s of ``compiler.kernels.attention_ops`` (``wrap_triton`` there) and direct calls.

Importing this module needs no triton: the kernels are imported on the first launch.
"""

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from compiler.kernels import launch
from compiler.ops.grape_m import cos_sin
from spec.errors import GrapefxError

LOG2E = 1.4426950408889634
KERNEL_HEAD_DIMS = (32, 64, 128)        # D/2 must be a power of two and >= 16 (tensor-core dot depth)
INTERPRETER_HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: rows of its q tile, rows of its k/v tile, warps, pipeline stages.

    ``one_loop``: walk the visible tiles in one masked loop instead of three phases (window edge /
    fully visible / diagonal) of which only the edges are masked; fewer, longer loops pipeline
    better when a row sees only a few tiles (sliding windows).
    ``table``: with rotation, read cos and sin from a per-call table (``rotation_table``) instead of
    evaluating them for every tile the kernel visits.
    """
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    one_loop: bool = False
    table: bool = False


@dataclass(frozen=True)
class AttnConfig:
    """Launch shapes of the four attention kernels.

    fwd and dq own a q tile and step through key tiles: block_m must be a multiple of block_n (the
    diagonal tiles then line up). dkdv owns a k/v tile and steps through q tiles: its block_n must
    be a multiple of its block_m. ``atomic_dq``: dkdv also adds dS @ K into an fp32 dq buffer
    (5 matmuls per tile pair instead of 7, but the fp32 summation order varies run to run);
    otherwise a separate dq kernel recomputes P and dP (deterministic).
    """
    fwd: Tiles
    dkdv: Tiles
    dq: Tiles
    atomic_dq: bool = False

    def check(self) -> None:
        for name, t in (("fwd", self.fwd), ("dq", self.dq)):
            if t.block_m % t.block_n:
                raise ValueError(f"AttnConfig.{name}: block_m ({t.block_m}) must be a multiple of block_n ({t.block_n})")
        if self.dkdv.block_n % self.dkdv.block_m:
            raise ValueError(f"AttnConfig.dkdv: block_n ({self.dkdv.block_n}) must be a multiple of "
                             f"block_m ({self.dkdv.block_m})")
        for t in (self.fwd, self.dkdv, self.dq):
            for size in (t.block_m, t.block_n):
                if size < 16 or size & (size - 1):
                    raise ValueError(f"AttnConfig: tile sizes must be powers of two >= 16, got {t}")
                if t.table and size > TABLE_PAD:
                    raise ValueError(f"AttnConfig: tiles reading the rotation table are at most {TABLE_PAD} "
                                     f"rows (its padding), got {t}")


# Launch shapes per GPU family, keyed by (D <= 64, windowed). Hopper (compute capability 9.x: H100,
# H200, which share the SM and its 228 KB of shared memory): the fastest of the configurations
# bench/attention.py timed on H100 80GB HBM3 cards (bench/RESULTS.md; the
# deterministic dq kernel preferred over the atomic one where they were within 5%). Local (W = 128):
# a 128-row q tile with 32-key tiles visits 5 key tiles for 128 useful keys (masked in one loop).
# The backward keeps 4 warps in dkdv (the 8-warp variants were 1.3-2x slower, on global layers too)
# and 32-row q tiles, except global D = 64, where 64-row tiles took 1.878 ms against 1.987 on an
# H200 (B 8, T 4096, 12/4 heads; bench/RESULTS.md, the attention sweep of the evening of
# 2026-12-04); three pipeline stages pay off at D = 64, not at D = 128.
HOPPER = {
    (True, True): AttnConfig(fwd=Tiles(128, 32, 4, 3, True), dkdv=Tiles(32, 64, 4, 3, True),
                             dq=Tiles(64, 64, 4, 3, True)),
    (True, False): AttnConfig(fwd=Tiles(64, 64, 4, 3), dkdv=Tiles(64, 64, 4, 3), dq=Tiles(64, 64, 4, 3)),
    (False, True): AttnConfig(fwd=Tiles(64, 32, 4, 3, True), dkdv=Tiles(32, 64, 4, 2, True),
                              dq=Tiles(64, 64, 4, 2, True)),
    (False, False): AttnConfig(fwd=Tiles(64, 64, 4, 3), dkdv=Tiles(32, 64, 4, 2), dq=Tiles(64, 64, 4, 2)),
}
# Other families (Ampere 8.x, Ada 8.9, Blackwell 10.x/12.x) have not been timed: Hopper's shapes with
# at most two pipeline stages, which fit the smaller shared memory of the 8.6/8.9/12.x cards (100 KB).
OTHER = {key: replace(c, **{part: replace(t, num_stages=min(t.num_stages, 2))
                            for part, t in (("fwd", c.fwd), ("dkdv", c.dkdv), ("dq", c.dq))})
         for key, c in HOPPER.items()}
TILE_TABLES = {9: HOPPER}                # compute capability major -> table; anything else: OTHER


TUNED_ENV = "GRAPEFX_ATTENTION_TILES"   # a JSON file of tuned launch shapes (bench/attention.py --tiles-out)


def tile_table(capability: tuple[int, int]) -> dict:
    """The launch-shape table for a device of compute ``capability`` (major, minor): the family's
    built-in table, with the entries of the tuned-tiles file named by $GRAPEFX_ATTENTION_TILES for
    this capability in place of the built-in ones (``tuned_tiles``)."""
    table = TILE_TABLES.get(capability[0], OTHER)
    path = os.environ.get(TUNED_ENV)
    return {**table, **tuned_tiles(path, capability)} if path else table


def tile_key(head_dim_le_64: bool, windowed: bool) -> str:
    """The tuned-tiles file's name of a table entry: d64_local, d64_global, d128_local, d128_global."""
    return f"d{64 if head_dim_le_64 else 128}_{'local' if windowed else 'global'}"


@functools.lru_cache(maxsize=8)
def tuned_tiles(path: str, capability: tuple[int, int]) -> dict:
    """Launch shapes that a sweep measured fastest on this kind of device, read once per process:

        {"capability": "9.0", "configs": {"d64_local": {"fwd": [block_m, block_n, warps, stages,
         one_loop, table], "dkdv": [...], "dq": [...], "atomic_dq": false}, ...}}

    (``bench/attention.py --tiles-out`` writes it). A file for another capability gives nothing;
    one that does not parse, or a configuration ``AttnConfig.check`` refuses, is an error naming it.
    """
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("capability") != f"{capability[0]}.{capability[1]}":
            return {}
        keys = {tile_key(d, w): (d, w) for d in (True, False) for w in (True, False)}
        out = {}
        for name, c in doc["configs"].items():
            cfg = AttnConfig(fwd=Tiles(*c["fwd"]), dkdv=Tiles(*c["dkdv"]), dq=Tiles(*c["dq"]),
                             atomic_dq=bool(c.get("atomic_dq", False)))
            cfg.check()
            out[keys[name]] = cfg
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GrapefxError(f"{TUNED_ENV}={path}: not a tuned-tiles file ({type(e).__name__}: {e}); write it with "
                           "bench/attention.py --tiles-out, or unset the variable") from e


def tile_literal(cfg: AttnConfig) -> dict:
    """``cfg`` as an entry of the tuned-tiles file."""
    t = lambda x: [x.block_m, x.block_n, x.num_warps, x.num_stages, x.one_loop, x.table]
    return {"fwd": t(cfg.fwd), "dkdv": t(cfg.dkdv), "dq": t(cfg.dq), "atomic_dq": cfg.atomic_dq}


def _windowed(window: int, T: int) -> bool:
    """A window only masks something when 0 < W < T; W >= T is full causal attention."""
    return 0 < window < T


# fp32 inputs (tests, references) take IEEE dots on the CUDA cores with twice the bytes per tile:
# small tiles and no pipelining keep them inside shared memory and registers.
FP32_CONFIG = AttnConfig(fwd=Tiles(64, 32, 4, 1), dkdv=Tiles(32, 32, 4, 1), dq=Tiles(64, 32, 4, 1))


def _capability(device: Optional[torch.device]) -> tuple[int, int]:
    """A CUDA device's compute capability; Hopper's (9, 0) for CPU tensors (Triton's interpreter)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    if device is None and torch.cuda.is_available():
        return torch.cuda.get_device_capability()
    return (9, 0)


def default_config(head_dim: int, window: int, seq_len: int, dtype: torch.dtype = torch.bfloat16,
                   device: Optional[torch.device] = None) -> AttnConfig:
    """The launch shapes for a call: ``FP32_CONFIG`` for fp32, else the entry of the device family's
    table (``tile_table``; ``device`` None: the current CUDA device)."""
    if dtype == torch.float32:
        return FP32_CONFIG
    return tile_table(_capability(device))[(head_dim <= 64, _windowed(window, seq_len))]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(q: Tensor, k: Tensor, v: Tensor, theta: Optional[Tensor], slopes: Optional[Tensor]) -> bool:
    """Whether the kernels take this call (shapes already checked by the op)."""
    interp = _interpreting()
    dims = INTERPRETER_HEAD_DIMS if interp else KERNEL_HEAD_DIMS
    return ((interp or (q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 0)))   # bf16 tensor cores
            and q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] in dims
            and (theta is None or theta.dtype == torch.float32)
            and (slopes is None or slopes.dtype == torch.float32))


def _kernels():
    from compiler.kernels import _attention_triton
    return _attention_triton


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands: IEEE dots (Triton's default, tf32, has a 1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, theta: Optional[Tensor], slopes: Optional[Tensor],
                  window: int, scale: float, config: Optional[AttnConfig] = None) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, T, D) in q's dtype, lse (B, Hq, T) fp32, natural log)."""
    tk = _kernels()
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    q, k = _dense(q), _dense(k)
    v = _like(v, k)
    out = torch.empty_like(q)                                                   # (B, Hq, T, D), q's layout
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)           # (B, Hq, T)
    if out.numel() == 0:
        return out, lse
    cfg = config or default_config(D, window, T, q.dtype, q.device)
    cfg.check()
    t = cfg.fwd
    windowed = _windowed(window, T)
    nb_win = _cdiv(window - 1, t.block_n) if windowed else 0             # key tiles before the diagonal in the window
    nb_full = max(0, (window - t.block_m) // t.block_n) if windowed else 0   # ... of which every pair is visible
    table = rotation_table(theta, T) if theta is not None and t.table else None
    with _device(q):
        launch(tk._fwd)[(_cdiv(T, t.block_m), B * Hq)](
            q, k, v, _theta_arg(theta, table, t.table, lse), _or(slopes, lse), out, lse,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q.stride(2), k.stride(2), T, Hq, Hq // Hkv, window,
            scale * LOG2E, nb_win, nb_full,
            HALF=D // 2, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
            ROTATE=theta is not None, ALIBI=slopes is not None, WINDOW=windowed, ONE_LOOP=t.one_loop,
            DOT_PREC=_dot_precision(q.dtype), TABLE=t.table and theta is not None,
            num_warps=t.num_warps, num_stages=t.num_stages)
    return out, lse


def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  theta: Optional[Tensor], slopes: Optional[Tensor], window: int, scale: float,
                  config: Optional[AttnConfig] = None, need_dtheta: bool = True, need_dslopes: bool = True
                  ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(dq, dk, dv, dtheta, dslopes); dtheta / dslopes are None when theta / slopes is None or
    ``need_dtheta`` / ``need_dslopes`` is False."""
    tk = _kernels()
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    q, k = _dense(q), _dense(k)
    v, out, grad_out = _like(v, k), _like(out, q), _like(grad_out, q)
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)   # the inputs' layouts
    rotate, alibi = theta is not None, slopes is not None
    need_dtheta, need_dslopes = bool(need_dtheta and rotate), bool(need_dslopes and alibi)
    f32 = dict(dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return (dq, dk.zero_(), dv.zero_(), torch.zeros(D // 2, **f32) if need_dtheta else None,
                torch.zeros(Hq, **f32) if need_dslopes else None)
    cfg = config or default_config(D, window, T, q.dtype, q.device)
    cfg.check()
    windowed = _windowed(window, T)
    half = D // 2
    scale2 = scale * LOG2E
    prec = _dot_precision(q.dtype)
    common = dict(ROTATE=rotate, ALIBI=alibi, WINDOW=windowed, DOT_PREC=prec)

    delta = torch.empty(B, Hq, T, **f32)                                        # rowsum(dO * O)
    tkv, tq = cfg.dkdv, cfg.dq
    n_kv = _cdiv(T, tkv.block_n)
    n_q = _cdiv(T, tq.block_m)
    dtheta_k = torch.empty(B * Hkv, n_kv, half, **f32) if need_dtheta else delta   # per-tile partial sums
    dtheta_q = torch.empty(B * Hq, n_q, half, **f32) if need_dtheta else delta
    dslopes_part = torch.empty(B * Hq, n_kv, **f32) if need_dslopes else delta
    dq_acc = torch.zeros(B, Hq, T, D, **f32) if cfg.atomic_dq else delta         # fp32 dL/d(rotated q) / scale
    slopes_arg = _or(slopes, delta)
    table = rotation_table(theta, T) if rotate and (tkv.table or tq.table) else None
    # q tiles of the dkdv sweep after the diagonal whose every (query, key) pair is in the window
    n_full_q = max(0, (window - tkv.block_n - tkv.block_m) // tkv.block_m + 1) if windowed else 0
    with _device(q):
        launch(tk._bwd_delta)[(_cdiv(T, 64), B * Hq)](
            out, grad_out, delta, q.stride(0), q.stride(1), q.stride(2), T, Hq, D=D, BLOCK_M=64, num_warps=4)
        launch(tk._bwd_dkdv)[(n_kv, B * Hkv)](
            q, k, v, grad_out, lse, delta, _theta_arg(theta, table, tkv.table, delta), slopes_arg, dk, dv, dq_acc,
            dtheta_k, dslopes_part,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), q.stride(2), k.stride(2), T, Hq, Hkv, Hq // Hkv,
            window, scale, scale2, n_full_q,
            HALF=half, BLOCK_M=tkv.block_m, BLOCK_N=tkv.block_n, ATOMIC_DQ=cfg.atomic_dq,
            NEED_DTHETA=need_dtheta, NEED_DSLOPES=need_dslopes, ONE_LOOP=tkv.one_loop, **common,
            TABLE=tkv.table and rotate, num_warps=tkv.num_warps, num_stages=tkv.num_stages)
        if cfg.atomic_dq:
            launch(tk._bwd_dq_finish)[(n_q, B * Hq)](
                q, dq_acc, _theta_arg(theta, table, tq.table, delta), dq, dtheta_q, q.stride(0), q.stride(1),
                q.stride(2), T, Hq, scale, HALF=half, BLOCK_M=tq.block_m, ROTATE=rotate, NEED_DTHETA=need_dtheta,
                TABLE=tq.table and rotate, num_warps=tq.num_warps)
        else:
            nb_win = _cdiv(window - 1, tq.block_n) if windowed else 0
            nb_full = max(0, (window - tq.block_m) // tq.block_n) if windowed else 0
            launch(tk._bwd_dq)[(n_q, B * Hq)](
                q, k, v, grad_out, lse, delta, _theta_arg(theta, table, tq.table, delta), slopes_arg, dq, dtheta_q,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), q.stride(2), k.stride(2), T, Hq, Hq // Hkv,
                window, scale, scale2, nb_win, nb_full,
                HALF=half, BLOCK_M=tq.block_m, BLOCK_N=tq.block_n, NEED_DTHETA=need_dtheta, ONE_LOOP=tq.one_loop,
                **common, TABLE=tq.table and rotate, num_warps=tq.num_warps, num_stages=tq.num_stages)
    dtheta = dtheta_k.sum((0, 1)) + dtheta_q.sum((0, 1)) if need_dtheta else None             # (D/2,)
    dslopes = dslopes_part.view(B, Hq, n_kv).sum((0, 2)) if need_dslopes else None             # (Hq,)
    return dq, dk, dv, dtheta, dslopes


def _dense(x: Tensor) -> Tensor:
    """x itself when its elements fill their span without gaps, the last dim contiguous (then
    ``empty_like(x)`` has x's strides, and the kernels index an output with its input's strides);
    else a contiguous copy. A (B, T, H, D) projection viewed as (B, H, T, D) passes as it is."""
    if x.stride(-1) == 1:
        expected = 1
        for size, stride in sorted(((n, st) for n, st in zip(x.shape, x.stride()) if n != 1), key=lambda p: p[1]):
            if stride != expected:
                return x.contiguous()
            expected *= size
        return x
    return x.contiguous()


def _like(x: Tensor, ref: Tensor) -> Tensor:
    """x in the memory layout of ``ref`` (same shape, ``_dense``): itself when the strides agree, else a copy."""
    return x if x.stride() == ref.stride() else torch.empty_like(ref).copy_(x)


def rotation_table(theta: Tensor, T: int) -> Tensor:
    """(T + TABLE_PAD, 2, D/2) fp32: [cos | sin] of angle[n, j] = fl32(n * theta_j) per position n.

    The kernels index it by row without a bound check: rows up to the last tile's end (< T + 128
    for tiles of at most 128 rows) must exist, hence the padding.
    """
    _, cos, sin = cos_sin(theta, T + TABLE_PAD, 0, torch.float32)               # (T + pad, D/2) each
    return torch.stack([cos, sin], dim=1)


TABLE_PAD = 256


def _theta_arg(theta: Optional[Tensor], table: Optional[Tensor], use_table: bool, placeholder: Tensor) -> Tensor:
    """What a kernel's ``Theta`` points at: the frequencies, the cos/sin table (``TABLE``), or a placeholder."""
    if theta is None:
        return placeholder
    return table if use_table else theta.contiguous()


def _or(x: Optional[Tensor], placeholder: Tensor) -> Tensor:
    """A pointer argument the kernel will not read when x is None (its constexpr flag is off)."""
    return placeholder if x is None else x.contiguous()


class _device:
    """Launch on the tensor's GPU (Triton uses the current device); nothing to do on CPU."""

    def __init__(self, x: Tensor):
        self.ctx = torch.cuda.device(x.device) if x.is_cuda else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# how grapefx::attention reaches the kernels (compiler.ops.attention.register_cuda_impl)
#
# Traced (the default): through the ``triton_op``s of ``compiler.kernels.attention_ops``.
# Opaque (``GRAPEFX_OPAQUE_KERNELS=1``, for A/B measurements): the reference custom ops
# ``grapefx::attention_fwd`` / ``attention_bwd`` call ``cuda_forward`` / ``cuda_backward`` from their
# Python bodies, the kernels launched directly.

def cuda_forward(q, k, v, theta, slopes, window, scale):
    """Opaque-path forward: the kernels where ``supports``, else the op's reference. Contiguous
    inputs, so the outputs are contiguous as the opaque op's fake implementation says."""
    if supports(q, k, v, theta, slopes):
        return attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), theta, slopes, window, scale)
    from compiler.ops.attention import _forward_ref
    return _forward_ref(q, k, v, theta, slopes, window, scale)


def cuda_backward(grad_out, q, k, v, out, lse, theta, slopes, window, scale):
    """Opaque-path backward; takes the same branch as ``cuda_forward`` for the same inputs."""
    if supports(q, k, v, theta, slopes):
        return attention_bwd(*(x.contiguous() for x in (grad_out, q, k, v, out)), lse, theta, slopes, window, scale)
    from compiler.ops.attention import _backward_ref
    return _backward_ref(grad_out, q, k, v, out, lse, theta, slopes, window, scale)


def flops(B: int, Hq: int, T: int, D: int, window: int) -> float:
    """Matmul FLOPs of the forward over the visible (query, key) pairs (4 D per pair: q.k and p.v).
    The backward does 2.5x this (5 matmuls); the recomputing dq kernel adds 1x more."""
    W = window if _windowed(window, T) else T
    pairs = W * (W + 1) / 2 + (T - W) * W                       # sum_i min(i + 1, W)
    return 4.0 * B * Hq * D * pairs


__all__ = ["AttnConfig", "Tiles", "HOPPER", "OTHER", "TILE_TABLES", "tile_table", "FP32_CONFIG", "default_config",
           "rotation_table", "TUNED_ENV", "tuned_tiles", "tile_key", "tile_literal", "supports", "attention_fwd",
           "attention_bwd", "cuda_forward", "cuda_backward", "flops"]
