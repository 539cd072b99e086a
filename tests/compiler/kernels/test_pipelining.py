"""The grouped GEMMs' main loops as Triton compiles them for Hopper (compiler/kernels/pipelining.py,
bench/kernel_ir.py): every autotuned tile keeps each operand num_stages deep. And the router's
selection kernel compiles for Hopper at the row counts its launches use.

Needs triton, not a GPU (skipped in CI, which has no triton). Runs in a subprocess without
TRITON_INTERPRET, which the interpreter tests of this folder set for the whole process.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[3]


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_every_tile_keeps_its_operands_num_stages_deep(tmp_path):
    out = tmp_path / "ir.json"
    p = _run(["bench/kernel_ir.py", str(out), "--first", "2"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    assert doc["shallow"] == []
    weight = doc["launches"]["dW_gate | dW_up (weight_mm, a gathered)"]
    # 128 x 256 tiles over 64-row chunks, 3 stages: a^T (128 x 64) and b (64 x 256) bf16, 16 + 32 KiB, 3 deep
    r = weight[0]
    assert (r["tile"], r["num_stages"]) == ({"BI": 128, "BO": 256, "BR": 64}, 3)
    assert r["operand_buffers"] == [3, 3] and r["shared_bytes"] == 3 * (16384 + 32768) and r["async_copies"] > 0
    swiglu = doc["launches"]["gate|up + SwiGLU (rows_mm_swiglu)"][0]
    assert swiglu["num_stages"] == 4
    assert swiglu["operand_buffers"] == [4, 4, 4] and swiglu["mma_waits"][0] == 2    # a, w_gate, w_up; two dots


def test_without_the_unit_stride_the_weight_is_not_pipelined(tmp_path):
    # W_down^T's unit stride along k is what lets u's weight loads be vectorized and copied
    # asynchronously; compiled as if strided, only the rows (a) keep their 4 buffers and no MMA overlaps
    code = ("import json\n"
            "from compiler.kernels.pipelining import pipelining, GROUPED_GEMM_LAUNCHES as L\n"
            "fn, sig, cx, unit, cfg = L['u = dy W_down^T (rows_mm)']\n"
            "c = cfg[0]\n"
            "print(json.dumps([pipelining(fn, sig, {**cx, **c.kwargs}, c.num_warps, c.num_stages, u) for u in (unit, ())]))\n")
    p = _run(["-c", code], tmp_path)
    assert p.returncode == 0, p.stderr
    with_unit, without = json.loads(p.stdout.splitlines()[-1])
    assert with_unit["operand_buffers"] == [4, 4] and with_unit["mma_waits"][0] == 1      # cfg[0]: 4 stages
    assert without["operand_buffers"] == [4] and without["mma_waits"] == [0]


@pytest.mark.parametrize("E, K", [(64, 6), (48, 8), (256, 8)])
def test_the_router_kernel_compiles_for_hopper(tmp_path, E, K):
    # what the interpreter tests cannot show: the selection kernel lowers to sm90 code (ptxas included)
    # at the row counts its launches use; its only shared memory is the reductions' scratch
    code = ("import json\n"
            "from compiler.kernels import router as r\n"
            "from compiler.kernels.pipelining import pipelining\n"
            f"e_p2, block_n = r.launch_rows({E})\n"
            "sig = 'S:*fp32 Idx:*i64 Counts:*fp32 N:i32 stride_s:i32'\n"
            f"cx = dict(E={E}, E_P2=e_p2, K={K}, BLOCK_N=block_n)\n"
            "print(json.dumps(pipelining(r._router_topk_kernel, sig, cx, 4, 1)))\n")
    p = _run(["-c", code], tmp_path)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout.splitlines()[-1])
    assert info["async_copies"] == 0 and info["mma_waits"] == [] and 0 < info["shared_bytes"] <= 4096
