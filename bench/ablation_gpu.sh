#!/usr/bin/env bash
# The GPU ablation (examples/ablation-gpu.yaml: GRAPE-A vs NoPE on the global layers, 3 seeds, eval to 4x)
# as one device command, from the repository root; the report comes back in $OUT.
#
# The GPU machine has no network, so the built-in corpus is prepared here and travels with the command:
#   GRAPEFX_CACHE=$PWD/.dev/grapefx-cache python -m runtime.cli data prepare examples/tiny.yaml --set data.valid_fraction=0.1
# (.dev/ is git-ignored: carry it, e.g. the device tool's carry [".dev/grapefx-cache"]; ~25 MB.) Then:
#   bash bench/ablation_gpu.sh              the real run (compiled, on the GPU)
#   bash bench/ablation_gpu.sh --dry-run    the same flow on a CPU: a model of d_model 64 and 4 layers, T = 64,
#                                           2 eager steps per run, 2 rows of 256 tokens per evaluation
# Extra arguments go to `grapefx ablate` (e.g. --set train.steps=300).
#
# It installs nothing: it needs torch >= 2.11 and pyyaml, numpy, matplotlib, rich, tokenizers,
# safetensors, networkx, tabulate (the GPU image has them all) and stops at once if one is missing.
# $OUT receives: report.md, report.json, the figures, ablate.log, versions.txt, and per run
# runs/<run>/{eval.json, metrics.jsonl, env.json, spec.resolved.yaml, passes.json, *.png} (no
# checkpoints), so `grapefx ablate examples/ablation-gpu.yaml --out DIR --report-only` rewrites the
# report from a copy of $OUT anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GRAPEFX_CACHE=${GRAPEFX_CACHE:-$PWD/.dev/grapefx-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)/inductor}
LIMIT=${LIMIT:-585}                      # seconds this script may take in all (the device allows 600)
start=$(date +%s)
MATRIX=examples/ablation-gpu.yaml
RUNS=${RUNS:-runs/ablation-gpu}

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi

python3 - <<'EOF' || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "yaml", "numpy", "matplotlib", "rich", "tokenizers", "safetensors", "networkx",
                       "tabulate") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"ablation_gpu: missing Python packages {', '.join(missing)}: carry their wheels and pip install them")
EOF
if ! ls "$GRAPEFX_CACHE"/data/*/manifest.json >/dev/null 2>&1; then
  echo "ablation_gpu: no prepared data under $GRAPEFX_CACHE/data; prepare it where there is network (see the top of $0) and carry it"
  exit 2
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  python3 -c 'import triton; print("triton", triton.__version__)' 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} | tee "$OUT/versions.txt"

if [ "$DRY" = 1 ]; then
  # a copy of the matrix with a CPU-sized evaluation (the matrix's eval settings are not spec keys, so not --set)
  mkdir -p "$RUNS"
  python3 - "$MATRIX" "$RUNS/dry-run-matrix.yaml" <<'EOF'
import sys, pathlib, yaml
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
m = yaml.safe_load(src.read_text())
m["name"] = m["name"] + "-dry-run"
m["baseline"] = str((src.parent / m["baseline"]).resolve())
m["eval"] = {**m["eval"], "batches": 1, "batch_size": 2}
dst.write_text(yaml.safe_dump(m, sort_keys=False))
EOF
  MATRIX="$RUNS/dry-run-matrix.yaml"
  set -- --set model.d_model=64 --set model.n_layers=4 --set moe.expert_hidden=64 --set data.seq_len=64 \
         --set train.steps=2 --set train.log_every=1 --set train.eval_every=2 --set train.eval_batches=1 \
         --set train.checkpoint_every=2 --set train.micro_batch=2 --set train.global_batch=2 \
         --set compile.enabled=false "$@"
fi

left=$(( LIMIT - ($(date +%s) - start) ))
# Ctrl-C (SIGINT) at the limit: the run in progress saves a checkpoint; the same command continues it
timeout --signal=INT --kill-after=20 $(( left - 30 )) \
  python3 -m runtime.cli ablate "$MATRIX" --out "$RUNS" "$@" 2>&1 | tee "$OUT/ablate.log"
status=${PIPESTATUS[0]}

for f in report.md report.json "$RUNS"/*.png; do
  [ -f "$RUNS/$(basename "$f")" ] && cp "$RUNS/$(basename "$f")" "$OUT/"
done
for run in "$RUNS"/runs/*/; do
  name=$(basename "$run")
  mkdir -p "$OUT/runs/$name"
  for f in eval.json metrics.jsonl env.json spec.resolved.yaml passes.json loss.png loss_by_position.png; do
    [ -f "$run/$f" ] && cp "$run/$f" "$OUT/runs/$name/"
  done
done
echo "ablation_gpu: grapefx ablate exited $status after $(( $(date +%s) - start )) s in all; results in $OUT"
exit "$status"
