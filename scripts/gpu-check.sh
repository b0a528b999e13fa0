#!/usr/bin/env bash
# The GPU stage (what `tox -e gpu-parity` runs) on a bare GPU machine that cannot reach a package index,
# from wheels carried alongside the repository.
#
#   scripts/gpu-check.sh [--wheels DIR] [--report FILE] [PYTEST_ARGS...]     on the GPU machine
#   scripts/gpu-check.sh --download DIR [--python-version 3.12]              where PyPI is reachable
#
# The GPU machine needs python3 with a CUDA build of torch (an NVIDIA/PyTorch image). The wheels bring what
# the CPU gate pins and such images lack or have in other versions (megatron-core, transformers; add more
# with GEMMA4_GPU_WHEELS, e.g. "flash-attn==2.8.3"); they go into a private target directory (nothing is
# installed system-wide) that is put first on PYTHONPATH with the repository.
# Steps: 1. standard-library GPU check (fails in seconds without a GPU; GEMMA4_ALLOW_NO_GPU=1 skips);
#        2. torch must be a CUDA build that sees the GPU; 3. install the wheels; 4. pytest -m gpu tests/gpu.
# Results: printed per test and written to --report (default reports/gpu-parity.json).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="$REPO/.whl"
REPORT="$REPO/reports/gpu-parity.json"
SITE="${GEMMA4_GPU_SITE:-/tmp/gemma4-gpu-site}"
PACKAGES=(megatron-core==0.16.1 transformers==5.24.0 ${GEMMA4_GPU_WHEELS:-})
DOWNLOAD=""
PYVER="3.12"
PYTEST_ARGS=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --report) REPORT="$2"; shift 2 ;;
    --download) DOWNLOAD="$2"; shift 2 ;;
    --python-version) PYVER="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) PYTEST_ARGS+=("$1"); shift ;;
  esac
done

if [[ -n "$DOWNLOAD" ]]; then
  mkdir -p "$DOWNLOAD"
  platforms=()
  for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  set -x
  "$PY" -m pip download --no-deps --only-binary=:all: --implementation cp --python-version "$PYVER" \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d "$DOWNLOAD" "${PACKAGES[@]}"
  exit 0
fi

cd "$REPO"
# 1. No GPU: fail (or skip, with the explicit opt-out) before anything is installed.
if ! GEMMA4_ALLOW_NO_GPU= "$PY" -S -m harness.stages gpu-parity --preflight; then
  if [[ "${GEMMA4_ALLOW_NO_GPU:-}" == "1" ]]; then
    echo "gpu-check: SKIPPED by explicit opt-out GEMMA4_ALLOW_NO_GPU=1 (no GPU visible)"
    exit 0
  fi
  exit 1
fi
# 2. A CUDA torch must already be there (it is not carried: multi-GB, tied to the driver).
"$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu-check: FAILED: python has no torch; use an image with a CUDA build of torch")
if torch.version.cuda is None or not torch.cuda.is_available():
    sys.exit(f"gpu-check: FAILED: torch {torch.__version__} cannot use the GPU (CUDA build: {torch.version.cuda})")
print(f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
# 3. The carried wheels, into a private target directory.
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
  echo "gpu-check: FAILED: no wheels in $WHEELS (make them with: scripts/gpu-check.sh --download $WHEELS)" >&2
  exit 1
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export GEMMA4_GPU_REPORT="$REPORT" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -c "import megatron.core, transformers; print('gpu-check: megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
# 4. The GPU tests (the stage runner, told not to pip-install).
exec "$PY" -m harness.stages gpu-parity --no-install "${PYTEST_ARGS[@]}"
