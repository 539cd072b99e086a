#!/usr/bin/env bash
# Issue 7's closing GPU command on nvidia-h100-x2 (under 10 minutes), two halves in parallel:
#   GPU 0  bench/attention_check_and_bench.py      kernels: correctness (also compiled) + microbenchmark
#   GPU 1  grapefx bench bench-small, CUDA graphs   grapefx vs reference, both with Inductor's CUDA graphs
#          bench/attention_op_overhead.py           kernels per call: direct, eager op, compiled op
#          grapefx bench bench-medium               does the ~2B model train on one 80 GB card; vs reference
# JSON lands in $OUT; the tables print last. Run from the repository root: bash bench/run_final_step_x2.sh
source "$(dirname "$0")/x2_preamble.sh"
attention_half

(
  export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=$W/inductor
  grapefx_bench examples/bench-small.yaml bench_small_cudagraphs 170 --ways grapefx,reference --steps 8 --warmup 3 \
    --warm-compile none --set "compile.inductor_options={triton.cudagraphs: true}"
  echo "== attention op overhead ($(( $(date +%s) - start )) s) =="
  timeout 90 python3 bench/attention_op_overhead.py "$OUT/op_overhead.json" 2>&1 | grep -v Warning | tail -n 60
  grapefx_bench examples/bench-medium.yaml bench_medium $(( $(left) - 25 )) --ways grapefx,reference --steps 4 --warmup 2 \
    --warm-compile none
) > "$W/bench/bench.log" 2>&1 &
step=$!
wait $step; echo "step half: exit $? at $(( $(date +%s) - start )) s"
wait $attn; echo "attention half: exit $? at $(( $(date +%s) - start )) s"
tar -czf "$OUT/logs.tgz" --exclude='*.json.gz' -C "$W" attention bench
echo; echo "================ step half ================"; cat "$W/bench/bench.log"
echo; echo "================ attention (tail) ================"; tail -n 48 "$W/attention/attention.log"
echo "all: $(( $(date +%s) - start )) s"
