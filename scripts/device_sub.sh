#!/usr/bin/env bash
# GPU check + timing of the default "sub" INT2 codes (one device call, ~4 min on a cold H200):
#   run: bash scripts/device_sub.sh   (no carry needed; results under $OUT)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-runs/sub}; mkdir -p "$OUT"
timeout 140 python3 -m pytest -q -s -m gpu tests/kernels/test_kernels_decode_sub.py \
  tests/kernels/test_kernels_decode.py -k "sub or graph or fewest or one_split or long_and_wide" \
  -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "sub codes|one split|passed|failed|Error" | head -30
timeout 110 python3 benchmarks/bench_decode.py --context 4096 32768 131072 --batch 1 8 32 \
  --also-codes centered --no-flashinfer --out "$OUT/decode_grid" 2>&1 | tee "$OUT/bench_decode_grid.log" | tail -22
