#!/usr/bin/env bash
# Phase 1: stream calibration statistics into $STATS_DIR: the HF capture for models that fit on
# one GPU (TP_DUMP=1), else the capture inside a tensor-parallel SGLang server
# (python -m oscar_kv.capture.server_capture; needs `pip install oscar-kv[sglang]`).
# MODEL_PATH must be a local snapshot of $MODEL (e.g. from `huggingface-cli download`).
set -euo pipefail
# $1 = the model folder (rotation/<model>) whose vars.sh to use.
HERE=$(cd "${1:?usage: phases/save_qkv.sh rotation/<model>}" && pwd)
# shellcheck source=/dev/null
source "$HERE/vars.sh"
# shellcheck source=/dev/null
source "$HERE/../common.sh"
require_calib_data
if [[ "${TP_DUMP:-1}" != "1" && "${FORCE_HF_CAPTURE:-0}" != "1" ]]; then
  exec "$PYTHON" -m oscar_kv.capture.server_capture --model-path "$MODEL_PATH" \
    --data "$CALIB_DATA" --gpqa --max-tokens "$CALIB_TOKENS" --seq-len "$SEQ_LEN" \
    --tp "$TP_DUMP" --port "$PORT" --server-args "$SERVER_ARGS" \
    --health-timeout "$HEALTH_TIMEOUT" --out "$STATS_DIR"
fi
exec "$PYTHON" -m oscar_kv calibrate --model "$MODEL_PATH" --data "$CALIB_DATA" --gpqa \
  --max-tokens "$CALIB_TOKENS" --seq-len "$SEQ_LEN" --dtype bfloat16 --device cuda \
  --out "$STATS_DIR"
