#!/usr/bin/env bash
# Phase 2: fit R_K/R_V (qqt_sst, r_h_pbr) and clip ratios from $STATS_DIR into $ROT_DIR.
# For the naive/hadamard baselines run with FIT_METHOD=identity or FIT_METHOD=hadamard.
# The phase itself is shared: rotation/phases/compute_rotation.sh (this folder's vars.sh sets the model).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$HERE/../phases/compute_rotation.sh" "$HERE" "$@"
