"""Idle GPU time from a profiler trace (runtime/bench/gaps.py), on a trace written by hand."""

from runtime.bench.gaps import gap_table, idle_gaps


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 7, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _trace():
    # GPU (two streams):  k1 [0, 1000]   k2 [1500, 2500]   k3 [3000, 4000]   k4 [3800, 4500]
    # k2 launched at 1200, after the GPU went idle at 1000: 500 us late, inside the optimizer's fused kernel op;
    # k3 launched at 2000, before its gap (2500..3000) began: 500 us queued; k4 overlaps k3 (busy is a union).
    # The host blocked in aten::item for 300 us (a cudaStreamSynchronize) and for 10 us (below SYNC_US).
    return {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 7, "tid": 0, "args": {"name": "python"}},
        _x("kernel", "k1", 0, 1000, tid=20, correlation=1),
        _x("kernel", "k2", 1500, 1000, tid=20, correlation=2),
        _x("kernel", "k3", 3000, 1000, tid=20, correlation=3),
        _x("kernel", "k4", 3800, 700, tid=21, correlation=4),
        _x("cuda_runtime", "cudaLaunchKernel", -50, 5, correlation=1),
        _x("cuda_runtime", "cudaLaunchKernel", 1200, 5, correlation=2),
        _x("cuda_runtime", "cudaLaunchKernel", 2000, 5, correlation=3),
        _x("cuda_runtime", "cudaLaunchKernel", 2100, 5, correlation=4),
        _x("user_annotation", "Optimizer.step#AdamW.step", 1100, 1000),
        _x("cpu_op", "aten::_fused_adamw_", 1150, 200),
        _x("cpu_op", "aten::mul", 1400, 10),
        _x("cpu_op", "aten::item", 2200, 400),
        _x("cpu_op", "aten::_local_scalar_dense", 2210, 380),
        _x("cuda_runtime", "cudaStreamSynchronize", 2250, 300),
        _x("cuda_runtime", "cudaStreamSynchronize", 2580, 10),
    ]}


def test_idle_gaps_by_hand():
    g = idle_gaps(_trace(), steps=2)
    # busy: 1000 + 1000 + (4500 - 3000) = 3500 us over 2 steps; idle: 500 late + 500 queued
    assert g["busy_ms_per_step"] == 1.75
    assert g["idle_ms_per_step"] == 0.5
    assert g["late_ms_per_step"] == 0.25 and g["queued_ms_per_step"] == 0.25
    assert g["by_outer"] == [{"op": "Optimizer.step#AdamW.step", "ms_per_step": 0.25}]
    assert g["by_inner"] == [{"op": "aten::_fused_adamw_", "ms_per_step": 0.25}]
    assert g["syncs"] == [{"call": "cudaStreamSynchronize", "in": "aten::item > aten::_local_scalar_dense",
                           "per_step": 0.5, "ms_per_step": 0.15}]
    assert [(x["us"], x["after"], x["before"], x["kind"]) for x in g["largest"]] == [
        (500, "k1", "k2", "late"), (500, "k2", "k3", "queued")]
    table = gap_table(g)
    assert "GPU busy 1.75 ms and idle 0.50 ms per step (launched late 0.25, queued 0.25)" in table
    assert "| `Optimizer.step#AdamW.step` | 0.25 |" in table


def test_no_gpu_activity():
    g = idle_gaps({"traceEvents": [_x("cpu_op", "aten::mm", 0, 10)]}, steps=3)
    assert g["idle_ms_per_step"] == 0.0 and g["by_outer"] == [] and g["largest"] == []
