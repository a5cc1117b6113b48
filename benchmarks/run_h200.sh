#!/usr/bin/env bash
# Everything this repo measures on one H200, in one device call (results under $OUT).
# Needs the reference model copied to .carry/tiny (see README, "Results").
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-runs/h200}; mkdir -p "$OUT"
M=${MODEL:-.carry/tiny}; D=$M/heldout_tokens.npy; W=${WORK:-/tmp/oscar-acceptance}
quiet() { grep -v -E "Loading weights|it/s\]"; }
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo "## pipeline (calibrate 200k tokens -> fit -> eval 16 x 2048)"
  python3 -m oscar_kv pipeline --model "$M" --data "$D" --max-tokens 200000 --seq-len 2048 \
    --holdout-seqs 2 --batch-size 8 --eval-seq-len 2048 --num-seqs 16 --work "$W" 2>&1 | quiet
  echo "## eval 16 x 4096 with the same rotations"
  python3 -m oscar_kv eval --model "$M" --rotations "$W/rotations" --data "$D" --seq-len 4096 \
    --num-seqs 16 --json "$W/eval4096.json" 2>&1 | quiet
  echo "## GPU vs CPU reference check input: 2 x 2048, no copy probes"
  python3 -m oscar_kv eval --model "$M" --rotations "$W/rotations" --data "$D" --seq-len 2048 \
    --num-seqs 2 --no-copy --methods bf16,naive,oscar --json "$W/eval_small_gpu.json" 2>&1 | quiet
  cp "$W/eval.json" "$OUT/eval2048.json"; cp "$W/eval4096.json" "$W/eval_small_gpu.json" "$OUT/"
  tar -C "$W" -czf "$OUT/rotations.tgz" rotations
  echo "## GPU tests (${GPU_TESTS:-tests/hf tests/cache})"
  timeout ${GPU_TESTS_TIMEOUT:-90} python3 -m pytest -q -m gpu ${GPU_TESTS:-tests/hf tests/cache} -p no:cacheprovider \
    2>&1 | tail -8
  echo "## decode benchmark"
  timeout 170 python3 benchmarks/bench_decode.py --context ${DECODE_CTX:-4096 32768 131072} \
    --batch 1 8 32 --out "$OUT/bench_decode.json" 2>&1
  echo "## write benchmark"
  timeout 60 python3 benchmarks/bench_write.py --out "$OUT/bench_write.json" 2>&1
  if [ -f benchmarks/bench_generate.py ]; then
    echo "## HF generate benchmark"
    timeout 120 python3 benchmarks/bench_generate.py ${GEN_ARGS:-} --out "$OUT/bench_generate.json" 2>&1
  fi
} 2>&1 | tee "$OUT/run.log"
