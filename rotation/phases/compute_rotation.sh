#!/usr/bin/env bash
# Phase 2: fit R_K/R_V (qqt_sst, r_h_pbr) and clip ratios from $STATS_DIR into $ROT_DIR.
# For the naive/hadamard baselines run with FIT_METHOD=identity or FIT_METHOD=hadamard.
set -euo pipefail
# $1 = the model folder (rotation/<model>) whose vars.sh to use.
HERE=$(cd "${1:?usage: phases/compute_rotation.sh rotation/<model>}" && pwd)
# shellcheck source=/dev/null
source "$HERE/vars.sh"
# shellcheck source=/dev/null
source "$HERE/../common.sh"
FIT_METHOD=${FIT_METHOD:-qqt_sst}
# Clips: with held-out calibration sequences (HF capture) the model-level selection on the
# model itself; without them (SGLang capture of TP models) the model's fixed K_CLIP/V_CLIP.
if [[ "$FIT_METHOD" == identity || "$FIT_METHOD" == hadamard ]]; then
  clip=(--no-fit-clip)  # the naive / hadamard baselines never clip
elif [[ -f "$STATS_DIR/holdout.pt" ]]; then
  clip=(--model "$MODEL_PATH" --dtype bfloat16 --device "${FIT_DEVICE:-cuda}")
else
  clip=(--clip-k "$K_CLIP" --clip-v "$V_CLIP")
fi
exec "$PYTHON" -m oscar_kv fit --stats "$STATS_DIR" --out "$ROT_DIR" --method "$FIT_METHOD" \
  --group-size "$GROUP_SIZE" "${clip[@]}"
