#!/usr/bin/env bash
# Phase 1: stream calibration statistics (HF capture) into $STATS_DIR.
# MODEL_PATH must be a local snapshot of $MODEL (e.g. from `huggingface-cli download`).
# The phase itself is shared: rotation/phases/save_qkv.sh (this folder's vars.sh sets the model).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$HERE/../phases/save_qkv.sh" "$HERE" "$@"
