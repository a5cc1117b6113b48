#!/usr/bin/env bash
# Build the lean CPU venv for the SGLang plugin tests and run them.
#
# Recipe: docs/sglang_integration.md §2.3 variant b (torch 2.13.0 CPU wheel, triton 3.6.0,
# numpy 2.3.5, sglang==0.5.17 --no-deps + its pure-python deps, torchvision uninstalled and
# replaced by an import-only stub). Takes ~3 min the first time; later runs reuse the venv.
#
# Usage:  scripts/ci_sglang_cpu.sh [VENV_DIR]     (default /work/sglang-venv)
#   SKIP_BUILD=1 scripts/ci_sglang_cpu.sh          run the tests in an existing venv only
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-/work/sglang-venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
STUB="$VENV/torchvision_stub"

build() {
  echo "== building lean SGLang CPU venv at $VENV"
  "$PY" -m venv "$VENV"
  local pip="$VENV/bin/pip"
  local cons="$VENV/constraints.txt"
  printf 'torch==2.13.0\ntriton==3.6.0\nnumpy==2.3.5\n' > "$cons"
  "$pip" install -q --upgrade pip setuptools wheel
  "$pip" install -q -c "$cons" torch==2.13.0 triton==3.6.0 numpy==2.3.5
  "$pip" install -q --no-deps sglang==0.5.17
  # sglang 0.5.17 Requires-Dist minus GPU-only packages (doc §2.3).
  "$pip" install -q -c "$cons" \
    aiohttp 'anthropic>=0.20.0' apache-tvm-ffi==0.1.11 blobfile==3.0.0 build compressed-tensors \
    datasets distro easydict einops fastapi gguf interegular IPython 'kernels<0.15,>=0.14.1' \
    'llguidance<2.0.0,>=1.7.6' 'mistral_common>=1.11.5' modelscope msgspec ninja numba==0.65.1 \
    numpy nvidia-ml-py openai==2.6.1 openai-harmony==0.0.4 orjson outlines==0.1.11 packaging \
    partial_json_parser pillow 'prometheus-client>=0.20.0' psutil py-spy pybase64 pydantic \
    python-multipart 'pyzmq>=25.1.2' requests scipy sentencepiece setproctitle \
    'smg-grpc-servicer>=0.5.0' soundfile==0.13.1 tiktoken timm==1.0.16 tqdm transformers==5.12.1 \
    uvicorn uvloop watchfiles xgrammar==0.2.1 xxhash zstandard pytest
  # timm pulls a CUDA torchvision that breaks CPU torch at import: remove it, use a stub.
  "$pip" uninstall -y -q torchvision || true
  make_stub
  touch "$VENV/.oscar_sglang_ok"
}

make_stub() {
  # Import-only torchvision stub: enough for sglang/transformers module imports, nothing more.
  mkdir -p "$STUB/torchvision/transforms/v2" "$STUB/torchvision/io"
  cat > "$STUB/torchvision/__init__.py" <<'PYEOF'
"""Import-only torchvision stub for CPU CI (no ops)."""
__version__ = "0.0.0+stub"
from . import io, transforms  # noqa: F401


def __getattr__(name):
    raise AttributeError(f"torchvision stub has no attribute {name!r}")
PYEOF
  cat > "$STUB/torchvision/transforms/__init__.py" <<'PYEOF'
import enum

from . import functional, v2  # noqa: F401


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def __getattr__(name):
    return type(name, (), {"__init__": lambda self, *a, **k: None})
PYEOF
  cat > "$STUB/torchvision/transforms/functional.py" <<'PYEOF'
def __getattr__(name):
    def _stub(*a, **k):
        raise NotImplementedError(f"torchvision stub: {name}")
    return _stub
PYEOF
  cp "$STUB/torchvision/transforms/functional.py" "$STUB/torchvision/transforms/v2/functional.py"
  printf 'from . import functional  # noqa: F401\n' > "$STUB/torchvision/transforms/v2/__init__.py"
  cat > "$STUB/torchvision/io/__init__.py" <<'PYEOF'
import enum


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


def __getattr__(name):
    def _stub(*a, **k):
        raise NotImplementedError(f"torchvision stub: {name}")
    return _stub
PYEOF
}

if [[ "${SKIP_BUILD:-0}" != "1" && ! -f "$VENV/.oscar_sglang_ok" ]]; then
  build
fi

# Our package, editable and without deps (torch etc. are pinned above); re-run every time so
# the `sglang.srt.plugins` entry point in pyproject.toml is always current.
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$REPO"

echo "== running tests/sglang_plugin in $VENV"
cd "$REPO"
# -P: keep the repo root off sys.path, so a stale ./oscar_kv.egg-info (from another venv's
# editable install) cannot hide our entry point; oscar_kv comes from the editable install.
PYTHONPATH="$STUB${PYTHONPATH:+:$PYTHONPATH}" \
  "$VENV/bin/python" -P -m pytest -q -p no:cacheprovider tests/sglang_plugin "${@:2}"
