#!/usr/bin/env bash
# Phase 3: GPQA-diamond with one method's server (METHOD=oscar by default).
set -euo pipefail
# $1 = the model folder (rotation/<model>) whose vars.sh to use.
HERE=$(cd "${1:?usage: phases/eval_gpqa.sh rotation/<model>}" && pwd)
# shellcheck source=/dev/null
source "$HERE/vars.sh"
# shellcheck source=/dev/null
source "$HERE/../common.sh"
exec "$PYTHON" -m oscar_kv.evals.bench.serve --model-path "$MODEL" --method "$METHOD" \
  --rot-dir "$ROT_DIR" --tp "$TP_EVAL" --port "$PORT" --k-clip "$K_CLIP" --v-clip "$V_CLIP" \
  --absorb-v "$ABSORB_V" --group-size "$GROUP_SIZE" --reasoning-parser "$REASONING_PARSER" \
  --server-args "$SERVER_ARGS" --health-timeout "$HEALTH_TIMEOUT" --task gpqa \
  --n "$N_REPEATS" --workers "$WORKERS" --model-label "$(basename "$MODEL_DIR")" \
  --out "$RUN_DIR/_eval_$METHOD"
