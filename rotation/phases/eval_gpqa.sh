#!/usr/bin/env bash
# Phase 3: GPQA-diamond with one method's server (METHOD=oscar by default).
set -euo pipefail
# $1 = the model folder (rotation/<model>) whose vars.sh to use.
HERE=$(cd "${1:?usage: phases/eval_gpqa.sh rotation/<model>}" && pwd)
# shellcheck source=/dev/null
source "$HERE/vars.sh"
# shellcheck source=/dev/null
source "$HERE/../common.sh"
serve_and_eval gpqa
