#!/usr/bin/env bash
# Runs the commands behind docs/results.md §B again, on one GPU, from the repository root:
#   bash docs/figures/reproduce.sh            # about 10 minutes on an H100
# It writes the layout of docs/figures under $RUN: lm/ (loss by position at 2k and 8k, the context ladder and
# the telemetry of every TTT and Mesa model), lm/long/ (loss by position at 32k), recall/ (the MQAR sweeps,
# merged), throughput/ and report.md, with the settings of the committed results: the same data split,
# tokenizer, models, batch, seed, evaluation lengths, document counts, MQAR sweep and throughput command.
#
# What it does not regenerate exactly:
# - Each training stops at a time limit ($TRAIN_LIMIT s, as in the committed run), keeping its last checkpoint
#   (saved every $SAVE_EVERY steps), so the step each model reaches, and every number measured on it, depend on
#   the machine; report.md names the checkpoints. The committed lm/ and lm/long/ came from such a run
#   (transformer 160 steps, mamba2 260, ttt_linear 300, mesa 180, ttt_mlp 20 on an H100).
# - docs/figures/run1/ (the ladder and Mesa's telemetry in §B2-B3) came from an earlier call that trained the
#   models side by side; this script measures the ladder and the telemetry on its own sequential trainings and
#   writes them to lm/.
# - The throughput numbers depend on the machine and on today's code (CUDA-graph decoding and the Triton
#   kernels of Mamba2, Mesa and TTT-MLP came after the committed measurement).
# TTTLM_COMPILE=0: the models run uncompiled (tttlm.fast; compiling costs tens of seconds in every process, more
# than these minute-long runs gain). Every setting can be overridden from the environment
# (tests/eval/test_reproduce_script.py runs it on CPU with tiny ones).
set -u
RUN=${RUN:-runs/gpu-eval}
CORPUS=${CORPUS:-stdlib}
VOCAB=${VOCAB:-4096}
MIXERS=${MIXERS:-"transformer mamba2 ttt_linear mesa ttt_mlp"}  # TTT-MLP last: the slowest to train
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
RECALL=${RECALL:-"--widths 64 --seq-len 64 --pairs 4 16 --lr 3e-3 1e-2 --steps 300 --batch-size 64 --vocab-size 256 --eval-examples 500"}
SPEED=${SPEED:-"--seq-len 512 2048 8192 --train-shapes 8x2048 --new-tokens 16 --repeats 2"}
export TTTLM_CACHE=$RUN/cache TTTLM_COMPILE=${TTTLM_COMPILE:-0}
T=${TTTLM:-"python3 -m tttlm"}
mkdir -p "$RUN/logs" "$RUN/lm/long"
log() { echo "[$(date -u +%T)] $*"; }
step() {  # step NAME SECONDS COMMAND...: runs it with a time limit, output to logs/NAME.log
  local name=$1 limit=$2
  shift 2
  log "start $name"
  timeout "$limit" "$@" >"$RUN/logs/$name.log" 2>&1 || log "$name ended with status $? (see logs/$name.log)"
}

step data 120 $T data --corpus "$CORPUS" --val-fraction 0.2 --vocab-size "$VOCAB"
[ "$RECALL" != none ] && for m in $MIXERS; do
  OMP_NUM_THREADS=2 step "recall-$m" "$RECALL_LIMIT" $T recall --mixers "$m" $RECALL --out-dir "$RUN/recall/$m" &
done
for m in $MIXERS; do
  step "train-$m" "$TRAIN_LIMIT" $T train --model "$m-$SIZE" --corpus "$CORPUS" --val-fraction 0.2 --vocab-size "$VOCAB" \
    --seq-len "$SEQ" --batch-size "$BATCH" --steps "$STEPS" --warmup-steps $((STEPS / 10)) \
    --save-every "$SAVE_EVERY" --eval-every $((STEPS / 3)) --keep-last 1 --out-dir "$RUN/train/$m" \
    --no-tensorboard
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
[ -n "$SWEEPS" ] && step recall-merge 60 $T recall --merge $SWEEPS --out-dir "$RUN/recall"
if [ -n "$CKPTS" ]; then
  step positions 120 $T positions $CKPTS --seq-len $CONTEXTS --num-docs 16 --micro-batch-size 4 --out-dir "$RUN/lm"
  step positions-long 90 $T positions $CKPTS --seq-len $LONG --num-docs 4 --out-dir "$RUN/lm/long"
  step ladder 240 $T ladder $CKPTS --seq-len $LADDER --num-docs 8 --out-dir "$RUN/lm"
fi
[ -n "$TTT" ] && step telemetry 60 $T telemetry $TTT --seq-len "$TEL_CONTEXT" --num-docs 4 --out-dir "$RUN/lm"
mkdir -p "$RUN/throughput"
step throughput 150 $T throughput --size "$SIZE" --mixers $MIXERS $SPEED --out-dir "$RUN/throughput"
FOLDERS=$(for d in lm lm/long recall throughput; do ls "$RUN/$d"/*.json >/dev/null 2>&1 && echo "$RUN/$d"; done)
step report 30 $T report $FOLDERS --out-dir "$RUN"
log done
