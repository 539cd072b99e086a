"""Where the GPU sat idle in a profiled step, from the profiler's Chrome trace.

The kernel table (``kernels.md``) sums kernel time; the step takes longer, and the difference is time
with no kernel, copy or memset on the GPU. Each such gap ends when the next GPU activity starts; the
host call that launched it (matched by the trace's ``correlation`` id) tells why the GPU waited:

    launched late    the launch came after the GPU went idle: the host was busy (Python, guards,
                     the autograd engine, a blocking call). Charged to the host op that encloses the
                     launch: the outermost (``CompiledFunction``, ``Optimizer.step#AdamW.step``, ...)
                     and the innermost (``aten::mm``, ``grapefx::expert_ffn``, ...)
    queued           the launch came before the gap began: the GPU waited on something else (an
                     event between streams, a copy engine)

Host calls that can block (``cuda*Synchronize``, ``cudaMemcpy*``: a copy to the host waits for the
GPU) and took longer than ``SYNC_US`` are listed apart, with their enclosing host ops: a blocking
call drains the GPU's queue, and the host then has to launch ahead again from empty.

The profiler slows the host, so the idle times it shows are larger than in an unprofiled step, and
by how much depends on the machine: compare ways profiled in one run, not runs.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation")
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
SYNC_US = 20.0          # a blocking call shorter than this is not worth listing


def _spans(events: list[dict], cats: tuple[str, ...]) -> list[dict]:
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in cats and "dur" in e]


class _HostOps:
    """The host ops of one thread as a forest (ops nest per thread): which ones enclose a point in time."""

    def __init__(self, ops: list[dict]):
        self.ops = sorted(ops, key=lambda e: (e["ts"], -e["dur"]))
        self.starts = [e["ts"] for e in self.ops]
        self.parent, stack = [], []
        for i, e in enumerate(self.ops):
            while stack and self.ops[stack[-1]]["ts"] + self.ops[stack[-1]]["dur"] < e["ts"]:
                stack.pop()
            self.parent.append(stack[-1] if stack else -1)
            stack.append(i)

    def enclosing(self, t: float) -> list[dict]:
        """The ops running at time t, outermost first: the last op started by t, or its nearest ancestor
        still running, and that one's ancestors."""
        i = bisect.bisect_right(self.starts, t) - 1
        while i >= 0 and self.ops[i]["ts"] + self.ops[i]["dur"] < t:
            i = self.parent[i]
        chain = []
        while i >= 0:
            chain.append(self.ops[i])
            i = self.parent[i]
        return chain[::-1]


def idle_gaps(trace: dict, steps: int, *, top: int = 12) -> dict:
    """Idle GPU time per step in ``trace`` (a torch.profiler Chrome trace as loaded from JSON), by cause.

    Returns ``busy_ms_per_step``, ``idle_ms_per_step`` (within the span from the first GPU activity to
    the last), ``late_ms_per_step`` / ``queued_ms_per_step`` (the two kinds above), ``by_outer`` and
    ``by_inner`` (idle ms per step charged to the host ops enclosing late launches, largest first),
    ``syncs`` (blocking host calls: name, enclosing op, count and ms per step) and ``largest``
    (the longest single gaps, with the GPU activity before and after).
    """
    events = trace.get("traceEvents", [])
    gpu = sorted(_spans(events, GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        return {"busy_ms_per_step": 0.0, "idle_ms_per_step": 0.0, "late_ms_per_step": 0.0,
                "queued_ms_per_step": 0.0, "by_outer": [], "by_inner": [], "syncs": [], "largest": []}
    launches = {e["args"]["correlation"]: e for e in _spans(events, ("cuda_runtime", "cuda_driver"))
                if "correlation" in e.get("args", {})}
    threads = defaultdict(list)
    for e in _spans(events, HOST_CATS):
        threads[(e["pid"], e["tid"])].append(e)
    host = {k: _HostOps(v) for k, v in threads.items()}

    def enclosing(call: dict) -> list[dict]:
        ops = host.get((call["pid"], call["tid"]))
        return ops.enclosing(call["ts"]) if ops else []

    busy = idle = late = queued = 0.0
    by_outer: dict[str, float] = defaultdict(float)
    by_inner: dict[str, float] = defaultdict(float)
    largest = []
    end, prev = gpu[0]["ts"], gpu[0]
    for e in gpu:
        gap = e["ts"] - end
        if gap > 0:
            idle += gap
            launch = launches.get(e.get("args", {}).get("correlation"))
            is_late = launch is not None and launch["ts"] > end
            if is_late:
                late += gap
                ops = enclosing(launch)
                by_outer[ops[0]["name"] if ops else "(no host op)"] += gap
                by_inner[ops[-1]["name"] if ops else "(no host op)"] += gap
            else:
                queued += gap
            largest.append((gap, prev["name"], e["name"], "late" if is_late else "queued"))
        busy += max(0.0, e["ts"] + e["dur"] - max(end, e["ts"]))
        if e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e

    syncs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e in _spans(events, ("cuda_runtime",)):
        if e["name"].startswith(SYNC_NAMES) and e["dur"] >= SYNC_US:
            ops = enclosing(e)
            syncs[(e["name"], " > ".join(o["name"] for o in ops[-2:]) or "(no host op)")].append(e["dur"])

    ms = 1e-3 / max(steps, 1)

    def ranked(d):
        return [{"op": k[:120], "ms_per_step": v * ms} for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    largest.sort(key=lambda g: -g[0])
    return {"busy_ms_per_step": busy * ms, "idle_ms_per_step": idle * ms, "late_ms_per_step": late * ms,
            "queued_ms_per_step": queued * ms, "by_outer": ranked(by_outer), "by_inner": ranked(by_inner),
            "syncs": [{"call": n, "in": where[:120], "per_step": len(d) / max(steps, 1), "ms_per_step": sum(d) * ms}
                      for (n, where), d in sorted(syncs.items(), key=lambda kv: -sum(kv[1]))[:top]],
            "largest": [{"us": g, "after": a[:90], "before": b[:90], "kind": k} for g, a, b, k in largest[:top]]}


def gap_table(g: dict) -> str:
    """Markdown for ``idle_gaps``' result (a section of ``kernels.md``)."""
    lines = [f"GPU busy {g['busy_ms_per_step']:.2f} ms and idle {g['idle_ms_per_step']:.2f} ms per step "
             f"(launched late {g['late_ms_per_step']:.2f}, queued {g['queued_ms_per_step']:.2f})\n",
             "| idle before a late launch, by outermost host op | ms/step |\n|---|---|"]
    lines += [f"| `{r['op'][:90]}` | {r['ms_per_step']:.2f} |" for r in g["by_outer"]]
    lines += ["\n| ... by innermost host op | ms/step |\n|---|---|"]
    lines += [f"| `{r['op'][:90]}` | {r['ms_per_step']:.2f} |" for r in g["by_inner"]]
    if g["syncs"]:
        lines += ["\n| blocking host call | in | per step | ms/step |\n|---|---|---|---|"]
        lines += [f"| `{s['call']}` | `{s['in'][:70]}` | {s['per_step']:g} | {s['ms_per_step']:.2f} |" for s in g["syncs"]]
    return "\n".join(lines) + "\n"
