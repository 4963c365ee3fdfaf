#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the CPU build of torch and explainfix (editable).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Pin the CPU build first: a bare `torch` requirement can pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
