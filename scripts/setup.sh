#!/usr/bin/env bash
# Creates .venv and installs tttlm into it. On a machine without CUDA, torch's CPU build is pinned first
# (torch==2.13.0), so that no multi-GB CUDA build is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[dev]"
