#!/usr/bin/env bash
# Device call 1 (#8): from the shipped built-in model, stage 3 continued side by side for the same steps:
# A (tower frozen, as shipped) vs B (tower trainable at a low rate). Then reliance norms, region_eval on test.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv
T0=$SECONDS
W=/tmp/rb; mkdir -p $W
osprey data synth --out $W/data --n 20000 --workers 16 --no-progress > $W/data.log 2>&1
echo "data $((SECONDS-T0)) s"
run3() {  # name, master port, extra options...
  local v=$1 port=$2; shift 2
  MASTER_PORT=$port timeout ${S3_TIMEOUT:-390} osprey train --stage 3 --config builtin_stage3 --set data.root=$W/data --set progress=false \
    --set data.num_workers=7 --model osprey/assets/builtin --output $W/$v/stage3 --max-steps ${S3:-600} \
    --set optim.lr=5.0e-4 --set optim.warmup_ratio=0.02 "$@" > $W/${v}_stage3.log 2>&1
  if [ ! -d $W/$v/stage3/final ]; then last=$(ls -d $W/$v/stage3/checkpoints/step-* | tail -1); echo "stopped early; using $last" >> $W/${v}_stage3.log; cp -r $last/model $W/$v/stage3/final; fi
  echo "$v trained $((SECONDS-T0)) s"
  python -m bench.token_norms --model $W/$v/stage3/final --data $W/data --images 20 --probe 300 --reliance 64 --template infer \
    --out $W/${v}_stage3_norms.json > $W/${v}_norms.log 2>&1
  osprey model convert $W/$v/stage3/final --out $W/${v}_bf16 --dtype bfloat16 >> $W/${v}_norms.log 2>&1
  osprey train plot $W/$v/stage3/metrics.jsonl --out $W/curves_${v}_stage3.png >> $W/${v}_norms.log 2>&1
  python -m bench.region_eval --data $W/data --split test --limit 60 --model $v=$W/$v/stage3/final --out $W/region_$v > $W/region_$v.log 2>&1
  echo "$v done $((SECONDS-T0)) s"
}
run3 frozen 29600 --set "optim.part_lr={mask_extractor: 1.0e-4, mm_projector: 1.0e-4}" &
run3 tower 29601 --set train_vision=true --set "optim.part_lr={vision_tower: 1.0e-4, mask_extractor: 1.0e-4, mm_projector: 1.0e-4}" &
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt ${BUDGET:-545} ]; do sleep 2; done
jobs -r; pkill -f "bench.region_eval"; pkill -f "bench.token_norms"; sleep 1
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints --exclude=final -C /tmp rb
for v in frozen tower; do [ -d $W/${v}_bf16 ] && tar -cf - -C $W ${v}_bf16 | split -b 15m - $OUT/${v}_bf16.tar.part-; done
ls -la $OUT
