#!/usr/bin/env bash
# Issue 9's GPU evidence, one device command on nvidia-h100-x2 (2 GPUs), under 10 minutes:
#   1. versions (python, torch, CUDA, NCCL, the GPUs and how they are linked); stops unless 2 GPUs
#   2. a synthetic local corpus (random words; the machine has no internet), byte tokenizer
#   3. examples/bench-small.yaml trained for STEPS steps with the same global batch (16 x 2048 tokens)
#        one   1 GPU, one process, 2 micro-batches of 8 accumulated per step
#        ddp   2 GPUs, `grapefx train --nproc 2` (torchrun), parallel.data=ddp, 1 micro-batch of 8 per GPU
#        fsdp  2 GPUs, the same with parallel.data=fsdp (FSDP2 fully_shard per block)
#      compiled (compile.enabled) when the pipeline compiles; if the first compiled run fails at once,
#      all three run eagerly with micro-batch 4 (global batch 8) instead, and the JSON says so
#   4. $OUT/multi_gpu.json and the table, last: tokens/s of the timed steps (all logging windows
#      after the first, which holds the compile), scaling efficiency = tok/s(2 GPUs) / (2 x tok/s(1 GPU)),
#      peak memory, and the loss at each logged step (the 2-GPU curves follow the 1-GPU one)
# Run from the repository root:  bash bench/run_multi_gpu.sh      (writes into $OUT, or ./gpu-out without it)
# Knobs (environment): STEPS, LOG_EVERY, LIMIT, RUNS (order of the 2-GPU runs), COMPILE=false (eager from the start), and for a dry run on a
# CPU machine: SPEC=examples/tiny.yaml MIN_GPUS=0 COMPILE=false (two gloo processes instead of two GPUs)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
# NVLink multicast stays off (NCCL NVLS, PyTorch symmetric-memory multicast, NVSHMEM NVLS): the host is shared
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-570}                      # seconds this script may take in all (the device allows 600)
STEPS=${STEPS:-40}
LOG_EVERY=${LOG_EVERY:-10}               # timing windows; the first holds the compile and is not counted
SPEC=${SPEC:-examples/bench-small.yaml}
MIN_GPUS=${MIN_GPUS:-2}
COMPILE=${COMPILE:-true}
WORK=$(mktemp -d)                        # corpus, data cache, run folders (checkpoints deleted after each run)
trap 'rm -rf "$WORK"' EXIT
# one fresh Inductor cache for the three runs: the 1-GPU compile is cold, the 2-GPU runs reuse its graphs
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}"
start=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - start) )); }

# ---------------------------------------------------------------- 1. versions
python3 - "$OUT/versions.json" "$MIN_GPUS" <<'EOF'
import json, subprocess, sys, torch
v = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
     "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
     "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
try:
    v["topology"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20).stdout
except (OSError, subprocess.SubprocessError) as e:
    v["topology"] = f"nvidia-smi topo -m failed: {e}"
json.dump(v, open(sys.argv[1], "w"), indent=1)
print("versions:", {k: v[k] for k in ("python", "torch", "cuda", "nccl", "gpus")})
print(v["topology"])
sys.exit(0 if len(v["gpus"]) >= int(sys.argv[2]) else 3)
EOF
if [ $? -ne 0 ]; then echo "run_multi_gpu: needs $MIN_GPUS GPUs (see the versions line)"; exit 3; fi

# ---------------------------------------------------------------- 2. corpus
python3 bench/synthetic_corpus.py "$WORK/corpus"

# ---------------------------------------------------------------- 3. the runs
MICRO=8 GLOBAL=16
declare -A STATUS WALL
train() {   # train NAME CAP_SECONDS EXTRA_ARGS...: one run, at most CAP s and never past the time left
  local name=$1 cap=$2; shift 2
  local budget=$(( $(left) - 25 )); [ "$budget" -gt "$cap" ] && budget=$cap
  if [ "$budget" -lt 60 ]; then echo "run_multi_gpu: no time left for $name"; STATUS[$name]=skipped; return; fi
  echo "== $name: up to ${budget}s (compile=$COMPILE micro=$MICRO global=$GLOBAL) =="
  local t0=$(date +%s)
  local sets=(--set data.tokenizer.kind=byte --set data.tokenizer.vocab_size=null
              --set "data.sources=[{path: $WORK/corpus}]" --set "data.cache_dir=$WORK/cache"
              --set train.micro_batch=$MICRO --set train.global_batch=$GLOBAL --set train.log_every=$LOG_EVERY
              --set train.eval_every=100000 --set train.eval_batches=1 --set train.checkpoint_every=100000
              --set train.keep_checkpoints=1 --set compile.enabled=$COMPILE
              --set "compile.inductor_options={}")   # as measured (2026-11-27): no CUDA graphs under DDP / FSDP2
  timeout --signal=TERM --kill-after=15 "$budget" python3 -m runtime.cli train "$SPEC" \
    --out "$WORK/runs/$name" --steps "$STEPS" "${sets[@]}" "$@" > "$OUT/$name.log" 2>&1
  STATUS[$name]=$?; WALL[$name]=$(( $(date +%s) - t0 ))
  tail -n 4 "$OUT/$name.log"
  cp "$WORK/runs/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  rm -rf "$WORK/runs/$name/checkpoints"          # ~6.6 GB each (weights + AdamW moments): free the disk
}

train one 250
if [ "$COMPILE" = true ] && [ "${STATUS[one]}" != 0 ] && [ "${WALL[one]:-0}" -lt 90 ]; then
  echo "run_multi_gpu: the compiled 1-GPU run failed after ${WALL[one]}s (log: $OUT/one.log); all runs eager instead"
  cp "$OUT/one.log" "$OUT/one.compiled-failed.log"
  COMPILE=false MICRO=4 GLOBAL=8
  rm -rf "$WORK/runs/one"
  train one 200
fi
for run in ${RUNS:-ddp fsdp}; do       # RUNS="fsdp ddp" measures FSDP2 first when time is short
  case $run in
    ddp) train ddp 170 --nproc 2 --set parallel.data=ddp ;;
    fsdp) train fsdp 170 --nproc 2 --set parallel.data=fsdp ;;
  esac
done

# ---------------------------------------------------------------- 4. results
python3 - "$OUT" "$STEPS" "$LOG_EVERY" "$COMPILE" "$MICRO" "$GLOBAL" "$SPEC" \
  "one=${STATUS[one]:-none}:${WALL[one]:-0}" "ddp=${STATUS[ddp]:-none}:${WALL[ddp]:-0}" \
  "fsdp=${STATUS[fsdp]:-none}:${WALL[fsdp]:-0}" <<'EOF'
import json, sys
from pathlib import Path
out, steps, log_every, compiled, micro, glob = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "true", int(sys.argv[5]), int(sys.argv[6])
spec_path = sys.argv[7]
seq_len = __import__("spec").load_spec(spec_path).data.seq_len
gpus = {"one": 1, "ddp": 2, "fsdp": 2}
runs = {}
for arg in sys.argv[8:]:
    name, rest = arg.split("=", 1)
    status, wall = rest.split(":")
    path = out / f"{name}.metrics.jsonl"
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []
    train = [r for r in lines if r["kind"] == "train"]
    timed, tokens, seconds, prev = [], 0, 0.0, None
    for r in train:                         # each line: one window of steps since the previous line
        if prev is not None:                # the first window holds the compile
            n = r["tokens"] - prev["tokens"]
            tokens, seconds = tokens + n, seconds + n / r["tokens_per_s"]
            timed.append(r["step"])
        prev = r
    runs[name] = {"gpus": gpus[name], "exit_status": status, "wall_s": int(wall),
                  "steps_done": train[-1]["step"] if train else 0, "timed_steps": f"{timed[0] - log_every + 1}..{timed[-1]}" if timed else None,
                  "tokens_per_s": tokens / seconds if seconds else None,
                  "tokens_per_s_per_gpu": tokens / seconds / gpus[name] if seconds else None,
                  "mfu": train[-1]["mfu"] if train else None, "memory_gib": max((r["memory_gib"] or 0) for r in train) if train else None,
                  "loss": {r["step"]: r["loss"] for r in train}, "grad_norm": {r["step"]: r["grad_norm"] for r in train}}
base = runs["one"]["tokens_per_s"]
for name in ("ddp", "fsdp"):
    tps = runs[name]["tokens_per_s"]
    runs[name]["scaling_efficiency"] = tps / (2 * base) if tps and base else None
    common = set(runs[name]["loss"]) & set(runs["one"]["loss"])
    runs[name]["max_loss_diff_vs_one"] = max((abs(runs[name]["loss"][s] - runs["one"]["loss"][s]) for s in common), default=None)
doc = {"spec": spec_path, "data": "synthetic random-word corpus, byte tokenizer",
       "seq_len": seq_len, "micro_batch": micro, "global_batch": glob, "tokens_per_step": glob * seq_len,
       "steps": steps, "log_every": log_every, "compiled": compiled,
       "scaling_efficiency": "tok/s(2 GPUs) / (2 x tok/s(1 GPU)), same global batch, timed windows after the first",
       "versions": json.loads((out / "versions.json").read_text()), "runs": runs}
(out / "multi_gpu.json").write_text(json.dumps(doc, indent=1))
fmt = lambda x, f: "—" if x is None else format(x, f)
gpu = f"{doc['versions']['gpus'][0]} x{len(doc['versions']['gpus'])}" if doc["versions"]["gpus"] else "CPU (gloo)"
print(f"\n== multi-GPU {spec_path}: {'compiled' if compiled else 'EAGER'}, global batch {glob} x {seq_len} tokens, "
      f"micro-batch {micro}, {steps} steps; {gpu}, torch {doc['versions']['torch']} ==")
print(f"{'run':<6}{'GPUs':>5}{'exit':>6}{'steps':>7}{'tok/s':>11}{'tok/s/GPU':>11}{'scaling':>9}{'mfu':>7}{'mem GiB':>9}{'loss@last':>11}{'|dloss|':>9}")
for name, r in runs.items():
    last = r["loss"][max(r["loss"])] if r["loss"] else None
    print(f"{name:<6}{r['gpus']:>5}{r['exit_status']:>6}{r['steps_done']:>7}{fmt(r['tokens_per_s'], ',.0f'):>11}"
          f"{fmt(r['tokens_per_s_per_gpu'], ',.0f'):>11}{fmt(r.get('scaling_efficiency'), '.1%'):>9}"
          f"{fmt(r['mfu'], '.1%'):>7}{fmt(r['memory_gib'], '.1f'):>9}{fmt(last, '.4f'):>11}{fmt(r.get('max_loss_diff_vs_one'), '.1e'):>9}")
print(f"written: {out / 'multi_gpu.json'}")
EOF
echo "run_multi_gpu: $(( $(date +%s) - start )) s in all"
