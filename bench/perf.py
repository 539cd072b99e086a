"""One GPU command for the single-card figures: kernels, `grapefx bench`, and `grapefx train` against it.

    python3 bench/perf.py [--out DIR] [--budget SECONDS] [--phases a,b,...] [--quick | --dry-run]

Run from the repository root with the prepared corpus beside it (the GPU machine has no network):
``GRAPEFX_CACHE`` names the cache folder that ``grapefx data prepare`` filled here (default
``.dev/grapefx-cache``). Phases, in this order (``--phases`` picks some), each a subprocess with
a time limit taken from what is left of ``--budget`` (default 530 s), so a slow phase costs only
itself and every finished phase's JSON is kept:

    attention    bench/attention.py: kernel correctness against a dense fp32 reference (two cases in
                 the projections' layout), the timing table (ours, FlexAttention, cuDNN / flash SDPA
                 causal without bias; D 64 and 128) and the tile sweep at D 64 (fastest launch shapes:
                 ``tiles`` in perf.json). On one card it runs first and writes the winners as a
                 tuned-tiles file, which the later phases then use ($GRAPEFX_ATTENTION_TILES; its
                 content is ``tuned_tiles`` in perf.json); with two or more cards it runs on the last
                 one alongside the other phases (on the first), and the benches keep the defaults.
    bench        grapefx bench examples/baseline.yaml --set train.global_batch=4, ways grapefx,
                 reference and flex, profiled by kernel group
    train        grapefx train examples/baseline.yaml --set train.global_batch=4: steady tokens/s
                 against the bench's grapefx way (one micro-batch per step both)
    accum        grapefx train examples/baseline.yaml as configured (global_batch 64 = 16 micro-batches
                 of 4 x 4096): tokens/s and MFU over optimizer steps 2.., and the optimizer's share of
                 the step (the optimizer's kernel time per step from the bench profile / step time)
    small        grapefx bench examples/bench-small.yaml (grapefx, reference)
    train-small  grapefx train examples/bench-small.yaml: steady tokens/s against that bench
    check        bench/experts_loss_check.py: the expert, loss and router kernels against their references

Writes into DIR (default $OUT, else ./perf-out), at most 8 files: perf.json (versions, each phase's
status, seconds and headline figures, the best tiles), perf.log (every phase's output), attention.json,
bench_baseline.json, bench_small.json, kernels.md (the kernel-group tables), train.json (every
training run's metrics lines), check.json. ``--report DIR`` prints a finished run's figures as Markdown. ``--quick`` runs every phase but attention on CPU on a tiny spec
(eager, a few steps): it checks the plumbing, not the speed. ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))          # spec (MFU of the training runs)
PHASES = ("attention", "bench", "train", "accum", "small", "train-small", "check")
BASELINE, SMALL, TINY = "examples/baseline.yaml", "examples/bench-small.yaml", "examples/tiny.yaml"
# a training run logs every LOG steps; steady state is the mean over the windows after the first
# (which holds the compile); seconds a phase may take at least, budget permitting (``phase_limit``)
PLAN = {"attention": 205, "bench": 170, "train": 80, "accum": 100, "small": 80, "train-small": 90, "check": 75}
TRAIN_STEPS = {"accum": (10, 1), "train": (200, 20), "train-small": (400, 20)}   # steps, log_every


def phase_limit(name: str, left: float, later: set[str]) -> float:
    """Seconds the phase ``name`` may take: its ``PLAN`` share, or more when the budget left (``left``)
    exceeds what the ``later`` phases are planned to take, so that time the earlier phases did not use
    goes to this one (a phase that compiles slowly on this machine is then not cut off while budget
    remains); never more than ``left``."""
    return min(max(PLAN[name], left - sum(PLAN[p] for p in later)), left)


class Run:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="grapefx-perf-"))
        self.start = time.time()
        self.log = open(self.out / "perf.log", "a")
        self.doc = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": sys.argv,
                    "quick": args.quick, "phases": {}, "train": {}}
        self.train_runs: dict = {}
        self.pending: set[str] = set()           # the phases still to run (main sets them)
        self.env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
                        PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                        NVSHMEM_DISABLE_NVLS="1", GRAPEFX_CACHE=os.environ.get("GRAPEFX_CACHE", str(ROOT / ".dev/grapefx-cache")),
                        TORCHINDUCTOR_CACHE_DIR=os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(self.work / "inductor")))
        self.gpus = 0 if args.quick else _gpu_count()

    def left(self) -> float:
        return self.args.budget - (time.time() - self.start)

    def say(self, msg: str) -> None:
        line = f"[perf {time.time() - self.start:6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.time() - self.start, 1)
        self.doc["train"] = self.train_runs
        _write_json(self.out / "perf.json", self.doc)
        _write_json(self.out / "train.json", self.train_runs)

    # ------------------------------------------------------------------ subprocesses
    def spawn(self, cmd: list[str], *, gpu: int | None = None, log: Path | None = None) -> subprocess.Popen:
        env = dict(self.env)
        if gpu is not None and not self.args.quick:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        self.say("$ " + " ".join(shlex.quote(c) for c in cmd))
        out = open(log, "w") if log else subprocess.PIPE
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def wait(self, p: subprocess.Popen, seconds: float, *, until=None) -> tuple[int | None, str]:
        """Wait for p, at most ``seconds``; ``until()`` True ends it early (the run gave what we need).
        Its output goes to perf.log as it comes; returns (exit status or None when cut off, the output)."""
        end, lines = time.time() + seconds, []

        def pump():                                   # the output, as it comes, into perf.log
            for line in p.stdout:
                lines.append(line)
                self.log.write(line)
                self.log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while p.poll() is None:
            if time.time() > end or (until is not None and until()):
                _stop(p)
                reader.join(5)
                return None, "".join(lines)
            time.sleep(0.5)
        reader.join(5)
        return p.returncode, "".join(lines)

    def phase(self, name: str, fn) -> None:
        self.pending.discard(name)
        limit = phase_limit(name, self.left() - 10, self.pending)
        rec = self.doc["phases"].setdefault(name, {})
        if limit < 20:
            rec.update(status="skipped", reason=f"budget: {self.left():.0f} s left")
            self.say(f"{name}: skipped (budget)")
            self.save()
            return
        t0 = time.time()
        self.say(f"== {name} (up to {limit:.0f} s)")
        try:
            rec.update(fn(limit) or {})
            rec.setdefault("status", "ok")
        except Exception as e:  # noqa: BLE001 -- one phase failing must not lose the others
            rec.update(status="error", error=f"{type(e).__name__}: {e}")
        rec["seconds"] = round(time.time() - t0, 1)
        self.say(f"{name}: {rec.get('status')} in {rec['seconds']} s")
        self.save()

    # ------------------------------------------------------------------ phases
    def grapefx_bench(self, spec: str, name: str, limit: float, extra: list[str]) -> dict:
        out, prof = self.out / f"{name}.json", self.work / f"profile_{name}"
        quick = ["--steps", "2", "--warmup", "1", "--ways", "eager",
                 "--set", "train.micro_batch=2", "--set", "data.seq_len=64"] if self.args.quick else []
        cmd = [sys.executable, "-m", "runtime.cli", "bench", self.spec(spec), "--out", str(out), "--profile", str(prof),
               "--time-budget", str(max(10, int(limit - 30)))] + (quick or extra)
        status, _ = self.wait(self.spawn(cmd, gpu=0), limit)
        rec = {"status": "ok" if status == 0 else f"exit {status}" if status is not None else "cut off"}
        if (prof / "kernels.md").is_file():
            with open(self.out / "kernels.md", "a") as f:
                f.write((prof / "kernels.md").read_text() + "\n")
        if out.is_file():
            doc = json.loads(out.read_text())
            rec["peak_tflops"] = doc["peak"]["measured_bf16_matmul_tflops"]
            rec["ways"] = {w: {k: r.get(k) for k in ("status", "tokens_per_s", "step_ms", "mfu_measured",
                                                       "peak_memory_gib", "compile_cold_s", "compile_warm_s",
                                                       "loss_step1", "steady", "error")}
                           for w, r in doc["ways"].items()}
            rec["ratios"] = doc.get("ratios", {})
            g = doc["ways"].get("grapefx", {})
            rec["optimizer_ms_per_step"] = (g.get("profile") or {}).get("groups_ms_per_step", {}).get("optimizer")
        return rec

    def spec(self, spec: str) -> str:
        return TINY if self.args.quick else spec

    def train(self, name: str, spec: str, limit: float, extra: list[str]) -> dict:
        steps, every = TRAIN_STEPS[name]
        if self.args.quick:
            steps, every = 4, 1
            extra = ["--set", "compile.enabled=false", "--set", "train.micro_batch=2", "--set", "train.global_batch=4",
                     "--set", "data.seq_len=64"]
        run = self.work / "runs" / name
        cmd = [sys.executable, "-m", "runtime.cli", "train", self.spec(spec), "--out", str(run), "--steps", str(steps),
               "--set", f"train.log_every={every}", "--set", "train.eval_every=1000000",
               "--set", "train.checkpoint_every=1000000", "--set", "train.eval_batches=1"] + extra
        metrics = run / "metrics.jsonl"

        def lines() -> list[dict]:
            if not metrics.is_file():
                return []
            return [json.loads(x) for x in metrics.read_text().splitlines() if x.strip().endswith("}")]

        # the last step's line is all we need: stop before the final evaluation and checkpoint
        done = lambda: any(r.get("kind") == "train" and r.get("step") == steps for r in lines())
        status, _ = self.wait(self.spawn(cmd, gpu=0), limit, until=done)
        train = [r for r in lines() if r.get("kind") == "train"]
        self.train_runs[name] = {"command": cmd[2:], "lines": train}
        steady = train[1:] if len(train) > 1 else []
        tokens = sum(b["tokens"] - a["tokens"] for a, b in zip(train, train[1:]))
        seconds = sum((b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip(train, train[1:]))
        rec = {"status": "ok" if train and train[-1]["step"] == steps else
               (f"exit {status}" if status is not None else "cut off"),
               "steps_logged": [r["step"] for r in train], "steady_from_step": steady[0]["step"] if steady else None,
               "tokens_per_s": tokens / seconds if seconds else None,
               "peak_memory_gib": max((r.get("memory_gib") or 0 for r in train), default=None),
               "loss_last": train[-1]["loss"] if train else None}
        return rec

    def mfu(self, tps, bench_rec: dict | None, spec: str) -> float | None:
        peak = (bench_rec or {}).get("peak_tflops")
        if not (tps and peak):
            return None
        from spec import load_spec
        from spec.derive import flops_per_token
        return flops_per_token(load_spec(ROOT / spec)).per_token * tps / (peak * 1e12)


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
        return len([x for x in out.splitlines() if x.strip()])
    except (OSError, subprocess.SubprocessError):
        return 0


def _stop(p: subprocess.Popen) -> None:
    """End a phase's process group: SIGTERM, then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
            p.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _write_json(path: Path, doc) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def _tiles(attention: dict) -> dict:
    """The sweep's fastest launch shapes per case (``ours_best``), against the defaults' times."""
    out = {}
    for name, rec in attention.get("bench", {}).items():
        impl = rec.get("impl", {})
        best, ours = impl.get("ours_best"), impl.get("ours")
        if best:
            out[name] = {"best": best.get("config"), "literal": best.get("literal"),
                         "best_fwdbwd_ms": best.get("fwdbwd_ms"), "default": (ours or {}).get("config"),
                         "default_fwdbwd_ms": (ours or {}).get("fwdbwd_ms")}
    return out


def _attention_summary(attention: dict) -> dict:
    rows = {}
    for name, rec in attention.get("bench", {}).items():
        impl = rec.get("impl", {})
        rows[name] = {k: impl.get(k, {}).get("fwdbwd_ms") for k in
                      ("ours", "ours_best", "ours_compiled", "flex", "sdpa_cudnn_causal", "sdpa_flash_causal")}
    checks = attention.get("correctness", [])
    return {"fwdbwd_ms": rows, "correctness": f"{sum(1 for c in checks if c.get('passed'))}/{len(checks)} passed",
            "failed": [c.get("case") for c in checks if not c.get("passed")]}


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def report(doc: dict) -> str:
    """perf.json as Markdown: the benches' ways, the training runs, the attention table."""
    env, ph = doc.get("env", {}), doc.get("phases", {})
    out = [f"{env.get('device')}, torch {env.get('torch')}, Triton {env.get('triton')}, {doc.get('started')}", ""]
    for name in ("bench", "small"):
        rec = ph.get(name) or {}
        if not rec.get("ways"):
            continue
        out += [f"`{name}` (peak {_f(rec.get('peak_tflops'), '.0f')} TFLOP/s): ratios "
                + ", ".join(f"{k} {v:.2f}" for k, v in rec.get("ratios", {}).items()), "",
                "| way | tok/s | ms/step | MFU | peak GiB | cold s | warm s | loss@1 |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {w} | {_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('step_ms'), '.1f')}"
                f"{' (never steady)' if r.get('steady') is False else ''} | "
                f"{_f(r.get('mfu_measured'), '.1%')} | {_f(r.get('peak_memory_gib'), '.1f')} | "
                f"{_f(r.get('compile_cold_s'), '.0f')} | {_f(r.get('compile_warm_s'), '.0f')} | {_f(r.get('loss_step1'), '.4f')} |"
                for w, r in rec["ways"].items()]
        out.append("")
    out += ["| training run | status | steady tok/s | MFU | vs bench | peak GiB | optimizer share |", "|---|---|---|---|---|---|---|"]
    for name in ("accum", "train", "train-small"):
        r = ph.get(name) or {}
        out.append(f"| {name} | {r.get('status', 'not run')} | {_f(r.get('tokens_per_s'), ',.0f')} | "
                   f"{_f(r.get('mfu_measured'), '.1%')} | {_f(r.get('train_over_bench'), '.1%')} | "
                   f"{_f(r.get('peak_memory_gib'), '.1f')} | {_f(r.get('optimizer_share'), '.1%')} |")
    att = ph.get("attention") or {}
    if att.get("fwdbwd_ms"):
        keys = ("ours", "ours_best", "ours_compiled", "flex", "sdpa_cudnn_causal", "sdpa_flash_causal")
        out += ["", f"attention fwd+bwd ms ({att.get('correctness')})", "",
                "| case | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        out += [f"| {case} | " + " | ".join(_f(row.get(k), ".3f") for k in keys) + " |"
                for case, row in att["fwdbwd_ms"].items()]
    for case, t in (doc.get("tiles") or {}).items():
        out.append(f"- tiles {case}: best {t.get('best')} {_f(t.get('best_fwdbwd_ms'), '.3f')} ms "
                   f"(default {_f(t.get('default_fwdbwd_ms'), '.3f')} ms)")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "perf-out"))
    ap.add_argument("--budget", type=float, default=530.0, help="seconds for the whole command (default 530)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, from {', '.join(PHASES)}")
    ap.add_argument("--quick", action="store_true", help="CPU plumbing check on examples/tiny.yaml (no attention)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--report", metavar="DIR", help="print DIR/perf.json's figures as Markdown tables and exit")
    args = ap.parse_args()
    if args.report:
        print(report(json.loads((Path(args.report) / "perf.json").read_text())))
        return 0
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        ap.error(f"--phases: unknown {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if args.quick and "attention" in phases:
        phases.remove("attention")                   # the kernels need CUDA
    if args.dry_run:
        for p in PHASES:
            if p in phases:
                print(f"{p:12s} {PLAN[p]} s planned (more if the earlier phases leave time)")
        print(f"budget {args.budget:.0f} s; out {args.out}")
        return 0
    r = Run(args)
    r.pending = set(phases) - {"attention"}          # the attention phase has its own limits below
    r.say(f"root {ROOT}; {r.gpus} GPU(s); GRAPEFX_CACHE={r.env['GRAPEFX_CACHE']}; budget {args.budget:.0f} s")
    versions = subprocess.run([sys.executable, "-c", "import json, torch; from runtime.bench import environment; "
                               "print(json.dumps(environment(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))))"],
                              cwd=ROOT, env=r.env, capture_output=True, text=True, timeout=120)
    r.doc["env"] = json.loads(versions.stdout) if versions.returncode == 0 else {"error": versions.stderr[-1000:]}
    r.say(f"versions: {r.doc['env']}")
    r.save()

    # attention: on its own card alongside the rest when there are two; on one card first, and the
    # later phases run with the launch shapes its sweep found fastest (the tuned-tiles file)
    attn_log, tiles = r.work / "attention.log", r.work / "tiles.json"

    def start_attention(gpu: int, limit: float, deadline: float) -> tuple[subprocess.Popen, float]:
        cmd = [sys.executable, "bench/attention.py", str(r.out / "attention.json"), "--deadline", str(int(deadline)),
               "--sweep-dims", "64", "--tiles-out", str(tiles)]
        r.doc["phases"]["attention"] = {"gpu": gpu, "limit_s": round(limit)}
        return r.spawn(cmd, gpu=gpu, log=attn_log), limit

    attn = None
    if "attention" in phases and r.gpus >= 2:
        limit = min(PLAN["attention"] + 230, r.left() - 15)
        attn = (*start_attention(r.gpus - 1, limit, limit - 100), time.time())
    elif "attention" in phases and r.gpus == 0:
        r.doc["phases"]["attention"] = {"status": "skipped", "reason": "no GPU"}
    elif "attention" in phases:
        limit = min(PLAN["attention"], r.left() - 15)
        p, limit = start_attention(0, limit, limit - 25)
        _finish_attention(r, p, attn_log, limit, time.time())
        if tiles.is_file():
            r.doc["tuned_tiles"] = json.loads(tiles.read_text())
            if r.doc["tuned_tiles"].get("configs"):
                r.env["GRAPEFX_ATTENTION_TILES"] = str(tiles)
                r.say(f"the following phases use the tuned tiles {r.doc['tuned_tiles']['configs']}")
        r.save()

    if "check" in phases and not args.quick:
        def check(s):
            status, out = r.wait(r.spawn([sys.executable, "bench/experts_loss_check.py", "--out",
                                          str(r.out / "check.json")], gpu=0), s)
            return {"status": "ok" if status == 0 else f"exit {status}" if status is not None else "cut off",
                    "summary": out.strip().splitlines()[-1] if out.strip() else None}
        r.phase("check", check)
    bench_rec: dict = {}
    if "bench" in phases:
        r.phase("bench", lambda s: bench_rec.update(r.grapefx_bench(
            BASELINE, "bench_baseline", s, ["--set", "train.global_batch=4", "--ways", "grapefx,reference,flex",
                                            "--steps", "8", "--warmup", "3", "--warm-compile", "grapefx"])) or bench_rec)
    if "accum" in phases:
        def accum(s):
            rec = r.train("accum", BASELINE, s, [])
            rec["mfu_measured"] = r.mfu(rec.get("tokens_per_s"), bench_rec, BASELINE)
            opt = bench_rec.get("optimizer_ms_per_step")
            if opt and rec.get("tokens_per_s"):
                step_ms = 64 * 4096 / rec["tokens_per_s"] * 1e3
                rec.update(step_ms=step_ms, optimizer_ms_per_step_from_bench_profile=opt, optimizer_share=opt / step_ms)
            return rec
        r.phase("accum", accum)

    def train_vs_bench(name: str, spec: str, extra: list[str], bench_rec: dict) -> None:
        """The phase ``name``: a training run, its tokens/s over the bench's grapefx way on ``spec``, and its MFU."""
        def train(s):
            rec = r.train(name, spec, s, extra)
            bench = (bench_rec.get("ways") or {}).get("grapefx", {}).get("tokens_per_s")
            rec["bench_grapefx_tokens_per_s"] = bench
            rec["train_over_bench"] = rec["tokens_per_s"] / bench if bench and rec.get("tokens_per_s") else None
            rec["mfu_measured"] = r.mfu(rec.get("tokens_per_s"), bench_rec, spec)
            return rec
        r.phase(name, train)

    if "train" in phases:
        train_vs_bench("train", BASELINE, ["--set", "train.global_batch=4"], bench_rec)
    small_rec: dict = {}
    if "small" in phases:
        r.phase("small", lambda s: small_rec.update(r.grapefx_bench(
            SMALL, "bench_small", s, ["--ways", "grapefx,reference", "--steps", "10", "--warmup", "3",
                                      "--warm-compile", "grapefx"])) or small_rec)
    if "train-small" in phases:
        train_vs_bench("train-small", SMALL, [], small_rec)

    if attn is not None:
        _finish_attention(r, attn[0], attn_log, attn[1], attn[2])
        if tiles.is_file():
            r.doc["tuned_tiles"] = json.loads(tiles.read_text())
    r.save()
    r.say("report (bench/perf.py --report DIR prints it again):\n" + report(r.doc))
    shutil.rmtree(r.work, ignore_errors=True)
    return 0


def _finish_attention(r: Run, p: subprocess.Popen, log: Path, limit: float, started: float) -> None:
    rec = r.doc["phases"]["attention"]
    try:
        p.wait(max(1.0, limit - (time.time() - started)))
        rec["status"] = "ok" if p.returncode == 0 else f"exit {p.returncode}"
    except subprocess.TimeoutExpired:
        _stop(p)
        rec["status"] = "cut off"
    rec["seconds"] = round(time.time() - started, 1)
    text = log.read_text() if log.is_file() else ""
    r.log.write("==== attention (its own log) ====\n" + text + "\n")
    r.say(f"attention: {rec['status']} in {rec['seconds']} s\n" + "\n".join(text.splitlines()[-45:]))
    path = r.out / "attention.json"
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            rec.update(_attention_summary(doc))
            r.doc["tiles"] = _tiles(doc)
        except ValueError as e:
            rec["json_error"] = str(e)
    r.save()


if __name__ == "__main__":
    sys.exit(main())
