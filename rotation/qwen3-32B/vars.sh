# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are read by the scripts that source this file
# Qwen/Qwen3-32B: V clip 0.96 (model-specific, spec §2.9); BF16 weights ~64 GB.
# Settings from the reference (spec §8); override any of them from the environment.
MODEL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODEL=${MODEL:-Qwen/Qwen3-32B}
TP_DUMP=${TP_DUMP:-1}
TP_EVAL=${TP_EVAL:-4}
K_CLIP=${K_CLIP:-0.96}
V_CLIP=${V_CLIP:-0.96}
ABSORB_V=${ABSORB_V:-1}
REASONING_PARSER=${REASONING_PARSER:-}
N_REPEATS=${N_REPEATS:-5}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-1200}
SERVER_ARGS=${SERVER_ARGS:-}
