#!/usr/bin/env bash
# The GPU checks written after the last device session, in four back-to-back device calls
# (one H200; the machine is released after 30 s idle, so keep the calls back to back). Each
# call also stages one chunk of the SGLang wheels (../shared/tools/sglang_device_wheels.sh
# .carry/sgl). Results under $OUT.
#
#   call 1  carry .carry/sgl/c1   bash scripts/device_pending.sh kernels
#   call 2  carry .carry/sgl/c2   bash scripts/device_pending.sh decode
#   call 3  carry .carry/sgl/c3   bash scripts/device_pending.sh serving
#   call 4  carry .carry/tiny     bash scripts/device_pending.sh capture
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/pending}; mkdir -p "$OUT"
stage() {  # copy one wheel chunk to /tmp/stage (installed by the serving phase)
  mkdir -p /tmp/stage/ov && cp ".carry/sgl/$1"/*.whl /tmp/stage/ && \
    { cp ".carry/sgl/$1"/ov/* /tmp/stage/ov/ 2>/dev/null || true; }
}
case "${1:?phase: kernels | decode | serving | capture}" in
  kernels)
    stage c1
    # the one-split 128K accuracy (sub default, centered, plain codes) prints with -s
    PYTHONPATH=$PWD timeout 300 python3 -m pytest -q -s -m gpu tests/kernels -p no:cacheprovider \
      2>&1 | tee "$OUT/gpu_tests.log" | grep -E "one split|passed|failed|Error" ;
    PYTHONPATH=$PWD timeout 250 python3 benchmarks/bench_decode.py --context 4096 32768 131072 \
      --batch 1 8 32 --also-codes centered plain --no-flashinfer --out "$OUT/decode_grid" 2>&1 \
      | tee "$OUT/bench_decode_grid.log" | tail -25 ;;
  decode)
    stage c2
    # the plan rules at the sizes the session-4 sweep did not cover
    PYTHONPATH=$PWD timeout 200 python3 benchmarks/bench_decode.py --context 65536 \
      --batch 8 64 --sweep --no-check --no-flashinfer --out "$OUT/decode_sweep" 2>&1 \
      | tee "$OUT/bench_decode_sweep.log" | grep -E "best|^ *[0-9]+ +[0-9]+ \|"
    # the write kernel's fused rotation on tensor cores (3xTF32) vs the exact fp32 dot
    PYTHONPATH=$PWD timeout 90 python3 benchmarks/bench_write.py --also-precision tf32x3 tf32 \
      --out "$OUT/write" 2>&1 | tail -24 ;;
  serving)
    stage c3
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/stage/*.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ov /tmp/stage/ov/*.whl
    # with the warm-up before the timed decode runs (session 4's batch-48 figure lacked it)
    PYTHONPATH=/tmp/ov:/tmp/site:$PWD timeout 500 python3 benchmarks/bench_sglang_serving.py \
      --max-batch-int2 64 --log-level info --out "$OUT/serving" 2>&1 \
      | grep -v "it/s\]" > "$OUT/serving.log"; tail -40 "$OUT/serving.log" ;;
  capture)
    PYTHONPATH=/tmp/ov:/tmp/site:$PWD timeout 300 python3 scripts/sglang_capture_check.py \
      --model .carry/tiny --out "$OUT/capture" 2>&1 | tail -40
    # FlashInfer BF16 decode as a third baseline: flashinfer-python is in the staged wheels
    # (JIT-compiled with nvcc on first use; cut at 150 s if the build is slower)
    PYTHONPATH=/tmp/site:$PWD timeout 150 python3 benchmarks/bench_decode.py --context 32768 \
      131072 --batch 8 --out "$OUT/decode_flashinfer" 2>&1 | tail -8 ;;
  *) echo "unknown phase $1" >&2; exit 2 ;;
esac
