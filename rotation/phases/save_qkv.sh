#!/usr/bin/env bash
# Phase 1: stream calibration statistics (HF capture) into $STATS_DIR.
# MODEL_PATH must be a local snapshot of $MODEL (e.g. from `huggingface-cli download`).
set -euo pipefail
# $1 = the model folder (rotation/<model>) whose vars.sh to use.
HERE=$(cd "${1:?usage: phases/save_qkv.sh rotation/<model>}" && pwd)
# shellcheck source=/dev/null
source "$HERE/vars.sh"
# shellcheck source=/dev/null
source "$HERE/../common.sh"
require_hf_capture
require_calib_data
exec "$PYTHON" -m oscar_kv calibrate --model "$MODEL_PATH" --data "$CALIB_DATA" --gpqa \
  --max-tokens "$CALIB_TOKENS" --seq-len "$SEQ_LEN" --dtype bfloat16 --device cuda \
  --out "$STATS_DIR"
