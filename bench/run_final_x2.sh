#!/usr/bin/env bash
# Follow-up device command on nvidia-h100-x2 (under 6 minutes): where the attention op spends
# time beyond its kernels (GPU 1, ~1 min), then 1 GPU vs 2 GPUs with DDP and FSDP2 (both GPUs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
W=$(mktemp -d); mkdir -p "$OUT" "$W/multi"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
CUDA_VISIBLE_DEVICES=1 timeout 60 python3 bench/attention_op_overhead.py "$OUT/op_overhead.json" 2>&1 | tail -n 40
echo "op overhead: $(( $(date +%s) - start )) s"
OUT=$W/multi LIMIT=${P2:-285} SPECS=examples/bench-small.yaml RUNS="one fsdp ddp" NGPU=2 STEPS=20 LOG_EVERY=5 bash bench/multi_gpu.sh > "$W/multi/run_multi_gpu.log" 2>&1
cp "$W/multi/multi_gpu.json" "$OUT/" 2>/dev/null
tar -czf "$OUT/multi.tgz" -C "$W" multi
tail -n 14 "$W/multi/run_multi_gpu.log"
echo "all: $(( $(date +%s) - start )) s"
