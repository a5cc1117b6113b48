# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are read by the scripts that source this file
# MiniMaxAI/MiniMax-M2.7: block-FP8 weights: V absorption off (ABSORB_V=0), radix cache off.
# Settings from the reference (spec §8); override any of them from the environment.
MODEL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODEL=${MODEL:-MiniMaxAI/MiniMax-M2.7}
TP_DUMP=${TP_DUMP:-4}
TP_EVAL=${TP_EVAL:-4}
K_CLIP=${K_CLIP:-0.96}
V_CLIP=${V_CLIP:-0.92}
ABSORB_V=${ABSORB_V:-0}
REASONING_PARSER=${REASONING_PARSER:-minimax-append-think}
N_REPEATS=${N_REPEATS:-5}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-3600}
SERVER_ARGS=${SERVER_ARGS:---disable-radix-cache}
