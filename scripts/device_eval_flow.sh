#!/usr/bin/env bash
# Issue #5 on the device: the benchmark flow against a real `sglang.launch_server
# --kv-cache-dtype int2` serving the reference model (GPQA fixture, 2 seeds, 4 workers), so the
# plugin entry point, the server lifecycle, transport, concurrency and result files run for real.
# The tiny code model answers nonsense (score 0 is expected); the point is the plumbing.
#   needs: sglang 0.5.17 wheels in /tmp/site + /tmp/ov (../shared/tools/sglang_device_wheels.sh),
#          MODEL (reference model dir) and ROT (a `python -m oscar_kv fit` output dir).
#   OUT=runs/eval_flow MODEL=.carry/tiny ROT=.carry/rot_c bash scripts/device_eval_flow.sh
set -euo pipefail
M=${MODEL:-.carry/tiny}; ROT=${ROT:-.carry/rot_c}; OUT=${OUT:-runs/eval_flow}
# a real install so that sglang finds the plugin's entry point (sglang.srt.plugins)
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/oscar .
export PYTHONPATH=/tmp/ov:/tmp/site:/tmp/oscar PYTHONUNBUFFERED=1
python3 -m oscar_kv.evals.bench.serve --model-path "$M" --method oscar --rot-dir "$ROT" \
  --k-clip 0.95 --v-clip 0.96 --task gpqa --data tests/evals_bench/fixtures/gpqa.csv \
  --limit 4 --n 2 --max-tokens 128 --workers 4 --out "$OUT/eval_oscar" --health-timeout 200 \
  --server-cmd "python3 -m sglang.launch_server --model-path $M --host 127.0.0.1 \
--kv-cache-dtype int2 --chat-template chatml --mem-fraction-static 0.3 --cuda-graph-max-bs 8"
cat "$OUT/eval_oscar/gpqa/metrics.json"
