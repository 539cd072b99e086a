"""`grapefx bench`: one process, the same batches, five ways of running the same model.

    eager      the lowered graphs as they are: no passes, no compile
    compile    the lowered graphs under plain torch.compile (the pipeline's per-graph compile, no passes)
    flex       our fused graphs with FlexAttention in place of the fused attention op
               (``runtime.bench.flex``), plus the fused head loss, compiled
    reference  ``runtime.bench.reference_model``: the same model written by hand (FlexAttention with block
               masks and an ALiBi score_mod, separate rotation, ``torch._grouped_mm`` experts,
               per-block torch.compile with the spec's ``compile.inductor_options``, as every
               compiled way), started from the SAME initial weights
    grapefx    the fused graphs (all passes), our kernels, the fused head loss, Inductor

Each way is a full training step: forward, backward, AdamW (fused on CUDA, foreach on CPU; the
spec's lr, betas, eps and weight-decay groups; no clipping, no schedule) at the spec's micro-batch
and sequence length, on random tokens from a fixed seed (the same batches for every way).

Per way (JSON, written after every way so a crash loses nothing):
- ``step_ms``: median of the last window of timed steps (CUDA events; the host clock on CPU),
  ``tokens_per_s``. A window is ``--steps`` steps; another follows while the two halves of the last
  one have medians more than ``STEADY_TOLERANCE`` apart (a warm-up transient or drift still in it),
  up to ``MAX_WINDOWS``. ``step_ms_all``: every timed step; ``timed_windows``; ``steady``: whether the
  last window passed (the table says when it did not);
- ``mfu_measured`` / ``mfu_datasheet``: FLOPs/token (``spec.derive.flops_per_token``) x tokens/s
  over the bf16 matmul peak measured in this run (an 8192^3 bf16 matmul) / the datasheet peak;
- ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` over the way (weights, grads and AdamW
  state included; the CPU figure is the process's peak RSS, which never goes down);
- ``first_step_s`` and ``compile_cold_s`` = first step - median step (the cold compile, with an
  empty Inductor cache when the run starts with one); ``compile_warm_s``: the same after
  ``torch._dynamo.reset()`` with the FX-graph and AOT caches warm (``--warm-compile`` ways);
- ``loss_step1``: the loss of the first step (before any update): every way starts from the same
  weights on the same batch, so these agree up to bf16 rounding; ``loss_last``: the loss of step
  warmup + steps (the first window's last), the same step whatever windows followed;
- with ``--profile DIR``: a per-kernel-group table (ms per step) in the JSON and in
  ``DIR/kernels.md``, and a gzipped Chrome trace per way in ``--trace-ways``; on CUDA each traced way
  also gets where its GPU sat idle in the step, and why (``profile.gaps``, ``runtime.bench.gaps``).

Ways run in ``RUN_ORDER`` (the ways the targets compare first), each isolated: an error is recorded
in its entry and the next way runs. ``--time-budget S`` skips ways that would start after S seconds.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import importlib.util
import json
import math
import platform
import re
import shutil
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from compiler.pipeline import compute_dtype
from runtime.bench.gaps import gap_table, idle_gaps
from runtime.build import cuda_graphs
from runtime.device import device_peak, memory_gib, pick_device
from spec.derive import flops_per_token
from spec.errors import GrapefxError
from spec.schema import Spec

__all__ = ["WAYS", "RUN_ORDER", "run_bench", "kernel_group", "format_table", "matmul_peak"]

WAYS = ("eager", "compile", "flex", "reference", "grapefx")
RUN_ORDER = ("grapefx", "reference", "flex", "eager", "compile")   # the targets first, the slow compile last
COMPILED = ("compile", "flex", "reference", "grapefx")

# kernel name -> group, first match wins (BENCHMARKS.md's table, plus our own Triton kernels)
KERNEL_GROUPS: tuple[tuple[str, str], ...] = (
    ("attention", r"^_fwd$|^_bwd_(dkdv|dq|delta)$|flex|attention|fmha|flash|triton_tem"),
    ("optimizer", r"adam|Adam|multi_tensor_apply"),
    ("grapefx Triton (SwiGLU / expert combine / loss)", r"_swiglu_(fwd|bwd)_kernel|_gather_sum_kernel|_ce_rows_kernel"),
    ("grouped GEMM", r"[Gg]rouped|GroupProblemShape|KernelPtrArray|^_(rows|weight)_kernel$"),
    ("dense GEMM", r"gemm|Gemm|nvjet|xmma|cutlass|cublas|splitKreduce|Kernel2"),
    ("weight/dtype copies", r"^triton_\w+_fused__to_copy_\d+$|^(?!triton_).*([Cc]opy|CatArray)"),
    ("Inductor elementwise/reduction", r"^triton_"),
    ("dispatch: sort / gather / scatter", r"[Ss]ort|radix|index|[Gg]ather|[Ss]catter|searchsorted|histc|cub::"),
    ("aten elementwise/reduction", r"elementwise|reduce|[Rr]eduction|vectorized|unrolled|softmax|norm"),
)


def kernel_group(name: str) -> str:
    """The group a GPU kernel's name falls in (``KERNEL_GROUPS``), else ``other``."""
    for group, pattern in KERNEL_GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


# ----------------------------------------------------------------------------- the machine
def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": "cpu",
           "triton": None, "cuda": torch.version.cuda}
    if importlib.util.find_spec("triton") is not None:
        import triton
        env["triton"] = triton.__version__
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
    return env


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """bf16 TFLOP/s of an n^3 matmul on random data (median of ``reps`` timed after 3 warm-ups)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n**3 / statistics.median(times) / 1e12


# ----------------------------------------------------------------------------- building the ways
@contextlib.contextmanager
def _same_initial_weights(cache: dict):
    """Every model built inside draws its initial tensors once: later builds reuse them (cloned).

    Initialisation is seeded per parameter name (``compiler.lower.init``), so this changes no value;
    it only saves re-drawing half a billion normals for each way.
    """
    from compiler.lower.init import Initializer

    draw = Initializer.normal

    def normal(self, name, shape, *, output=False):
        key = (self.seed, name, tuple(shape), output)
        if key not in cache:
            cache[key] = draw(self, name, shape, output=output)
        return cache[key].clone()

    Initializer.normal = normal
    try:
        yield
    finally:
        Initializer.normal = draw


@dataclass
class Built:
    model: torch.nn.Module
    forward: Callable            # (tokens, targets) -> loss
    notes: dict


class Bench:
    """The state shared by the ways of one run: spec, device, batches, the initial weights."""

    def __init__(self, spec: Spec, device: torch.device, seed: int = 0):
        self.spec, self.device = spec, device
        self.init_cache: dict = {}
        self.initial_state: dict[str, torch.Tensor] | None = None
        B, T, V = spec.train.micro_batch, spec.data.seq_len, spec.model.vocab_size
        g = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randint(0, V, (B, T), generator=g).to(device),
                         torch.randint(0, V, (B, T), generator=g).to(device)) for _ in range(2)]

    def _ours(self, *, compile: bool, passes: Sequence[str] | None, flex: bool = False) -> Built:
        from compiler.pipeline import build_model, checkpoint_blocks, compile_model

        with _same_initial_weights(self.init_cache):
            model, report = build_model(self.spec, self.device, compile=False, passes=passes)
        self._keep_initial(model)
        notes = {"passes": {n: e.matches for n, e in report.passes.entries.items() if e.enabled},
                 "graphs": [f"{g.label}: layers {g.layers_1based}" for g in report.groups]}
        if "linear_cross_entropy" in report.passes.order:
            notes["head_fused"] = report.passes.entries["linear_cross_entropy"].matches
        if flex:
            from runtime.bench import flex as flex_mod
            if self.device.type != "cuda":
                raise GrapefxError("the flex way needs CUDA (FlexAttention has no CPU backward)")
            notes["flex_layers"] = flex_mod.use_flex(model)
            flex_mod.prepare(model, self.spec.data.seq_len, self.device)
        if compile:
            compile_model(model, options=dict(self.spec.compile.inductor_options))
            if self.spec.compile.activation_checkpointing:
                checkpoint_blocks(model)
        return Built(model, lambda x, y: model(x, y).loss, notes)

    def _keep_initial(self, model: torch.nn.Module) -> None:
        if self.initial_state is None:
            self.initial_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def _reference(self) -> Built:
        from compiler.lower import lower
        from runtime.bench.reference_model import ReferenceModel

        if self.initial_state is None:
            with _same_initial_weights(self.init_cache):
                self._keep_initial(lower(self.spec))
        cuda = self.device.type == "cuda"
        dt = torch.bfloat16 if compute_dtype(self.spec, self.device) == "bf16" else torch.float32
        model = ReferenceModel.from_state_dict(self.spec, self.initial_state,
                                               attention="flex" if cuda else "dense", dtype=dt)
        model.to(self.device)
        model.prepare(self.spec.data.seq_len)
        options = dict(self.spec.compile.inductor_options)
        if cuda:    # the spec's Inductor options too (e.g. CUDA graphs), as every compiled way
            model.compile_blocks(options=options or None)
        return Built(model, model, {"attention": model.attention, "compiled": cuda, "inductor_options": options})

    def build(self, way: str) -> Built:
        if way == "eager":
            return self._ours(compile=False, passes=[])
        if way == "compile":
            return self._ours(compile=True, passes=[])
        if way == "grapefx":
            return self._ours(compile=True, passes=None)
        if way == "flex":
            return self._ours(compile=True, passes=None, flex=True)
        if way == "reference":
            return self._reference()
        raise GrapefxError(f"unknown way {way!r}; choose from {', '.join(WAYS)}")

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        from runtime.optim import param_groups

        o = self.spec.train.optimizer
        kind = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(param_groups(model, self.spec), lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kind)


# ----------------------------------------------------------------------------- timing one way
STEADY_TOLERANCE = 0.03     # a window's halves may differ by 3% (steps of one steady run differ by about 1%)
MAX_WINDOWS = 3


def steady(times: Sequence[float], tol: float = STEADY_TOLERANCE) -> bool:
    """Whether the medians of the first and second half of a window of step times lie within ``tol`` of
    each other (relative to the smaller): no transient or drift left in the window."""
    h = len(times) // 2
    if h == 0:
        return True
    a, b = statistics.median(times[:h]), statistics.median(times[h:])
    return abs(a - b) <= tol * min(a, b)


def timed_windows(window: Callable[[], list[float]], max_windows: int = MAX_WINDOWS) -> list[list[float]]:
    """Windows of step times from ``window()`` (one call times one window), until one is ``steady`` or
    ``max_windows`` ran."""
    windows = [window()]
    while not steady(windows[-1]) and len(windows) < max_windows:
        windows.append(window())
    return windows


class _Timer:
    """Step times: CUDA events on CUDA (read after one sync at the end), the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.events: list = []
        self.host: list[float] = []

    @contextlib.contextmanager
    def step(self):
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            yield
            e.record()
            self.events.append((s, e))
        else:
            t = time.perf_counter()
            yield
            self.host.append(time.perf_counter() - t)

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self.events]
        return list(self.host)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(forward: Callable, opt: torch.optim.Optimizer, tokens, targets) -> torch.Tensor:
    # a new step for Inductor's CUDA graphs (``--set compile.inductor_options={triton.cudagraphs: true}``),
    # whose replays reuse output memory: the loss is copied out; without CUDA graphs this does nothing
    torch.compiler.cudagraph_mark_step_begin()
    loss = forward(tokens, targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach().clone()


def _profile(forward, opt, batches, device, steps: int, trace: Path | None) -> dict:
    """ms per step by kernel group, and the top kernels; optionally a gzipped Chrome trace, and on CUDA
    where the GPU sat idle in it (``gaps``)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            _train_step(forward, opt, *batches[i % len(batches)])
        _sync(device)
    groups: dict[str, float] = {}
    kernels: list[tuple[str, float, int]] = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if device.type != "cuda" or not us or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if getattr(evt, "is_user_annotation", False) or "#" in evt.key:   # a range on the GPU track, not a
            continue                                                       # kernel (Optimizer.step#AdamW.step)
        ms = us / 1e3 / steps
        groups[kernel_group(evt.key)] = groups.get(kernel_group(evt.key), 0.0) + ms
        kernels.append((evt.key, ms, evt.count // steps))
    kernels.sort(key=lambda k: -k[1])
    result = {"device_ms_per_step": sum(groups.values()),
              "groups_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
              "top_kernels": [{"name": n[:160], "ms_per_step": ms, "calls_per_step": c} for n, ms, c in kernels[:25]]}
    if trace is not None:
        raw = trace.with_suffix("")                                                   # DIR/trace_way.json
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if device.type == "cuda":
            result["gaps"] = idle_gaps(json.loads(raw.read_text()), steps)
        raw.unlink()
    return result


def run_way(bench: Bench, way: str, *, steps: int, warmup: int, warm_compile: bool, profile_steps: int,
            trace: Path | None) -> dict:
    """Build, step, time and measure one way (see the module docstring for the fields)."""
    device = bench.device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    built = bench.build(way)
    opt = bench.optimizer(built.model)
    _sync(device)
    rec: dict = {"status": "ok", "build_s": time.perf_counter() - t0, "notes": built.notes}
    batches = bench.batches

    t1 = time.perf_counter()
    loss1 = _train_step(built.forward, opt, *batches[0])
    _sync(device)
    rec["first_step_s"] = time.perf_counter() - t1
    rec["loss_step1"] = float(loss1)
    for i in range(max(0, warmup - 1)):
        _train_step(built.forward, opt, *batches[(i + 1) % len(batches)])
    window_losses: list = []                       # the loss of each window's last step

    def window(forward=built.forward, opt=opt) -> list[float]:
        timer = _Timer(device)
        for i in range(len(window_losses) * steps, (len(window_losses) + 1) * steps):
            with timer.step():
                loss = _train_step(forward, opt, *batches[i % len(batches)])
        window_losses.append(loss)
        return timer.seconds()

    windows = timed_windows(window)
    losses = [float(v) for v in window_losses]     # one host read per window; losses[0]: step warmup + steps
    step_s = statistics.median(windows[-1])
    tokens = bench.spec.train.micro_batch * bench.spec.data.seq_len
    rec.update(step_ms=step_s * 1e3, step_ms_all=[t * 1e3 for w in windows for t in w], timed_windows=len(windows),
               steady=steady(windows[-1]), tokens_per_s=tokens / step_s,
               loss_last=losses[0], compile_cold_s=max(0.0, rec["first_step_s"] - step_s) if way in COMPILED else None,
               peak_memory_gib=memory_gib(device))
    bad = next((v for v in losses if not math.isfinite(v)), None)
    if bad is not None:
        rec["status"] = "error"
        rec["error"] = f"the loss became {bad}"
    if profile_steps:
        rec["profile"] = _profile(built.forward, opt, batches, device, profile_steps, trace)
    if warm_compile and way in COMPILED:
        torch._dynamo.reset()
        t2 = time.perf_counter()
        _train_step(built.forward, opt, *batches[0])
        _sync(device)
        rec["compile_warm_s"] = max(0.0, time.perf_counter() - t2 - step_s)
    del built, opt, window
    torch._dynamo.reset()
    gc.collect()
    return rec


# ----------------------------------------------------------------------------- the run
def run_bench(spec: Spec, out: str | Path, *, ways: Sequence[str] = RUN_ORDER, steps: int = 10, warmup: int = 3,
              profile_dir: str | Path | None = None, profile_steps: int = 3, trace_ways: Sequence[str] = (),
              warm_compile: Sequence[str] = ("grapefx", "reference"), time_budget: float | None = None,
              device: torch.device | None = None, command: Sequence[str] = (), say: Callable[[str], None] = print) -> dict:
    """Run the ``ways`` (in ``RUN_ORDER``), writing the JSON document to ``out`` after each; returns it."""
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        raise GrapefxError(f"--ways: unknown way(s) {', '.join(unknown)}; choose from {', '.join(WAYS)}")
    if steps < 1 or warmup < 1:
        raise GrapefxError("--steps and --warmup must be at least 1 (the first warm-up step is the compile)")
    start = time.perf_counter()
    device = device or pick_device()
    spec, graphs, graphs_off = cuda_graphs(spec, device, 1)     # the trainer's rule, so both run alike
    if graphs_off:
        say(f"note: {graphs_off}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pdir = Path(profile_dir) if profile_dir else None
    if pdir:
        pdir.mkdir(parents=True, exist_ok=True)
    fpt = flops_per_token(spec).per_token
    datasheet = device_peak(device)
    doc = {"spec": spec.name, "command": list(command), "env": environment(device),
           "shape": {"micro_batch": spec.train.micro_batch, "seq_len": spec.data.seq_len,
                     "tokens_per_step": spec.train.micro_batch * spec.data.seq_len},
           "flops_per_token": fpt,
           "peak": {"datasheet_tflops": datasheet.flops / 1e12 if datasheet.flops else None,
                    "datasheet": datasheet.note, "measured_bf16_matmul_tflops": None},
           "settings": {"steps": steps, "warmup": warmup, "order": [w for w in RUN_ORDER if w in ways],
                        "activation_checkpointing": spec.compile.activation_checkpointing,
                        "cuda_graphs": graphs,
                        "compute_dtype": compute_dtype(spec, device),
                        "optimizer": "AdamW fused" if device.type == "cuda" else "AdamW foreach",
                        "warm_compile": [w for w in warm_compile if w in ways],
                        "profile_steps": profile_steps if pdir else 0},
           "ways": {}, "ratios": {}}

    def write() -> None:
        out.write_text(json.dumps(doc, indent=1) + "\n")

    if device.type == "cuda":
        doc["peak"]["measured_bf16_matmul_tflops"] = matmul_peak(device)
        say(f"bf16 matmul peak (8192^3): {doc['peak']['measured_bf16_matmul_tflops']:.0f} TFLOP/s measured, "
            f"{doc['peak']['datasheet']}")
    write()
    bench = Bench(spec, device)
    for way in [w for w in RUN_ORDER if w in ways]:
        elapsed = time.perf_counter() - start
        if time_budget is not None and elapsed > time_budget:
            doc["ways"][way] = {"status": "skipped", "error": f"time budget: {elapsed:.0f} s spent of {time_budget:.0f} s"}
            say(f"{way}: skipped (time budget)")
            write()
            continue
        say(f"{way}: building and running ({elapsed:.0f} s so far)")
        try:
            rec = run_way(bench, way, steps=steps, warmup=warmup, warm_compile=way in warm_compile,
                          profile_steps=profile_steps if pdir else 0,
                          trace=pdir / f"trace_{way}.json.gz" if pdir and way in trace_ways else None)
        except Exception as e:  # noqa: BLE001 -- one way failing must not lose the others
            rec = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _mfu(rec, fpt, doc["peak"])
        doc["ways"][way] = rec
        _ratios(doc)
        write()
        if pdir:                                   # after each way, as the JSON: a run cut short keeps both
            (pdir / "kernels.md").write_text(kernel_tables(doc))
        say(_one_line(way, rec))
    doc["total_s"] = time.perf_counter() - start
    write()
    return doc


def _mfu(rec: dict, fpt: int, peak: dict) -> None:
    tps = rec.get("tokens_per_s")
    for key, tflops in (("mfu_measured", peak["measured_bf16_matmul_tflops"]), ("mfu_datasheet", peak["datasheet_tflops"])):
        rec[key] = fpt * tps / (tflops * 1e12) if tps and tflops else None


def _ratios(doc: dict) -> None:
    ok = {w: r for w, r in doc["ways"].items() if r.get("status") == "ok" and r.get("tokens_per_s")}
    r = {}
    for other in ("reference", "flex", "compile", "eager"):
        if "grapefx" in ok and other in ok:
            r[f"grapefx_vs_{other}_tokens_per_s"] = ok["grapefx"]["tokens_per_s"] / ok[other]["tokens_per_s"]
    if "grapefx" in ok and "reference" in ok and ok["reference"].get("peak_memory_gib"):
        r["grapefx_vs_reference_peak_memory"] = ok["grapefx"]["peak_memory_gib"] / ok["reference"]["peak_memory_gib"]
    doc["ratios"] = r


def _one_line(way: str, rec: dict) -> str:
    if rec.get("status") != "ok":
        return f"{way}: {rec.get('status')}: {rec.get('error')}"
    mfu = rec.get("mfu_measured")
    return (f"{way}: {rec['tokens_per_s']:,.0f} tok/s, {rec['step_ms']:.1f} ms/step"
            + (f", MFU {mfu:.1%} of measured peak" if mfu is not None else "")
            + f", peak {rec['peak_memory_gib']:.1f} GiB, loss@1 {rec['loss_step1']:.4f}"
            + (f", cold compile {rec['compile_cold_s']:.0f} s" if rec.get("compile_cold_s") is not None else ""))


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(doc: dict) -> str:
    """The short summary table (one row per way), plain text."""
    head = ("way", "status", "tok/s", "ms/step", "MFU meas", "MFU sheet", "peak GiB", "cold s", "warm s", "loss@1")
    rows = []
    for way in doc["settings"]["order"]:
        r = doc["ways"].get(way, {"status": "not run"})
        rows.append((way, r.get("status", "?"), _f(r.get("tokens_per_s"), ",.0f"), _f(r.get("step_ms"), ".1f"),
                     _f(r.get("mfu_measured"), ".1%"), _f(r.get("mfu_datasheet"), ".1%"),
                     _f(r.get("peak_memory_gib"), ".1f"), _f(r.get("compile_cold_s"), ".0f"),
                     _f(r.get("compile_warm_s"), ".0f"), _f(r.get("loss_step1"), ".4f")))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    peak = doc["peak"]
    out.append(f"spec {doc['spec']}: {doc['shape']['tokens_per_step']:,} tokens/step, "
               f"{doc['flops_per_token'] / 1e6:,.1f} MFLOP/token; peaks: measured "
               f"{_f(peak['measured_bf16_matmul_tflops'], '.0f')} / datasheet {_f(peak['datasheet_tflops'], '.0f')} TFLOP/s")
    for k, v in doc.get("ratios", {}).items():
        out.append(f"{k}: {v:.2f}")
    for way, r in doc["ways"].items():
        if r.get("steady") is False:
            out.append(f"{way}: step times still drifting after {r['timed_windows']} windows of "
                       f"{doc['settings']['steps']} steps (halves differ by more than {STEADY_TOLERANCE:.0%}); "
                       "its figures are the last window's median: run more --steps")
        if r.get("status") == "error":
            out.append(f"{way} failed: {r.get('error', '')[:300]}")
    return "\n".join(out)


def kernel_tables(doc: dict) -> str:
    """Markdown: per way, device ms per step by kernel group (BENCHMARKS.md's table), then its top kernels."""
    parts = [f"# Kernel groups, {doc['spec']} ({doc['env'].get('device')}, torch {doc['env'].get('torch')})\n"]
    for way, r in doc["ways"].items():
        p = r.get("profile")
        if not p:
            continue
        total = p["device_ms_per_step"] or 1.0
        parts.append(f"## {way}: {p['device_ms_per_step']:.1f} ms of kernels per step "
                     f"(step {r.get('step_ms', 0):.1f} ms)\n\n| kernel group | ms/step | share |\n|---|---|---|")
        parts += [f"| {g} | {ms:.2f} | {ms / total:.0%} |" for g, ms in p["groups_ms_per_step"].items()]
        parts.append("\n| top kernels | ms/step | calls/step |\n|---|---|---|")
        parts += [f"| `{k['name'][:90]}` | {k['ms_per_step']:.2f} | {k['calls_per_step']} |" for k in p["top_kernels"][:12]]
        if p.get("gaps"):
            parts += ["", gap_table(p["gaps"])]
        parts.append("")
    return "\n".join(parts) + "\n"
