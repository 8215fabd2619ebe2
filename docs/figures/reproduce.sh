#!/usr/bin/env bash
# Reproduces the figures and tables of docs/results.md on one GPU (about 7 minutes on an H100), from the
# repository root: `bash docs/figures/reproduce.sh`. Small models are trained briefly, one after the other, on
# the Python standard library (20% held out) at a short length, then every evaluation command runs on them;
# the MQAR sweeps (one process per mixer, few CPU threads each) train their own models alongside. Everything
# lands in $RUN; $RUN/eval/report.md gathers it. TTTLM_COMPILE=0: the models run uncompiled (tttlm.fast; compiling
# the blocks and the TTT PyTorch path's mini-batch step costs tens of seconds in every process, more than these
# minute-long runs gain).
# Every setting can be overridden from the environment (the CPU test of this script uses tiny ones).
set -u
RUN=${RUN:-runs/gpu-eval}
MIXERS=${MIXERS:-"transformer mamba2 ttt_linear mesa ttt_mlp"}  # TTT-MLP last: its PyTorch path is the slowest
SIZE=${SIZE:-small}
SEQ=${SEQ:-512}
STEPS=${STEPS:-300}
BATCH=${BATCH:-16}
SAVE_EVERY=${SAVE_EVERY:-20}
TRAIN_LIMIT=${TRAIN_LIMIT:-60}    # seconds for each training (they run one after the other)
RECALL_LIMIT=${RECALL_LIMIT:-180}  # seconds for each recall sweep (they run side by side); RECALL=none: skip
CONTEXTS=${CONTEXTS:-"2048 8192"}
LONG=${LONG:-32768}
LADDER=${LADDER:-"512 1024 2048 4096 8192 16384"}
TEL_CONTEXT=${TEL_CONTEXT:-2048}
RECALL=${RECALL:-"--widths 64 --seq-lens 64 --pairs 4 16 --lrs 3e-3 1e-2 --steps 300 --batch-size 64 --vocab-size 256 --eval-examples 500"}
SPEED=${SPEED:-"--contexts 512 2048 8192 32768 --train-shapes 8x2048 --new-tokens 32 --repeats 2"}
export TTTLM_CACHE=$RUN/cache TTTLM_COMPILE=${TTTLM_COMPILE:-0}
T="python3 -m tttlm"
mkdir -p "$RUN/logs" "$RUN/eval/long"
log() { echo "[$(date -u +%T)] $*"; }
step() {  # step NAME SECONDS COMMAND...: runs it with a time limit, output to logs/NAME.log
  local name=$1 limit=$2
  shift 2
  log "start $name"
  timeout "$limit" "$@" >"$RUN/logs/$name.log" 2>&1 || log "$name ended with status $? (see logs/$name.log)"
}

step data 120 $T data stdlib --val-fraction 0.2 --vocab-size 4096
[ "$RECALL" != none ] && for m in $MIXERS; do
  OMP_NUM_THREADS=2 step "recall-$m" "$RECALL_LIMIT" $T recall --mixers "$m" $RECALL --out "$RUN/recall/$m" &
done
for m in $MIXERS; do
  step "train-$m" "$TRAIN_LIMIT" $T train --model "$m-$SIZE" --val-fraction 0.2 --vocab-size 4096 \
    --seq-len "$SEQ" --batch-size "$BATCH" --steps "$STEPS" --warmup-steps $((STEPS / 10)) \
    --save-every "$SAVE_EVERY" --eval-every $((STEPS / 3)) --keep-last 1 --out-dir "$RUN/train/$m" \
    --no-tensorboard --no-progress
done
wait
log "trainings and recall sweeps done"

CKPTS="" TTT=""
for m in $MIXERS; do
  if ls -d "$RUN/train/$m"/step-* >/dev/null 2>&1; then
    CKPTS="$CKPTS $RUN/train/$m"
    case $m in ttt_* | mesa) TTT="$TTT $RUN/train/$m" ;; esac
  fi
done
SWEEPS=$(for d in "$RUN"/recall/*/; do [ -f "$d/recall.json" ] && echo "$d"; done)
[ -n "$SWEEPS" ] && step recall-merge 60 $T recall --merge $SWEEPS --out "$RUN/eval"
if [ -n "$CKPTS" ]; then
  step positions 120 $T positions $CKPTS --context $CONTEXTS --num-docs 16 --batch-size 4 --out "$RUN/eval"
  step positions-long 90 $T positions $CKPTS --context $LONG --num-docs 4 --out "$RUN/eval/long"
  step ladder 90 $T ladder $CKPTS --lengths $LADDER --num-docs 8 --out "$RUN/eval"
fi
[ -n "$TTT" ] && step telemetry 60 $T telemetry $TTT --context "$TEL_CONTEXT" --num-docs 4 --out "$RUN/eval"
step throughput 150 $T throughput --size "$SIZE" --mixers $MIXERS $SPEED --out "$RUN/eval"
step report 30 $T report "$RUN/eval" "$RUN/eval/long" -o "$RUN/eval/report.md"
log done
