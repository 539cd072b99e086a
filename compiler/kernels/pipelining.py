"""How Triton pipelines a kernel's main loop, read from its compiled IR on any machine (no GPU needed).

    pipelining(fn, signature, constexprs, num_warps, num_stages, unit=(), target=(90, 32)) -> dict

    shared_bytes      shared memory the compiled kernel asks for
    async_copies      global -> shared asynchronous copies in its IR (0: every load waits in registers)
    operand_buffers   the leading dimension of each multi-buffered shared allocation: how many tiles of
                      each MMA operand the loop keeps in flight (num_stages when fully pipelined)
    mma_waits         the ``pendings`` of each wgmma wait: MMAs left in flight (0 = none overlap)

Triton's JIT specializes every launch: pointers and integers divisible by 16 carry that fact and
integers equal to 1 become constants. ``pipelining`` compiles with the same facts (every pointer and
integer argument divisible by 16, the ``unit`` ones equal to 1) for the target (``(90, 32)``: sm90,
warp 32), so it shows what a launch on that GPU runs. Without them, for instance, a weight whose
stride along the product's depth is 1 looks strided: its loads are not vectorized, not copied
asynchronously, and no MMA overlaps the next (``tests/compiler/kernels/test_pipelining.py``).

``GROUPED_GEMM_LAUNCHES`` describes the launches of ``compiler.kernels.grouped_gemm`` as the expert
step makes them (``bench/kernel_ir.py`` reports them for every autotuned tile). Why this exists: the
weight-gradient kernel read its gathered rows' indices in the loop that then loaded those rows, and
Triton kept two buffers of each operand whatever ``num_stages`` said; the IR shows it in a second,
without a GPU.
"""

from __future__ import annotations

import re
from typing import Callable

import triton
from triton.backends.compiler import GPUTarget

from compiler.kernels import grouped_gemm as gg

__all__ = ["pipelining", "GROUPED_GEMM_LAUNCHES"]

_ROWS_SIG = ("A:*bf16 Src:*i64 W1:*bf16 W2:*bf16 Out:*bf16 H:*bf16 Offs:*i32 K1:i32 N_OUT:i32 stride_a:i32 "
             "stride_o:i32 stride_h:i32 s1e:i32 s1k:i32 s1n:i32 s2e:i32 s2k:i32 s2n:i32")
_WEIGHT_SIG = ("A:*bf16 ASrc:*i64 B:*bf16 BSrc:*i64 Out1:*bf16 Out2:*bf16 Offs:*i32 I:i32 O:i32 O_SPLIT:i32 "
               "stride_a:i32 stride_b:i32 so1e:i32 so1i:i32 so2e:i32 so2i:i32")

# name -> (kernel, signature, launch constexprs other than the tile, the arguments equal to 1, autotuned tiles)
GROUPED_GEMM_LAUNCHES: dict[str, tuple[Callable, str, dict, tuple[str, ...], list]] = {
    "gate|up + SwiGLU (rows_mm_swiglu)": (gg._rows_kernel, _ROWS_SIG, dict(E=64, E_P2=64, GATHER=True, SWIGLU=True),
                                          ("s1n", "s2n"), gg._FWD_CONFIGS),
    "u = dy W_down^T (rows_mm)": (gg._rows_kernel, _ROWS_SIG, dict(E=64, E_P2=64, GATHER=True, SWIGLU=False),
                                  ("s1k", "s2k"), gg._FWD_CONFIGS),
    "dW_gate | dW_up (weight_mm, a gathered)": (gg._weight_kernel, _WEIGHT_SIG,
                                                dict(GATHER_A=True, GATHER_B=False, SPLIT=True), (), gg._WGRAD_CONFIGS),
    "dW_down (weight_mm, b gathered)": (gg._weight_kernel, _WEIGHT_SIG, dict(GATHER_A=False, GATHER_B=True, SPLIT=False),
                                        (), gg._WGRAD_CONFIGS),
}


def pipelining(fn, signature: str, constexprs: dict, num_warps: int, num_stages: int, unit: tuple[str, ...] = (),
               target: tuple[int, int] = (90, 32)) -> dict:
    """Compile ``fn`` (a ``triton.jit`` function) as a launch on ``target`` would and read its main loop's
    pipelining from the IR (module docstring). ``signature``: "name:type ..." for the runtime arguments."""
    sig = dict(a.split(":") for a in signature.split())
    sig.update({n: "constexpr" for n in constexprs})
    values = dict(constexprs)
    for n in unit:
        sig[n], values[n] = "constexpr", 1
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t != "constexpr"}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=values, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", *target),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ir = kernel.asm["ttgir"]
    buffers = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", ir)
    return {"shared_bytes": kernel.metadata.shared,
            "async_copies": ir.count("async_copy_global_to_local"),
            "operand_buffers": [int(b) for b in buffers],
            "mma_waits": [int(p) for p in re.findall(r"warp_group_dot_wait .*pendings = (\d+)", ir)]}
