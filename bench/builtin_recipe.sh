#!/usr/bin/env bash
# The built-in model, end to end, on one GPU: generate the dataset, pretrain the vision tower CLIP-style (the
# official recipe starts from a pretrained CLIP; `osprey train clip`), train stages 1-3 of the full model and of the
# paper's three ablations (same data, same budget; they share the stage-1 model, which has no extractor in play),
# evaluate them, and pack the results.
#
#   bash bench/builtin_recipe.sh            # WORK=runs/builtin_recipe
#
# Every step is skipped when its output already exists in WORK (the dataset, init, clip, each variant's
# stage<k>/final), so a run split over several sessions continues where the last one stopped; UNTIL stops it early.
#
# Variables: N (images), EXTRA_TRAIN (more training images on top, `osprey data synth --extra-train`: val and test stay
# those of N; built-in version 6 trained on N=20000 EXTRA_TRAIN=40000), SEED (dataset seed, default 0), S0 (CLIP steps; 0 skips the pretraining and trains the tower in stages 1-3 instead),
# S0_BATCH (CLIP batch), S0_TIME (seconds; the CLIP schedule is fitted into them, --time-limit: 2,400 steps take ~650 s on
# one H100, and a schedule squeezed into much less anneals before the tower has learned; to split it over machines, carry
# it on with `osprey train clip --init <earlier open_clip.safetensors>`, as built-in version 5 did), S1/S2/S3 (optimiser steps per
# stage), S3Y/S3F (steps of the two stage-3 passes after it: yes/no-heavy, then final; 0 skips one), WORK, EVAL_LIMIT (records per eval sub-set; 0 skips the evaluation),
# S3_TIMEOUT (seconds of training per stage-3 pass: its schedule is fitted into them, `osprey train --time-limit`),
# EXTRA (more `osprey train` options for every stage, e.g. "--set micro_batch_size=4 --set global_batch_size=4"),
# VARIANTS (default "full box nopos res4"; "full" trains only the built-in model),
# UNTIL (clip, stage1, stage2 or stage3: stop after that step; default: run everything),
# CLIP_PROJ (mlp, the default, or linear: the projection head of the CLIP's image path),
# CLIP_EXTRA (more `osprey train clip` options, e.g. "--category-weight 2 --region-levels final").
set -euo pipefail
VARIANTS=${VARIANTS:-full box nopos res4}
N=${N:-20000}; EXTRA_TRAIN=${EXTRA_TRAIN:-0}; SEED=${SEED:-0}; S0=${S0:-2400}; S0_BATCH=${S0_BATCH:-256}; S0_TIME=${S0_TIME:-0}
S1=${S1:-300}; S2=${S2:-500}; S3=${S3:-1500}; S3Y=${S3Y:-900}; S3F=${S3F:-1400}; EVAL_LIMIT=${EVAL_LIMIT:-100}
WORK=${WORK:-runs/builtin_recipe}; DATA=$WORK/data
S3_TIMEOUT=${S3_TIMEOUT:-0}; UNTIL=${UNTIL:-}
# The step of this small model is bound by the main process's kernel launches: extra OpenMP threads in it and in
# every data worker only compete for the cores (measured: 80 -> 225 samples/s at batch 64 on one H200).
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc itself obeys OMP_NUM_THREADS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$WORK"
log() { echo "[$(date +%H:%M:%S)] $*"; }

stop_after() { [ "$UNTIL" = "$1" ] && { log "stopping after $1 (UNTIL=$UNTIL)"; exit 0; }; return 0; }

# Reuse the dataset only when its manifest says it is the one asked for (the generator's defaults, this N and seed);
# image i depends on (seed, i) and the split on n, so any other dataset would mix training and test images.
same_data=$(python - "$DATA/manifest.json" "$N" "$SEED" "$EXTRA_TRAIN" <<'PY' 2>/dev/null
import json, sys
from data_tools.synth.generate import SynthConfig
manifest, n, seed, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(json.load(open(manifest))["config"] == SynthConfig(out="", n=n, seed=seed, extra_train=extra).manifest_config())
PY
) || true  # no manifest yet (a fresh WORK): generate
if [ "$same_data" = True ]; then
  log "dataset: $DATA exists ($N images + $EXTRA_TRAIN training images, seed $SEED)"
else
  log "dataset: $N images + $EXTRA_TRAIN training images, seed $SEED"
  osprey data synth --out "$DATA" --n "$N" --extra-train "$EXTRA_TRAIN" --seed "$SEED" --workers "$CPUS" --no-progress
fi
# CLIP_PROJ=linear: the tower's CLIP projection head is one linear layer instead of open_clip's MLP. Osprey never
# uses that head. With `--region-levels final` (CLIP_EXTRA) regions are embedded through it too, and with the MLP the
# category settles in the head (probe 50 % through it, ~20 % on the pooled levels; docs/builtin_model.md); the default
# (`all`) embeds regions from the levels themselves, so the head only serves the image-caption term.
read -r -a extra <<< "${EXTRA:-}"; read -r -a clip_extra <<< "${CLIP_EXTRA:-}"
PRESET=builtin
if [ "${CLIP_PROJ:-mlp}" != mlp ]; then
  PRESET=$WORK/preset_builtin_${CLIP_PROJ}.json
  python - "$PRESET" "$CLIP_PROJ" <<'PY'
import json, sys
from pathlib import Path
from osprey.config import PRESET_DIR
preset = json.loads((PRESET_DIR / "builtin.json").read_text())
preset["vision"]["open_clip_config"]["vision_cfg"]["timm_proj"] = sys.argv[2]
Path(sys.argv[1]).write_text(json.dumps(preset, indent=2))
PY
fi
[ -f "$WORK/full/init/config.json" ] || osprey model init --preset "$PRESET" --out "$WORK/full/init" --corpus "$DATA"/train/*.json

common=(--set "data.root=$DATA" --set progress=false)
stage1=()
if [ "$S0" != 0 ]; then
  if [ ! -f "$WORK/clip/open_clip.safetensors" ]; then
    log "vision tower: CLIP pretraining, $S0 steps (time limit: ${S0_TIME}s)"
    osprey train clip --data "$DATA" --preset "$PRESET" --tokenizer "$WORK/full/init" --out "$WORK/clip" --steps "$S0" --batch-size "$S0_BATCH" \
      --time-limit "$S0_TIME" --num-workers "$((CPUS - 1))" --no-progress "${clip_extra[@]}" > "$WORK/clip.log" 2>&1
    python -m bench.token_norms --model "$WORK/full/init" --clip-weights "$WORK/clip/open_clip.safetensors" \
      --data "$DATA" --images 20 --probe 300 --out "$WORK/clip_probe.json" > /dev/null 2>&1 || true
  fi
  stage1=(--set "clip_weights=$WORK/clip/open_clip.safetensors")
else  # no pretrained tower: it trains in every stage, as built-in version 1 did
  common+=(--set train_vision=true); stage1=(--set clip_weights=null)
fi
common+=("${extra[@]}")
stop_after clip
if [ ! -d "$WORK/full/stage1/final" ]; then
  log "stage 1 (shared)"
  osprey train --stage 1 --config builtin_stage1 "${common[@]}" "${stage1[@]}" --model "$WORK/full/init" \
    --output "$WORK/full/stage1" --max-steps "$S1" > "$WORK/full_stage1.log" 2>&1
fi
stop_after stage1
declare -A derive_flags=([box]=--mask-from-box [nopos]=--no-position-token [res4]="--levels 2")
for v in $VARIANTS; do
  [ "$v" = full ] || [ -d "$WORK/$v/stage1/final" ] || \
    osprey model derive "$WORK/full/stage1/final" --out "$WORK/$v/stage1/final" ${derive_flags[$v]}
done

stage3_pass() {  # variant, name, config, from, steps, workers: one stage-3 pass into $WORK/<variant>/<name>
  local v=$1 name=$2 config=$3 from=$4 steps=$5 workers=$6
  [ -d "$WORK/$v/$name/final" ] && return 0
  # S3_TIMEOUT: the schedule is fitted into that many seconds of training (--time-limit, annealed, final/ written);
  # the process is killed 120 s later if it is still running (start-up, saving), and its newest checkpoint used
  local limit=() fit=(); [ "$S3_TIMEOUT" != 0 ] && { limit=(timeout "$((S3_TIMEOUT + 120))"); fit=(--time-limit "$S3_TIMEOUT"); }
  "${limit[@]}" osprey train --stage 3 --config "$config" "${common[@]}" --set "data.num_workers=$workers" \
    --model "$from" --output "$WORK/$v/$name" --max-steps "$steps" "${fit[@]}" > "$WORK/${v}_$name.log" 2>&1 || true
  if [ ! -d "$WORK/$v/$name/final" ]; then  # killed: the newest checkpoint stands in
    local last; last=$(ls -d "$WORK/$v/$name/checkpoints"/step-* | tail -1)
    echo "$v: $name stopped early; using $last" | tee -a "$WORK/${v}_$name.log"
    cp -r "$last/model" "$WORK/$v/$name/final"
  fi
}

variant() {  # stages 2 and 3 of one variant; variants run side by side on the GPU, each with a share of the CPUs
  local v=$1 workers=$2
  export MASTER_PORT=$3
  if [ ! -d "$WORK/$v/stage2/final" ]; then
    osprey train --stage 2 --config builtin_stage2 "${common[@]}" --set "data.num_workers=$workers" \
      --model "$WORK/$v/stage1/final" --output "$WORK/$v/stage2" --max-steps "$S2" > "$WORK/${v}_stage2.log" 2>&1
    python -m bench.token_norms --model "$WORK/$v/stage2/final" --data "$DATA" --images 20 \
      --out "$WORK/${v}_stage2_norms.json" > /dev/null 2>&1 || true
  fi
  [ "$UNTIL" = stage2 ] && return 0
  stage3_pass "$v" stage3 builtin_stage3 "$WORK/$v/stage2/final" "$S3" "$workers"
  # The yes/no questions are learned only when they dominate the mix (builtin_stage3_yesno.yaml), then kept while
  # the rest settles (builtin_stage3_final.yaml); the last pass run is the variant's model.
  local from=$WORK/$v/stage3/final
  if [ "$S3Y" != 0 ]; then stage3_pass "$v" stage3_yesno builtin_stage3_yesno "$from" "$S3Y" "$workers"; from=$WORK/$v/stage3_yesno/final; fi
  if [ "$S3F" != 0 ]; then stage3_pass "$v" stage3_final builtin_stage3_final "$from" "$S3F" "$workers"; from=$WORK/$v/stage3_final/final; fi
  rm -rf "$WORK/$v/model"; cp -r "$from" "$WORK/$v/model"
  python -m bench.token_norms --model "$WORK/$v/model" --data "$DATA" --images 20 --probe 300 --reliance 64 --template infer \
    --out "$WORK/${v}_stage3_norms.json" > /dev/null 2>&1 || true
}
count=$(wc -w <<< "$VARIANTS")
workers=$(( CPUS / count > 1 ? CPUS / count - 1 : 1 ))
log "stages 2-3: $VARIANTS in parallel ($workers data workers each)"
pids=()
port=29600
for v in $VARIANTS; do variant "$v" "$workers" "$port" & pids+=($!); port=$((port + 1)); done
for p in "${pids[@]}"; do wait "$p"; done
stop_after stage2
for v in $VARIANTS; do for s in 1 2 3 3_yesno 3_final; do
  [ -f "$WORK/$v/stage$s/metrics.jsonl" ] && osprey train plot "$WORK/$v/stage$s/metrics.jsonl" --out "$WORK/curves_${v}_stage$s.png"
done; done
[ -d "$WORK/builtin_bf16" ] || osprey model convert "$WORK/full/model" --out "$WORK/builtin_bf16" --dtype bfloat16
stop_after stage3

if [ "$EVAL_LIMIT" != 0 ]; then  # EVAL_LIMIT=0: evaluate elsewhere (the dataset is deterministic: same seed, same data)
  log "evaluation"
  models=(); for v in $VARIANTS; do models+=(--model "$v=$WORK/$v/model"); done
  python -m bench.region_eval --data "$DATA" --split test --limit "$EVAL_LIMIT" --out "$WORK/eval" "${models[@]}" > "$WORK/eval.log" 2>&1
fi
log "done"
