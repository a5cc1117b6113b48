# shellcheck shell=bash
# Shared defaults for rotation/<model>/*.sh; sourced after the model's vars.sh.
# Every value can be overridden from the environment (HF_HOME etc. are taken from it as-is).
# Outputs: rotation/<model>/<DATASET>/<TAG>/{stats,rotations,_eval_<method>}.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
DATASET=${DATASET:-GPQA}
GROUP_SIZE=${GROUP_SIZE:-128}
CALIB_TOKENS=${CALIB_TOKENS:-20000}
SEQ_LEN=${SEQ_LEN:-2048}
TAG=${TAG:-seq${CALIB_TOKENS}_len${SEQ_LEN}_group${GROUP_SIZE}}
RUN_DIR=${RUN_DIR:-$MODEL_DIR/$DATASET/$TAG}
STATS_DIR=${STATS_DIR:-$RUN_DIR/stats}
ROT_DIR=${ROT_DIR:-$RUN_DIR/rotations}
MODEL_PATH=${MODEL_PATH:-$MODEL}
PORT=${PORT:-31057}
N_REPEATS=${N_REPEATS:-5}
TASKS=${TASKS:-all}
METHOD=${METHOD:-oscar}
WORKERS=${WORKERS:-32}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-1200}
SERVER_ARGS=${SERVER_ARGS:-}
CALIB_DATA=${CALIB_DATA:-}
export RUN_DIR STATS_DIR ROT_DIR

# Phase 1 reads a local GPQA-diamond csv (the simple-evals file); fail early with a hint.
require_calib_data() {
  if [[ -z "$CALIB_DATA" || ! -f "$CALIB_DATA" ]]; then
    echo "error: set CALIB_DATA to the GPQA-diamond csv (simple-evals gpqa_diamond.csv)" >&2
    exit 2
  fi
}

# Start METHOD's server, wait for /health, run the tasks in $1, stop the server. The clip
# ratios come from the checkpoint (fitted, or vars.sh's K_CLIP/V_CLIP for fixed-clip fits);
# published files without ratios get vars.sh's K_CLIP/V_CLIP;
# SERVE_CLIP_ARGS="--k-clip 0.96 --v-clip 0.92" overrides them at serving time.
serve_and_eval() {
  local clip_args=()
  read -r -a clip_args <<< "${SERVE_CLIP_ARGS:-}"
  "$PYTHON" -m oscar_kv.evals.bench.serve --model-path "$MODEL_PATH" --method "$METHOD" \
    --rot-dir "$ROT_DIR" --tp "$TP_EVAL" --port "$PORT" ${clip_args[@]+"${clip_args[@]}"} \
    --clip-if-missing "$K_CLIP,$V_CLIP" \
    --absorb-v "$ABSORB_V" --group-size "$GROUP_SIZE" --reasoning-parser "$REASONING_PARSER" \
    --server-args "$SERVER_ARGS" --health-timeout "$HEALTH_TIMEOUT" --task "$1" \
    --n "$N_REPEATS" --workers "$WORKERS" --model-label "$(basename "$MODEL_DIR")" \
    --out "$RUN_DIR/_eval_$METHOD"
}
