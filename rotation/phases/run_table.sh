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
serve_and_eval "$TASKS"
exec "$PYTHON" "$ROOT/scripts/results_table.py" "$RUN_DIR"
