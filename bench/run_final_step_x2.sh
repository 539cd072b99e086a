#!/usr/bin/env bash
# Issue 7's closing GPU command on nvidia-h100-x2 (under 10 minutes), two halves in parallel:
#   GPU 0  bench/attention_check_and_bench.py      kernels: correctness (also compiled) + microbenchmark
#   GPU 1  grapefx bench bench-small, CUDA graphs   grapefx vs reference, both with Inductor's CUDA graphs
#          bench/attention_op_overhead.py           kernels per call: direct, eager op, compiled op
#          grapefx bench bench-medium               does the ~2B model train on one 80 GB card; vs reference
# JSON lands in $OUT; the tables print last. Run from the repository root: bash bench/run_final_step_x2.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
W=$(mktemp -d)
mkdir -p "$OUT" "$W/attention" "$W/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-560}
start=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - start) )); }
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader

CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=$W/inductor-attn \
  timeout --signal=INT --kill-after=10 $(( LIMIT - 20 )) python3 bench/attention_check_and_bench.py \
  "$OUT/attention.json" --deadline $(( LIMIT - 200 )) > "$W/attention/attention.log" 2>&1 &
attn=$!

(
  export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=$W/inductor
  bench() {   # bench SPEC NAME SECONDS ARGS...: one `grapefx bench`, cut off after SECONDS
    local spec=$1 name=$2 secs=$3; shift 3
    echo "== $name ($(( $(date +%s) - start )) s) =="
    timeout --signal=INT --kill-after=10 "$secs" python3 -m runtime.cli bench "$spec" \
      --out "$OUT/$name.json" "$@" 2>&1 | tail -n 12
  }
  bench examples/bench-small.yaml bench_small_cudagraphs 170 --ways grapefx,reference --steps 8 --warmup 3 \
    --warm-compile none --set "compile.inductor_options={triton.cudagraphs: true}"
  echo "== attention op overhead ($(( $(date +%s) - start )) s) =="
  timeout 90 python3 bench/attention_op_overhead.py "$OUT/op_overhead.json" 2>&1 | grep -v Warning | tail -n 60
  bench examples/bench-medium.yaml bench_medium $(( $(left) - 25 )) --ways grapefx,reference --steps 4 --warmup 2 \
    --warm-compile none
) > "$W/bench/bench.log" 2>&1 &
step=$!
wait $step; echo "step half: exit $? at $(( $(date +%s) - start )) s"
wait $attn; echo "attention half: exit $? at $(( $(date +%s) - start )) s"
tar -czf "$OUT/logs.tgz" --exclude='*.json.gz' -C "$W" attention bench
echo; echo "================ step half ================"; cat "$W/bench/bench.log"
echo; echo "================ attention (tail) ================"; tail -n 48 "$W/attention/attention.log"
echo "all: $(( $(date +%s) - start )) s"
