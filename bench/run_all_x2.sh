#!/usr/bin/env bash
# Every GPU figure of issues 7 and 9 in ONE device command on a 2-GPU machine (nvidia-h100-x2),
# under 10 minutes:
#   phase 1, in parallel, one GPU each (separate cards, so the timings do not share a GPU):
#     GPU 0  bench/attention_check_and_bench.py   attention kernels: correctness + microbenchmark
#     GPU 1  bench/run_gpu.sh                      lean-step checks + `grapefx bench` bench-small
#   phase 2, both GPUs: bench/multi_gpu.sh         1 GPU vs 2 GPUs (DDP, FSDP2) scaling
# All results land in $OUT/results.tgz plus the main JSON files; the tables print last.
# Run from the repository root:  bash bench/run_all_x2.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
W=$(mktemp -d)
mkdir -p "$OUT" "$W/attention" "$W/bench" "$W/multi"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
P1=${P1:-370}            # seconds for phase 1
P2=${P2:-215}            # seconds for phase 2
start=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader

CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=$W/inductor-attn \
  timeout --signal=INT --kill-after=10 $P1 python3 bench/attention_check_and_bench.py "$W/attention/attention.json" \
  --deadline $(( P1 - 150 )) > "$W/attention/attention.log" 2>&1 &
attn=$!
# the bench's Inductor cache is shared with phase 2, whose training runs reuse the block graphs
CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=$W/inductor OUT=$W/bench LIMIT=$P1 \
  bash bench/run_gpu.sh --steps 6 --warmup 2 --ways grapefx,reference,flex,compile,eager > "$W/bench/run_gpu.log" 2>&1 &
bench=$!
wait $attn; echo "attention script: exit $? at $(( $(date +%s) - start )) s"
wait $bench; echo "bench script: exit $? at $(( $(date +%s) - start )) s"

TORCHINDUCTOR_CACHE_DIR=$W/inductor OUT=$W/multi LIMIT=$P2 STEPS=${STEPS:-20} LOG_EVERY=5 \
  SPECS=examples/bench-small.yaml RUNS="one ddp fsdp" NGPU=2 bash bench/multi_gpu.sh > "$W/multi/run_multi_gpu.log" 2>&1
echo "multi-GPU script: exit $? at $(( $(date +%s) - start )) s"

cp "$W/attention/attention.json" "$W/bench/bench_small.json" "$W/bench/gpu_check.json" "$W/multi/multi_gpu.json" "$OUT/" 2>/dev/null
find "$W" -name 'trace_*' -size +4M -delete
tar -czf "$OUT/results.tgz" -C "$W" attention bench multi
echo; echo "================ attention (tail) ================"; tail -n 45 "$W/attention/attention.log"
echo; echo "================ bench-small (tail) ================"; tail -n 30 "$W/bench/run_gpu.log"
echo; echo "================ multi-GPU (tail) ================"; tail -n 12 "$W/multi/run_multi_gpu.log"
echo "all: $(( $(date +%s) - start )) s"
