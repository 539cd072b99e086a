#!/usr/bin/env bash
# Issue 7's single-GPU figures in ONE device command on a 2-GPU machine (nvidia-h100-x2), under
# 10 minutes, the two halves in parallel on separate cards (no shared GPU between timings):
#   GPU 0  bench/attention_check_and_bench.py   kernels: correctness (also under torch.compile) +
#                                               microbenchmark (direct, via the op, compiled op, flex, SDPA)
#   GPU 1  bench/gpu_check.py                   lean expert / loss paths (also compiled)
#          grapefx bench bench-small            grapefx vs reference, same process, profiled
#          grapefx bench, GRAPEFX_OPAQUE_KERNELS=1   the same grapefx way with the kernels behind
#                                               opaque custom ops (what the traced ops save)
#          grapefx bench, Inductor CUDA graphs   the grapefx way with triton.cudagraphs on
# JSON lands in $OUT; the tables print last. Run from the repository root: bash bench/run_step_x2.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
W=$(mktemp -d)
mkdir -p "$OUT" "$W/attention" "$W/bench/profile"
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
  python3 bench/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tail -n 12
  bench() {   # bench NAME SECONDS ARGS...: one `grapefx bench` of bench-small, cut off after SECONDS
    local name=$1 secs=$2; shift 2
    echo "== $name ($(( $(date +%s) - start )) s) =="
    timeout --signal=INT --kill-after=10 "$secs" python3 -m runtime.cli bench examples/bench-small.yaml \
      --out "$OUT/$name.json" --steps 8 --warmup 3 "$@" 2>&1 | tail -n 25
  }
  # without CUDA graphs (the spec turns them on since): what the step costs when the host launches everything
  bench bench_small 230 --ways grapefx,reference --profile "$W/bench/profile" --trace-ways none \
    --set "compile.inductor_options={}"
  GRAPEFX_OPAQUE_KERNELS=1 bench bench_small_opaque 100 --ways grapefx --warm-compile none \
    --set "compile.inductor_options={}"
  bench bench_small_cudagraphs $(( $(left) - 25 )) --ways grapefx --warm-compile none \
    --set "compile.inductor_options={triton.cudagraphs: true}"
) > "$W/bench/bench.log" 2>&1 &
step=$!
wait $step; echo "step half: exit $? at $(( $(date +%s) - start )) s"
wait $attn; echo "attention half: exit $? at $(( $(date +%s) - start )) s"
cp "$W/bench/profile/kernels.md" "$OUT/" 2>/dev/null
tar -czf "$OUT/logs.tgz" --exclude='*.json.gz' -C "$W" attention bench
echo; echo "================ step half ================"; cat "$W/bench/bench.log"
echo; echo "================ attention (tail) ================"; tail -n 50 "$W/attention/attention.log"
echo "all: $(( $(date +%s) - start )) s"
