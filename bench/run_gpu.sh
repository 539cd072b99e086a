#!/usr/bin/env bash
# The GPU run of issue 7's lean step and `grapefx bench` (one device command, under 10 minutes):
#   1. versions + CUDA correctness of the lean paths (bench/gpu_check.py; stops on torch < 2.11)
#   2. grapefx bench examples/bench-small.yaml, five ways, with a kernel-group profile
#   3. the summary table, last (read back from the JSON, so it prints even if the bench was cut short)
# Run from the repository root:  bash bench/run_gpu.sh        (writes into $OUT, or ./gpu-out without it)
# Extra arguments go to `grapefx bench`, e.g. --ways grapefx,reference  or  --set compile.activation_checkpointing=true
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT/profile"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# a fresh Inductor cache: the cold compile times are cold (the warm ones reuse it within the run)
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)/inductor}"
LIMIT=${LIMIT:-585}                      # seconds this script may take in all (the device allows 600)
start=$(date +%s)

python3 bench/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
if [ "$status" -eq 3 ]; then
  echo "run_gpu: stopping (see the version line above)"
  exit 3
fi
[ "$status" -ne 0 ] && echo "run_gpu: gpu_check FAILED some checks (details in $OUT/gpu_check.json); running the bench anyway"

left=$(( LIMIT - ($(date +%s) - start) ))
# no new way starts after (left - 150) s: a compiled way needs up to ~2 min; the timeout is the backstop
timeout --signal=INT --kill-after=10 $(( left - 15 )) \
  python3 -m runtime.cli bench examples/bench-small.yaml --out "$OUT/bench_small.json" \
    --profile "$OUT/profile" --time-budget $(( left - 150 )) "$@" 2>&1 | tee "$OUT/bench_small.log"

echo
echo "== gpu_check =="
grep -E "^(versions|PASS|FAIL|gpu_check)" "$OUT/gpu_check.log"
echo "== bench-small ($(( $(date +%s) - start )) s in all) =="
python3 - "$OUT/bench_small.json" <<'EOF'
import json, sys
from runtime.bench import format_table
try:
    doc = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no bench results: {e}")
print(format_table(doc))
EOF
