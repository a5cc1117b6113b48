#!/usr/bin/env bash
# Phase 3: LiveCodeBench v6 (32K generation) with one method's server.
set -euo pipefail
# $1 = the model folder (rotation/<model>) whose vars.sh to use.
HERE=$(cd "${1:?usage: phases/eval_lcb.sh rotation/<model>}" && pwd)
# shellcheck source=/dev/null
source "$HERE/vars.sh"
# shellcheck source=/dev/null
source "$HERE/../common.sh"
serve_and_eval lcb
