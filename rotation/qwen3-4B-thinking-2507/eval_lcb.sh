#!/usr/bin/env bash
# Phase 3: LiveCodeBench v6 (32K generation) with one method's server.
# The phase itself is shared: rotation/phases/eval_lcb.sh (this folder's vars.sh sets the model).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$HERE/../phases/eval_lcb.sh" "$HERE" "$@"
