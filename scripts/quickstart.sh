#!/usr/bin/env bash
# The default job on a fresh machine: sets up .venv (scripts/setup.sh), prepares the Python standard library
# as a corpus, trains a tiny TTT-Linear on the CPU (configs/cpu-ttt_linear-tiny.toml), then prints its
# validation loss beside the unigram baseline and a generated sample. About 10 minutes on 2 cores, install
# included. Extra arguments go to `tttlm train` (e.g. --steps 200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TTTLM_CACHE="${TTTLM_CACHE:-$PWD/runs/cache}"
tttlm data --vocab-size 2048  # the tokenizer of configs/cpu-ttt_linear-tiny.toml
rm -rf runs/quickstart  # the quickstart's own run directory: start it afresh
tttlm train --config configs/cpu-ttt_linear-tiny.toml "$@"
tttlm eval runs/quickstart
echo "--- a sample (tttlm generate runs/quickstart --prompt 'def '):"
tttlm generate runs/quickstart --prompt "def " --max-new-tokens 120
echo
