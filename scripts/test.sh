#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite, Triton kernels included (TRITON_INTERPRET=1 on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest tests -q "$@"
