#!/usr/bin/env bash
# Scaling on several GPUs of one host: DDP, FSDP2 (prefetch one block ahead, overlap) and expert
# parallelism E = 2, 4, 8, each against one GPU, on examples/bench-small.yaml and examples/baseline.yaml.
#
#   bash bench/multi_gpu.sh            from the repository root; results in $OUT (./gpu-out without it)
#
# For each spec in SPECS and each run in RUNS (the same global batch everywhere, so the loss curves
# agree and tokens/s compare):
#   one    1 GPU, one process, the micro-batches accumulated
#   ddp    N GPUs (`grapefx train --nproc N`), parallel.data=ddp
#   fsdp   N GPUs, parallel.data=fsdp (FSDP2 per block, next block's all-gather prefetched)
#   epE    N GPUs, parallel.expert=E, data ddp (skipped, with the reason, where E > N or E does not
#          divide the spec's experts)
#   overlap  N GPUs, FSDP2 and then E = 2 under torch.profiler (bench/comm_overlap.py): the share of
#          the communication kernels' time hidden behind compute kernels, and the profiler table
# Each run trains STEPS steps on a synthetic corpus (byte tokenizer; the machine has no internet) and is
# cut off after its share of LIMIT. $OUT/multi_gpu.json (merged with an earlier one: call the script
# once per spec when one call has too little time) and $OUT/multi_gpu.md hold, per run: tokens/s of
# the timed logging windows (all after the first, which holds the compile), per GPU, scaling
# efficiency = tok/s(N GPUs) / (N x tok/s(1 GPU)), peak memory, the largest loss difference to the
# 1-GPU run, and the exit status and wall time; the logs are $OUT/SPEC-RUN.log.
#
# Dry runs (check the plumbing, numbers meaningless): DRY=1 shrinks the model (4 layers, d_model 64,
# expert hidden 32, T = 128) and trains 4 steps. Without GPUs, or when a run needs more GPUs than there
# are, that run goes to CPU processes with gloo (CUDA hidden), so `DRY=1 bash bench/multi_gpu.sh` works
# on a CPU machine and on one GPU; the JSON says where each run ran.
# Knobs: SPECS, RUNS, NGPU (processes of the N-GPU runs; default all GPUs, 4 on CPU), STEPS, LOG_EVERY,
# LIMIT (seconds in all; the device allows 600 per command), COMPILE (true/false), DRY.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
# NVLink multicast stays off (NCCL NVLS, PyTorch symmetric-memory multicast, NVSHMEM NVLS): the host is shared
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DRY=${DRY:-0}
LIMIT=${LIMIT:-570}
SPECS=${SPECS:-examples/bench-small.yaml examples/baseline.yaml}
RUNS=${RUNS:-one ddp fsdp ep2 ep4 ep8 overlap}
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
NGPU=${NGPU:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 4)}
if [ "$DRY" = 1 ]; then STEPS=${STEPS:-4}; LOG_EVERY=${LOG_EVERY:-2}; COMPILE=${COMPILE:-false}
else STEPS=${STEPS:-30}; LOG_EVERY=${LOG_EVERY:-10}; COMPILE=${COMPILE:-true}; fi
WORK=$(mktemp -d)                        # corpus, data cache, run folders (checkpoints deleted after each run)
trap 'rm -rf "$WORK"' EXIT
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}"   # the 1-GPU compile warms the rest
start=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - start) )); }
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'gpus', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" | tee "$OUT/versions.txt"
nvidia-smi topo -m >> "$OUT/versions.txt" 2>/dev/null
python3 bench/synthetic_corpus.py "$WORK/corpus"

RESULTS="$OUT/multi_gpu.runs.jsonl"      # one line per run, read by the report at the end
runs_left() { local n=0; for s in $SPECS; do for r in $RUNS; do n=$((n + 1)); done; done; echo $n; }
todo=$(runs_left)

train() {   # train SPEC RUN PROCS EXPERT WHERE [ARGS...]: one run, its share of the time left
  local spec=$1 run=$2 procs=$3 expert=$4 where=$5; shift 5
  local name; name="$(basename "$spec" .yaml)-$run"
  local budget=$(( ($(left) - 30) / todo )); todo=$(( todo - 1 ))
  local experts micro global
  experts=$(python3 -c "from spec import load_spec; print(load_spec('$spec').moe.experts)")
  micro=$([ "$DRY" = 1 ] && echo 2 || python3 -c "from spec import load_spec; print(load_spec('$spec').train.micro_batch)")
  global=$(( micro * NGPU ))                                         # one micro-batch per GPU of the N-GPU runs
  local reason=""
  if [ "$expert" -gt 1 ] && { [ "$expert" -gt "$procs" ] || [ $(( experts % expert )) -ne 0 ] || [ $(( procs % expert )) -ne 0 ]; }; then
    reason="E = $expert does not fit $procs processes and $experts experts"
  elif [ "$budget" -lt 40 ]; then reason="no time left (${budget}s)"; fi
  if [ -n "$reason" ]; then
    echo "== $name: skipped: $reason"
    echo "{\"spec\": \"$spec\", \"run\": \"$run\", \"skipped\": \"$reason\"}" >> "$RESULTS"; return
  fi
  local sets=(--set data.tokenizer.kind=byte --set data.tokenizer.vocab_size=null --set model.vocab_size=257
              --set "data.sources=[{path: $WORK/corpus}]" --set "data.cache_dir=$WORK/cache"
              --set train.micro_batch=$micro --set train.global_batch=$global --set train.log_every=$LOG_EVERY
              --set train.eval_every=100000 --set train.eval_batches=1 --set train.checkpoint_every=100000
              --set train.keep_checkpoints=1 --set compile.enabled=$COMPILE --set "compile.inductor_options={}"
              --set parallel.expert=$expert)
  [ "$DRY" = 1 ] && sets+=(--set model.n_layers=4 --set model.d_model=64 --set moe.expert_hidden=32 --set data.seq_len=128)
  local env=()
  [ "$where" = cpu ] && env=(CUDA_VISIBLE_DEVICES=)
  [ "$procs" -gt 1 ] && sets+=(--nproc "$procs")
  echo "== $name: $procs process(es) on $where, E = $expert, up to ${budget}s =="
  local t0; t0=$(date +%s)
  env "${env[@]}" timeout --signal=TERM --kill-after=15 "$budget" python3 -m runtime.cli train "$spec" \
    --out "$WORK/runs/$name" --steps "$STEPS" "${sets[@]}" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  tail -n 3 "$OUT/$name.log"
  python3 - "$RESULTS" "$WORK/runs/$name/metrics.jsonl" "$spec" "$run" "$procs" "$expert" "$where" "$status" \
    "$(( $(date +%s) - t0 ))" "$micro" "$global" <<'EOF'
import json, sys
from pathlib import Path
results, metrics, spec, run, procs, expert, where, status, wall, micro, glob = sys.argv[1:]
lines = [json.loads(l) for l in Path(metrics).read_text().splitlines() if l.strip()] if Path(metrics).is_file() else []
train = [r for r in lines if r["kind"] == "train"]
tokens = seconds = 0.0
for prev, r in zip(train, train[1:]):          # each line: the window since the previous one; the first holds the compile
    n = r["tokens"] - prev["tokens"]
    tokens, seconds = tokens + n, seconds + n / r["tokens_per_s"]
row = {"spec": spec, "run": run, "processes": int(procs), "expert": int(expert), "where": where, "exit_status": int(status),
       "wall_s": int(wall), "micro_batch": int(micro), "global_batch": int(glob), "steps_done": train[-1]["step"] if train else 0,
       "tokens_per_s": tokens / seconds if seconds else None, "memory_gib": max((r["memory_gib"] or 0) for r in train) if train else None,
       "loss": {r["step"]: r["loss"] for r in train}}
with open(results, "a") as fh:
    fh.write(json.dumps(row) + "\n")
EOF
  rm -rf "$WORK/runs/$name/checkpoints"
}

profile() {   # profile SPEC NAME WHERE ARGS...: bench/comm_overlap.py on NGPU processes into $OUT/NAME.json
  local spec=$1 name=$2 where=$3; shift 3
  local budget=$(( ($(left) - 30) / (todo + 1) ))
  [ "$budget" -lt 40 ] && { echo "== $name: skipped: no time left"; return; }
  local micro env=()
  micro=$([ "$DRY" = 1 ] && echo 2 || python3 -c "from spec import load_spec; print(load_spec('$spec').train.micro_batch)")
  [ "$where" = cpu ] && env=(CUDA_VISIBLE_DEVICES=)
  local sets=(--set data.tokenizer.kind=byte --set data.tokenizer.vocab_size=null --set model.vocab_size=257
              --set "data.sources=[{path: $WORK/corpus}]" --set "data.cache_dir=$WORK/cache"
              --set train.micro_batch=$micro --set train.global_batch=$(( micro * NGPU ))
              --set compile.enabled=$COMPILE --set "compile.inductor_options={}")
  [ "$DRY" = 1 ] && sets+=(--set model.n_layers=4 --set model.d_model=64 --set moe.expert_hidden=32 --set data.seq_len=128)
  echo "== $name: profiled on $NGPU process(es) on $where, up to ${budget}s =="
  env "${env[@]}" timeout --signal=TERM --kill-after=15 "$budget" python3 -m torch.distributed.run --standalone \
    --nproc-per-node "$NGPU" bench/comm_overlap.py "$spec" "$OUT/$name.json" "${sets[@]}" "$@" > "$OUT/$name.log" 2>&1
  tail -n 1 "$OUT/$name.log"
}

for spec in $SPECS; do
  for run in $RUNS; do
    where=$([ "$GPUS" -ge "$([ "$run" = one ] && echo 1 || echo "$NGPU")" ] && echo gpu || echo cpu)
    if [ "$where" = cpu ] && [ "$DRY" != 1 ]; then
      echo "== $(basename "$spec" .yaml)-$run: skipped: needs GPUs (DRY=1 runs it on CPU processes)"; todo=$((todo - 1)); continue
    fi
    case $run in
      one)  train "$spec" one 1 1 "$where" ;;
      ddp)  train "$spec" ddp "$NGPU" 1 "$where" --set parallel.data=ddp ;;
      fsdp) train "$spec" fsdp "$NGPU" 1 "$where" --set parallel.data=fsdp ;;
      ep*)  train "$spec" "$run" "$NGPU" "${run#ep}" "$where" --set parallel.data=ddp ;;
      overlap) todo=$((todo - 1))
            profile "$spec" "$(basename "$spec" .yaml)-overlap-fsdp" "$where" --set parallel.data=fsdp
            profile "$spec" "$(basename "$spec" .yaml)-overlap-ep2" "$where" --set parallel.data=ddp --set parallel.expert=2 ;;
      *)    echo "multi_gpu: unknown run $run (one, ddp, fsdp, epE)"; exit 2 ;;
    esac
  done
done

# ---------------------------------------------------------------- report: JSON and markdown
python3 - "$OUT" "$RESULTS" "$STEPS" "$LOG_EVERY" "$COMPILE" "$DRY" <<'EOF'
import json, sys, torch
from pathlib import Path
out, results, steps, log_every, compiled, dry = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
rows = [json.loads(l) for l in results.read_text().splitlines() if l.strip()] if results.is_file() else []
latest = {(r["spec"], r["run"]): r for r in rows}          # a later call's run replaces an earlier one
for (spec, run), r in latest.items():
    one = latest.get((spec, "one"))
    base = one and one.get("tokens_per_s")
    if r.get("tokens_per_s"):
        r["tokens_per_s_per_gpu"] = r["tokens_per_s"] / r["processes"]
        r["scaling_efficiency"] = r["tokens_per_s"] / (r["processes"] * base) if base and run != "one" else None
    common = set(r.get("loss", {})) & set((one or {}).get("loss", {}))
    r["max_loss_diff_vs_one"] = max((abs(r["loss"][s] - one["loss"][s]) for s in common), default=None)
doc = {"what": "tokens/s of the timed logging windows (all after the first, which holds the compile); "
               "scaling_efficiency = tok/s(N GPUs) / (N x tok/s(1 GPU)), the same global batch",
       "data": "synthetic random-word corpus, byte tokenizer", "steps": int(steps), "log_every": int(log_every),
       "compiled": compiled == "true", "dry_run": dry == "1", "torch": torch.__version__,
       "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "runs": list(latest.values())}
(out / "multi_gpu.json").write_text(json.dumps(doc, indent=1))
fmt = lambda x, f: "—" if x is None else format(x, f)
where = f"{len(doc['gpus'])} x {doc['gpus'][0]}" if doc["gpus"] else "CPU processes, gloo"
md = [f"# Multi-GPU scaling ({'DRY RUN, ' if doc['dry_run'] else ''}{'compiled' if doc['compiled'] else 'eager'}, "
      f"torch {doc['torch']}, {where})", "",
      "| spec | run | procs | E | where | exit | tok/s | tok/s/GPU | scaling | mem GiB | max abs(loss - one) |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in doc["runs"]:
    if "skipped" in r:
        md.append(f"| {r['spec']} | {r['run']} | | | | skipped: {r['skipped']} | | | | | |")
        continue
    md.append(f"| {r['spec']} | {r['run']} | {r['processes']} | {r['expert']} | {r['where']} | {r['exit_status']} | "
              f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r.get('tokens_per_s_per_gpu'), ',.0f')} | "
              f"{fmt(r.get('scaling_efficiency'), '.1%')} | {fmt(r['memory_gib'], '.1f')} | {fmt(r['max_loss_diff_vs_one'], '.1e')} |")
profiled = sorted(out.glob("*-overlap-*.json"))
if profiled:
    md += ["", "| profiled run | ranks | parallel | comm ms | hidden behind compute |", "|---|---|---|---|---|"]
    for path in profiled:
        p = json.loads(path.read_text())
        md.append(f"| {path.stem} | {p['ranks']} | {p['parallel']} | {fmt(p.get('comm_ms'), '.1f')} | "
                  f"{fmt(p['overlap'], '.1%')} |")
    doc["profiled"] = {path.stem: {k: v for k, v in json.loads(path.read_text()).items() if k != "table"}
                       for path in profiled}
    (out / "multi_gpu.json").write_text(json.dumps(doc, indent=1))
(out / "multi_gpu.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
echo "multi_gpu: $(( $(date +%s) - start )) s in all; $OUT/multi_gpu.json, $OUT/multi_gpu.md"
