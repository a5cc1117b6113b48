#!/usr/bin/env bash
# Phase 3: GPQA-diamond with one method's server (METHOD=oscar by default).
# The phase itself is shared: rotation/phases/eval_gpqa.sh (this folder's vars.sh sets the model).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$HERE/../phases/eval_gpqa.sh" "$HERE" "$@"
