# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are read by the scripts that source this file
# zai-org/GLM-4.7-FP8: 358B MoE, 92 layers, partial RoPE; 3 repeats as in the paper.
# Settings from the reference (spec §8); override any of them from the environment.
MODEL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODEL=${MODEL:-zai-org/GLM-4.7-FP8}
TP_DUMP=${TP_DUMP:-8}
TP_EVAL=${TP_EVAL:-8}
K_CLIP=${K_CLIP:-0.96}
V_CLIP=${V_CLIP:-0.92}
ABSORB_V=${ABSORB_V:-1}
REASONING_PARSER=${REASONING_PARSER:-}
N_REPEATS=${N_REPEATS:-3}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-7200}
SERVER_ARGS=${SERVER_ARGS:-}
