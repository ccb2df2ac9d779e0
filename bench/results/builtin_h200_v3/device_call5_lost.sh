#!/usr/bin/env bash
# Device call 5 (stop 13, #8): from the ablation's full model (runs/stop13/full450), stage 3 with the yes/no questions
# (stage3_pos_neg) five times in the mix, 1000-step cosine (LLM 3e-4, extractor/projector 1e-4), stopped at 250 s;
# then region_eval.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
nvidia-smi --query-gpu=name,memory.total --format=csv
W=/tmp/rb; mkdir -p $W
osprey data synth --out $W/data --n 20000 --workers 16 --no-progress > $W/data.log 2>&1
echo "data $SECONDS s"
(
  timeout 250 osprey train --stage 3 --config builtin_stage3 --set data.root=$W/data --set progress=false \
    --set data.num_workers=15 --model runs/stop13/full450 --output $W/posneg --max-steps 1000 --set save_steps=200 \
    --set "data.files=[{path: train/stage3_conversations.json, kind: conversations}, {path: train/stage3_short_form.json, kind: short_form}, {path: train/stage3_parts.json, kind: parts}, {path: train/stage3_pos_neg.json, kind: pos_neg}, {path: train/stage3_detailed.json, kind: detailed}, {path: train/stage2_categories.json, kind: task_category}, {path: train/stage2_categories.json, kind: task_open_vocab}, {path: train/stage2_referring.json, kind: task_short}, {path: train/stage2_referring.json, kind: task_refcocog}, {path: train/stage3_detailed.json, kind: task_detailed}, {path: train/stage3_pos_neg.json, kind: pos_neg}, {path: train/stage3_pos_neg.json, kind: pos_neg}, {path: train/stage3_pos_neg.json, kind: pos_neg}, {path: train/stage3_pos_neg.json, kind: pos_neg}]" \
    --set optim.lr=3.0e-4 --set optim.warmup_ratio=0.02 --set "optim.part_lr={mask_extractor: 1.0e-4, mm_projector: 1.0e-4}" \
    > $W/posneg.log 2>&1
  if [ ! -d $W/posneg/final ]; then last=$(ls -d $W/posneg/checkpoints/step-* | tail -1); echo "stopped early; using $last" >> $W/posneg.log; cp -r $last/model $W/posneg/final; fi
  echo "trained $SECONDS s"
  python -m bench.region_eval --data $W/data --split test --limit 60 --model posneg=$W/posneg/final --out $W/region_posneg > $W/region_posneg.log 2>&1
  echo "eval $SECONDS s"
) &
pid=$!
while kill -0 $pid 2>/dev/null && [ $SECONDS -lt 355 ]; do sleep 2; done
pkill -f bench.region_eval; sleep 1
tail -1 $W/posneg/metrics.jsonl; tail -2 $W/posneg.log; grep -h "category \|category@\|pos_neg \|position \|colour \|attribute " $W/region_posneg/region_eval.md
osprey train plot $W/posneg/metrics.jsonl --out $W/curves_posneg.png > /dev/null 2>&1
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints -C /tmp rb
[ -d $W/posneg/final ] && tar -cf - -C $W/posneg final | split -b 15m - $OUT/posneg_final.tar.part-
ls -la $OUT
