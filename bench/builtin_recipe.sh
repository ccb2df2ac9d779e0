#!/usr/bin/env bash
# The built-in model, end to end, on one GPU: generate the dataset, pretrain the vision tower CLIP-style (the
# official recipe starts from a pretrained CLIP; `osprey train clip`), train stages 1-3 of the full model and of the
# paper's three ablations (same data, same budget; they share the stage-1 model, which has no extractor in play),
# evaluate them, and pack the results.
#
#   bash bench/builtin_recipe.sh            # WORK=runs/builtin_recipe
#
# Variables: N (images), S0 (CLIP steps; 0 skips the pretraining), S0_BATCH (CLIP batch), S1/S2/S3 (optimiser steps per stage), WORK, EVAL_LIMIT (records per eval sub-set),
# S3_TIMEOUT (seconds; stage 3 is stopped there and its newest checkpoint used instead of final/),
# EXTRA (more `osprey train` options for every stage, e.g. "--set micro_batch_size=4 --set global_batch_size=4"),
# VARIANTS (default "full box nopos res4"; "full" trains only the built-in model).
set -euo pipefail
VARIANTS=${VARIANTS:-full box nopos res4}
N=${N:-20000}; S0=${S0:-2000}; S0_BATCH=${S0_BATCH:-256}; S1=${S1:-300}; S2=${S2:-500}; S3=${S3:-1500}; EVAL_LIMIT=${EVAL_LIMIT:-100}
WORK=${WORK:-runs/builtin_recipe}; DATA=$WORK/data
S3_TIMEOUT=${S3_TIMEOUT:-0}
# The step of this small model is bound by the main process's kernel launches: extra OpenMP threads in it and in
# every data worker only compete for the cores (measured: 80 -> 225 samples/s at batch 64 on one H200).
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc itself obeys OMP_NUM_THREADS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$WORK"
log() { echo "[$(date +%H:%M:%S)] $*"; }

log "dataset: $N images"
osprey data synth --out "$DATA" --n "$N" --workers "$CPUS" --no-progress
osprey model init --preset builtin --out "$WORK/full/init" --corpus "$DATA"/train/*.json

read -r -a extra <<< "${EXTRA:-}"
common=(--set "data.root=$DATA" --set progress=false "${extra[@]}")
clip=()
if [ "$S0" != 0 ]; then
  log "vision tower: CLIP pretraining, $S0 steps"
  osprey train clip --data "$DATA" --tokenizer "$WORK/full/init" --out "$WORK/clip" --steps "$S0" --batch-size "$S0_BATCH" \
    --num-workers "$((CPUS - 1))" --no-progress > "$WORK/clip.log" 2>&1
  clip=(--set "clip_weights=$WORK/clip/open_clip.safetensors")
  python -m bench.token_norms --model "$WORK/full/init" --clip-weights "$WORK/clip/open_clip.safetensors" \
    --data "$DATA" --images 20 --probe 300 --out "$WORK/clip_probe.json" > /dev/null 2>&1 || true
fi
log "stage 1 (shared)"
osprey train --stage 1 --config builtin_stage1 "${common[@]}" "${clip[@]}" --model "$WORK/full/init" \
  --output "$WORK/full/stage1" --max-steps "$S1" > "$WORK/full_stage1.log" 2>&1
declare -A derive_flags=([box]=--mask-from-box [nopos]=--no-position-token [res4]="--levels 2")
for v in $VARIANTS; do
  [ "$v" = full ] || osprey model derive "$WORK/full/stage1/final" --out "$WORK/$v/stage1/final" ${derive_flags[$v]}
done

variant() {  # stages 2 and 3 of one variant; variants run side by side on the GPU, each with a share of the CPUs
  local v=$1 workers=$2
  export MASTER_PORT=$3
  osprey train --stage 2 --config builtin_stage2 "${common[@]}" --set "data.num_workers=$workers" \
    --model "$WORK/$v/stage1/final" --output "$WORK/$v/stage2" --max-steps "$S2" > "$WORK/${v}_stage2.log" 2>&1
  python -m bench.token_norms --model "$WORK/$v/stage2/final" --data "$DATA" --images 20 \
    --out "$WORK/${v}_stage2_norms.json" > /dev/null 2>&1 || true
  local limit=(); [ "$S3_TIMEOUT" != 0 ] && limit=(timeout "$S3_TIMEOUT")
  "${limit[@]}" osprey train --stage 3 --config builtin_stage3 "${common[@]}" --set "data.num_workers=$workers" \
    --model "$WORK/$v/stage2/final" --output "$WORK/$v/stage3" --max-steps "$S3" > "$WORK/${v}_stage3.log" 2>&1 || true
  if [ ! -d "$WORK/$v/stage3/final" ]; then  # stopped by S3_TIMEOUT: the newest checkpoint stands in
    local last; last=$(ls -d "$WORK/$v/stage3/checkpoints"/step-* | tail -1)
    echo "$v: stage 3 stopped early; using $last" | tee -a "$WORK/${v}_stage3.log"
    cp -r "$last/model" "$WORK/$v/stage3/final"
  fi
  python -m bench.token_norms --model "$WORK/$v/stage3/final" --data "$DATA" --images 20 --probe 300 \
    --out "$WORK/${v}_stage3_norms.json" > /dev/null 2>&1 || true
}
count=$(wc -w <<< "$VARIANTS")
workers=$(( CPUS / count > 1 ? CPUS / count - 1 : 1 ))
log "stages 2-3: $VARIANTS in parallel ($workers data workers each)"
pids=()
port=29600
for v in $VARIANTS; do variant "$v" "$workers" "$port" & pids+=($!); port=$((port + 1)); done
for p in "${pids[@]}"; do wait "$p"; done

if [ "$EVAL_LIMIT" != 0 ]; then  # EVAL_LIMIT=0: evaluate elsewhere (the dataset is deterministic: same seed, same data)
  log "evaluation"
  models=(); for v in $VARIANTS; do models+=(--model "$v=$WORK/$v/stage3/final"); done
  python -m bench.region_eval --data "$DATA" --split test --limit "$EVAL_LIMIT" --out "$WORK/eval" "${models[@]}" > "$WORK/eval.log" 2>&1
fi
for v in $VARIANTS; do for s in 1 2 3; do
  [ -f "$WORK/$v/stage$s/metrics.jsonl" ] && osprey train plot "$WORK/$v/stage$s/metrics.jsonl" --out "$WORK/curves_${v}_stage$s.png"
done; done
osprey model convert "$WORK/full/stage3/final" --out "$WORK/builtin_bf16" --dtype bfloat16
log "done"
