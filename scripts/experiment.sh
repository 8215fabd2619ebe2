#!/usr/bin/env bash
# Runs experiment files of configs/experiments/ (see its README.md) on a GPU machine, from anywhere:
#   bash scripts/experiment.sh configs/experiments/lm-2k-ttt_linear-lr3e-3.toml [more files] [--probe STEPS]
# Each file is trained and evaluated in this one command; results (small JSON and PNG, no checkpoint) go to
# docs/results/<run>/, where a later run's lr_from finds the sweeps it needs. With $OUT set (the device
# machine), the new results and the log are also copied to $OUT/results/. The tokenizer and token shards are
# cached in runs/cache (git ignores runs/): only a machine's first run trains the tokenizer and tokenizes the
# corpus (a few minutes); the Python in use is python3 with this checkout's src/ on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TTTLM_CACHE="${TTTLM_CACHE:-$PWD/runs/cache}"
mkdir -p runs
log=runs/experiment-$(date -u +%Y%m%d-%H%M%S).log
status=0
python3 -m tttlm experiment "$@" --out-dir docs/results 2>&1 | tee "$log" || status=$?
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp "$log" "$OUT/results/"
  for arg in "$@"; do
    name=$(basename "$arg" .toml)
    if [ -d "docs/results/$name" ]; then cp -r "docs/results/$name" "$OUT/results/"; fi
  done
  for extra in corpus probe.json; do
    if [ -e "docs/results/$extra" ]; then cp -r "docs/results/$extra" "$OUT/results/"; fi
  done
fi
exit "$status"
