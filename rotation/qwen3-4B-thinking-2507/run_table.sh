#!/usr/bin/env bash
# The whole table row for one method: METHOD=bf16|naive|hadamard|oscar bash run_table.sh
# Starts the server (int2 + OSCAR flags for INT2 methods), waits for /health, runs all five
# tasks N_REPEATS times, stops the server; then prints the table of $RUN_DIR.
# The phase itself is shared: rotation/phases/run_table.sh (this folder's vars.sh sets the model).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$HERE/../phases/run_table.sh" "$HERE" "$@"
