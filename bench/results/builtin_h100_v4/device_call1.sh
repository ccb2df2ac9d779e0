#!/usr/bin/env bash
# Device call 1 (stop 14, #8): from built-in version 3 (osprey/assets/builtin), stage 3 side by side:
# A: the yes/no sub-set (stage3_pos_neg) 5x in the mix, tower frozen; B: the same, tower trainable at 5e-5.
# LLM 5e-4, extractor/projector 1e-4, 1500-step cosine (a timeout makes the newest checkpoint stand in); region_eval.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
nvidia-smi --query-gpu=name,memory.total --format=csv
W=/tmp/rb; mkdir -p $W
osprey data synth --out $W/data --n 20000 --workers 16 --no-progress > $W/data.log 2>&1
echo "data $SECONDS s"
FILES="[{path: train/stage3_conversations.json, kind: conversations}, {path: train/stage3_short_form.json, kind: short_form}, {path: train/stage3_parts.json, kind: parts}, {path: train/stage3_pos_neg.json, kind: pos_neg, repeat: 5}, {path: train/stage3_detailed.json, kind: detailed}, {path: train/stage2_categories.json, kind: task_category}, {path: train/stage2_categories.json, kind: task_open_vocab}, {path: train/stage2_referring.json, kind: task_short}, {path: train/stage2_referring.json, kind: task_refcocog}, {path: train/stage3_detailed.json, kind: task_detailed}]"
run3() {  # name, master port, extra options...
  local v=$1 port=$2; shift 2
  MASTER_PORT=$port timeout ${S3_TIMEOUT:-425} osprey train --stage 3 --config builtin_stage3 --set data.root=$W/data --set progress=false \
    --set data.num_workers=7 --model osprey/assets/builtin --output $W/$v --max-steps ${S3:-1500} --set save_steps=100 \
    --set "data.files=$FILES" --set optim.lr=5.0e-4 --set optim.warmup_ratio=0.02 "$@" > $W/$v.log 2>&1
  if [ ! -d $W/$v/final ]; then last=$(ls -d $W/$v/checkpoints/step-* | tail -1); echo "stopped early; using $last" >> $W/$v.log; cp -r $last/model $W/$v/final; fi
  echo "$v trained $SECONDS s"
  osprey model convert $W/$v/final --out $W/${v}_bf16 --dtype bfloat16 > $W/${v}_convert.log 2>&1
  osprey train plot $W/$v/metrics.jsonl --out $W/curves_$v.png >> $W/${v}_convert.log 2>&1
  python -m bench.region_eval --data $W/data --split test --limit 60 --model $v=$W/$v/final --out $W/region_$v > $W/region_$v.log 2>&1
  echo "$v eval $SECONDS s"
}
run3 posneg 29600 --set "optim.part_lr={mask_extractor: 1.0e-4, mm_projector: 1.0e-4}" &
run3 tower 29601 --set train_vision=true --set "optim.part_lr={vision_tower: 5.0e-5, mask_extractor: 1.0e-4, mm_projector: 1.0e-4}" &
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt 548 ]; do sleep 2; done
jobs -r; pkill -f bench.region_eval; sleep 1
for v in posneg tower; do echo "== $v"; tail -1 $W/$v/metrics.jsonl; tail -2 $W/$v.log; grep -h "^| category \|^| pos_neg \|^| attribute \|short_form:position \|short_form:colour " $W/region_$v/region_eval.md; done
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints --exclude=final -C /tmp rb
for v in posneg tower; do [ -d $W/${v}_bf16 ] && tar -cf - -C $W ${v}_bf16 | split -b 15m - $OUT/${v}_bf16.tar.part-; done
ls -la $OUT
