#!/usr/bin/env bash
# The ablation in fine-tune form (a first try with res4 as a third run side by side ran out of GPU memory; res4
# was dropped). From the built-in model version 2, two extractor variants
# (extractor weights kept where they fit) get the same 600 stage-3 steps as device_call_continue.sh's "frozen" run (the full model).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total --format=csv
T0=$SECONDS
W=/tmp/rb; mkdir -p $W
osprey data synth --out $W/data --n 20000 --workers 16 --no-progress > $W/data.log 2>&1 &
osprey model derive osprey/assets/builtin --out $W/box/init --mask-from-box --keep-extractor > $W/derive.log 2>&1
osprey model derive osprey/assets/builtin --out $W/nopos/init --no-position-token --keep-extractor >> $W/derive.log 2>&1
wait
echo "data+derive $((SECONDS-T0)) s"
run3() {  # name, master port
  local v=$1 port=$2; shift 2
  MASTER_PORT=$port timeout 460 osprey train --stage 3 --config builtin_stage3 --set data.root=$W/data --set progress=false \
    --set data.num_workers=7 --model $W/$v/init --output $W/$v/stage3 --max-steps 600 \
    --set optim.lr=5.0e-4 --set optim.warmup_ratio=0.02 --set "optim.part_lr={mask_extractor: 1.0e-4, mm_projector: 1.0e-4}" \
    > $W/${v}_stage3.log 2>&1
  if [ ! -d $W/$v/stage3/final ]; then last=$(ls -d $W/$v/stage3/checkpoints/step-* | tail -1); echo "stopped early; using $last" >> $W/${v}_stage3.log; cp -r $last/model $W/$v/stage3/final; fi
  echo "$v trained $((SECONDS-T0)) s"
  osprey model convert $W/$v/stage3/final --out $W/${v}_bf16 --dtype bfloat16 > $W/${v}_convert.log 2>&1
  python -m bench.region_eval --data $W/data --split test --limit 60 --model $v=$W/$v/stage3/final --out $W/region_$v > $W/region_$v.log 2>&1
  echo "$v done $((SECONDS-T0)) s"
}
run3 box 29600 &
run3 nopos 29601 &
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt 548 ]; do sleep 2; done
jobs -r; pkill -f "bench.region_eval"; sleep 1
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints --exclude=final --exclude=init -C /tmp rb
for v in box nopos; do [ -d $W/${v}_bf16 ] && tar -cf - -C $W ${v}_bf16 | split -b 15m - $OUT/${v}_bf16.tar.part-; done
ls -la $OUT
