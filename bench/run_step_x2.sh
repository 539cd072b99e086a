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
source "$(dirname "$0")/x2_preamble.sh"
mkdir -p "$W/bench/profile"
attention_half

(
  export CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=$W/inductor
  python3 bench/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tail -n 12
  # without CUDA graphs (the spec turns them on since): what the step costs when the host launches everything
  grapefx_bench examples/bench-small.yaml bench_small 230 --steps 8 --warmup 3 --ways grapefx,reference \
    --profile "$W/bench/profile" --trace-ways none \
    --set "compile.inductor_options={}"
  GRAPEFX_OPAQUE_KERNELS=1 grapefx_bench examples/bench-small.yaml bench_small_opaque 100 --steps 8 --warmup 3 \
    --ways grapefx --warm-compile none \
    --set "compile.inductor_options={}"
  grapefx_bench examples/bench-small.yaml bench_small_cudagraphs $(( $(left) - 25 )) --steps 8 --warmup 3 \
    --ways grapefx --warm-compile none \
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
