#!/usr/bin/env bash
# The whole table row for one method: METHOD=bf16|naive|hadamard|oscar bash run_table.sh
# Starts the server (int2 + OSCAR flags for INT2 methods), waits for /health, runs all five
# tasks N_REPEATS times, stops the server; then prints the table of $RUN_DIR.
set -euo pipefail
# $1 = the model folder (rotation/<model>) whose vars.sh to use.
HERE=$(cd "${1:?usage: phases/run_table.sh rotation/<model>}" && pwd)
# shellcheck source=/dev/null
source "$HERE/vars.sh"
# shellcheck source=/dev/null
source "$HERE/../common.sh"
"$PYTHON" -m oscar_kv.evals.bench.serve --model-path "$MODEL" --method "$METHOD" \
  --rot-dir "$ROT_DIR" --tp "$TP_EVAL" --port "$PORT" --k-clip "$K_CLIP" --v-clip "$V_CLIP" \
  --absorb-v "$ABSORB_V" --group-size "$GROUP_SIZE" --reasoning-parser "$REASONING_PARSER" \
  --server-args "$SERVER_ARGS" --health-timeout "$HEALTH_TIMEOUT" --task "$TASKS" \
  --n "$N_REPEATS" --workers "$WORKERS" --model-label "$(basename "$MODEL_DIR")" \
  --out "$RUN_DIR/_eval_$METHOD"
exec "$PYTHON" "$ROOT/scripts/results_table.py" "$RUN_DIR"
