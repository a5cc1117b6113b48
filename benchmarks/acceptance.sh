#!/usr/bin/env bash
# Issue #2 acceptance on the reference model, in one call (GPU: ~3 min; CPU works, slowly):
# calibrate on the first 200k tokens of heldout_tokens.npy -> fit (default: model-level clip
# selection, K centering) -> eval 16 x 2048 and 16 x 4096 of the second half; then the
# reference recipe (fixed clips 0.96/0.92, no centering) and a few fixed-clip points with
# centering on the same statistics, for the ppl / copy-accuracy trade-off.
#   MODEL=.carry/tiny OUT=runs/acceptance bash benchmarks/acceptance.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
M=${MODEL:-.carry/tiny}; D=$M/heldout_tokens.npy; OUT=${OUT:-runs/acceptance}; W=${WORK:-/tmp/oscar-acc}
mkdir -p "$OUT"; rm -rf "$W"  # a stale run must never be reported as this one
quiet() { grep -v -E "Loading weights|it/s\]|tok/s\]"; }
ev() {  # ev ROT_DIR LEN NAME [methods]
  python3 -m oscar_kv eval --model "$M" --rotations "$1" --data "$D" --seq-len "$2" \
    --num-seqs 16 --methods "${4:-oscar}" --json "$OUT/$3.json" 2>&1 | quiet | grep "^| [a-z]"
}
{
  echo "## default: pipeline (calibrate 200k -> fit -> eval 16 x 2048)"
  python3 -m oscar_kv pipeline --model "$M" --data "$D" --max-tokens 200000 --seq-len 2048 \
    --holdout-seqs 2 --batch-size 8 --eval-seq-len 2048 --num-seqs 16 --work "$W" 2>&1 | quiet \
    || { echo "pipeline failed: nothing copied"; exit 1; }
  cp "$W/eval.json" "$OUT/default_2048.json"; cp "$W/rotations/fit_report.json" "$OUT/"
  echo "## default at 4096"; ev "$W/rotations" 4096 default_4096 bf16,naive,hadamard,oscar
  echo "## reference recipe: clips 0.96/0.92, no centering"
  python3 -m oscar_kv fit --stats "$W/stats" --out "$W/ref" --clip-k 0.96 --clip-v 0.92 \
    --no-center-k > /dev/null
  ev "$W/ref" 2048 ref_2048; ev "$W/ref" 4096 ref_4096
  for kv in "1.0 1.0" "0.97 0.96" "0.96 0.96" "0.96 0.92"; do
    set -- $kv; echo "## centered, fixed clips $1/$2"
    python3 -m oscar_kv fit --stats "$W/stats" --out "$W/c_$1_$2" --clip-k "$1" --clip-v "$2" \
      > /dev/null
    ev "$W/c_$1_$2" 2048 "centered_k$1_v$2_2048"
  done
} 2>&1 | tee "$OUT/acceptance.log"
