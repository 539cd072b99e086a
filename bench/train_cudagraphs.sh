#!/usr/bin/env bash
# Does `grapefx train` give the same run with Inductor's CUDA graphs, and how much faster? One device
# command on two cards (nvidia-h200-x2 or -h100-x2; under 10 minutes). bench-small is trained 40 steps
# on a synthetic corpus (byte tokenizer; validation at steps 20 and 40) once without CUDA graphs and
# once with --set compile.inductor_options={triton.cudagraphs: true}, at two batch layouts in parallel:
#   GPU 0  one micro-batch of 8 x 2048 per step
#   GPU 1  two accumulated micro-batches of 8 x 2048 per step (gradients leave CUDA-graph memory once a step)
# The loss at every logged step, the validation losses and tokens/s (windows after the first, which
# holds the compile) side by side in $OUT/train_cudagraphs_accum{1,2}.json; the table prints last.
# Run from the repository root: bash bench/train_cudagraphs.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
python3 bench/synthetic_corpus.py "$W/corpus"

train() {   # train NAME GLOBAL ARGS...: 40 steps of bench-small, metrics to $OUT/NAME.metrics.jsonl
  local name=$1 global=$2; shift 2
  echo "== $name ($(( $(date +%s) - start )) s) =="
  timeout --signal=TERM --kill-after=15 200 python3 -m runtime.cli train examples/bench-small.yaml \
    --out "$W/runs/$name" --steps 40 --set data.tokenizer.kind=byte --set data.tokenizer.vocab_size=null \
    --set "data.sources=[{path: $W/corpus}]" --set "data.cache_dir=$W/cache-$name" \
    --set train.micro_batch=8 --set train.global_batch=$global --set train.log_every=5 \
    --set train.eval_every=20 --set train.eval_batches=2 --set train.checkpoint_every=100000 \
    --set train.keep_checkpoints=1 "$@" > "$OUT/$name.log" 2>&1
  echo "exit $?"; tail -n 3 "$OUT/$name.log"
  cp "$W/runs/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  rm -rf "$W/runs/$name/checkpoints"
}
pair() {    # pair ACCUM: the plain and the CUDA-graph run, then their comparison
  local a=$1
  train plain_accum$a $(( 8 * a )) --set "compile.inductor_options={}"      # the spec turns them on
  train cudagraphs_accum$a $(( 8 * a )) --set "compile.inductor_options={triton.cudagraphs: true}"
  python3 - "$OUT" "$a" <<'PY'
import json, sys
from pathlib import Path
out, a = Path(sys.argv[1]), sys.argv[2]
def load(name):
    p = out / f"{name}_accum{a}.metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []
doc = {}
for name in ("plain", "cudagraphs"):
    rows = load(name)
    train = [r for r in rows if r["kind"] == "train"]
    tokens = sum(b["tokens"] - x["tokens"] for x, b in zip(train, train[1:]))
    seconds = sum((b["tokens"] - x["tokens"]) / b["tokens_per_s"] for x, b in zip(train, train[1:]))
    doc[name] = {"loss": {r["step"]: r["loss"] for r in train},
                 "val_loss": {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"},
                 "tokens_per_s": tokens / seconds if seconds else None,
                 "memory_gib": max((r["memory_gib"] or 0 for r in train), default=None)}
p, c = doc["plain"], doc["cudagraphs"]
common = sorted(set(p["loss"]) & set(c["loss"]))
doc["steps_compared"] = common
doc["max_abs_loss_diff"] = max((abs(p["loss"][s] - c["loss"][s]) for s in common), default=None)
doc["val_loss_diff"] = {s: abs(p["val_loss"][s] - c["val_loss"][s]) for s in set(p["val_loss"]) & set(c["val_loss"])}
doc["speedup"] = c["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] and c["tokens_per_s"] else None
(out / f"train_cudagraphs_accum{a}.json").write_text(json.dumps(doc, indent=1) + "\n")
for name in ("plain", "cudagraphs"):
    d = doc[name]
    print(f"accum {a} {name:10s} tok/s {d['tokens_per_s'] or 0:,.0f}  mem {d['memory_gib']} GiB  loss {d['loss']}  val {d['val_loss']}")
print(f"accum {a}: max |loss diff| {doc['max_abs_loss_diff']}  val diffs {doc['val_loss_diff']}  speedup {doc['speedup']}")
PY
}
CUDA_VISIBLE_DEVICES=0 TORCHINDUCTOR_CACHE_DIR=$W/inductor0 pair 1 > "$W/accum1.log" 2>&1 &
first=$!
CUDA_VISIBLE_DEVICES=1 TORCHINDUCTOR_CACHE_DIR=$W/inductor1 pair 2 > "$W/accum2.log" 2>&1
wait $first
cat "$W/accum1.log" "$W/accum2.log" 2>/dev/null
echo "all: $(( $(date +%s) - start )) s"
