# Sourced by the bench/run_*_x2.sh device commands (two cards of one host): the shared set-up.
#   OUT (results, default ./gpu-out), W (scratch), LIMIT (seconds for the whole command), start,
#   left (seconds still left), the cards listed; grapefx_bench SPEC NAME SECONDS ARGS... runs one
#   `grapefx bench` into $OUT/NAME.json (cut off after SECONDS); attention_half starts
#   bench/attention_check_and_bench.py on card 0 in the background ($attn: its pid,
#   $W/attention/attention.log: its log), so that the caller's own work can use card 1.
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

attention_half() {
  CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=$W/inductor-attn \
    timeout --signal=INT --kill-after=10 $(( LIMIT - 20 )) python3 bench/attention_check_and_bench.py \
    "$OUT/attention.json" --deadline $(( LIMIT - 200 )) > "$W/attention/attention.log" 2>&1 &
  attn=$!
}

grapefx_bench() {
  local spec=$1 name=$2 secs=$3; shift 3
  echo "== $name ($(( $(date +%s) - start )) s) =="
  timeout --signal=INT --kill-after=10 "$secs" python3 -m runtime.cli bench "$spec" \
    --out "$OUT/$name.json" "$@" 2>&1 | tail -n 25
}
