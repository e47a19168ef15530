#!/usr/bin/env bash
# Build the folder the GPU machine needs (it has no package registry): cnnlab's wheel, the wheels of
# what cnnlab needs and the machine lacks, and Fashion-MNIST. See scripts/gpu_bundle.py.
#   bash scripts/gpu_bundle.sh [BUNDLE_DIR, default .gpu_bundle] [--data-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "gpu_bundle: $PY not found; run scripts/setup.sh first" >&2; exit 2; }
exec "$PY" scripts/gpu_bundle.py "$@"
