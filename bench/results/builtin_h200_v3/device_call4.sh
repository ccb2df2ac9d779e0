#!/usr/bin/env bash
# Device call 4 (stop 13, #8): from pass 2 (runs/stop13/pass2), the paper's ablation in fine-tune form, four runs side
# by side with the same 450 stage-3 steps (LLM 3e-4, extractor/projector 1e-4, cosine, batch 256 as 2 x 128):
# (a) full (the next built-in model), (b) box pooling, (c) no position token, (d) res4 only. Then region_eval of each.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
nvidia-smi --query-gpu=name,memory.total --format=csv
W=/tmp/rb; mkdir -p $W
osprey data synth --out $W/data --n 20000 --workers 16 --no-progress > $W/data.log 2>&1
cp -r runs/stop13/pass2 $W/full_start
osprey model derive runs/stop13/pass2 --out $W/box_start --mask-from-box --keep-extractor > $W/derive.log 2>&1
osprey model derive runs/stop13/pass2 --out $W/nopos_start --no-position-token --keep-extractor >> $W/derive.log 2>&1
osprey model derive runs/stop13/pass2 --out $W/res4_start --levels 2 --keep-extractor >> $W/derive.log 2>&1
echo "data, derive $SECONDS s"
run3() {  # variant, master port
  local v=$1
  MASTER_PORT=$2 timeout 400 osprey train --stage 3 --config builtin_stage3 --set data.root=$W/data --set progress=false \
    --set data.num_workers=3 --model $W/${v}_start --output $W/$v --max-steps 450 --set save_steps=150 \
    --set micro_batch_size=128 --set global_batch_size=256 \
    --set optim.lr=3.0e-4 --set optim.warmup_ratio=0.02 --set "optim.part_lr={mask_extractor: 1.0e-4, mm_projector: 1.0e-4}" \
    > $W/${v}.log 2>&1
  if [ ! -d $W/$v/final ]; then last=$(ls -d $W/$v/checkpoints/step-* | tail -1); echo "stopped early; using $last" >> $W/${v}.log; cp -r $last/model $W/$v/final; fi
  echo "$v trained $SECONDS s"
  python -m bench.region_eval --data $W/data --split test --limit 60 --model $v=$W/$v/final --out $W/region_$v > $W/region_$v.log 2>&1
  echo "$v eval $SECONDS s"
}
pids=(); port=29600
for v in full box nopos res4; do run3 $v $port & pids+=($!); port=$((port + 1)); done
alive() { for p in "${pids[@]}"; do kill -0 $p 2>/dev/null && return 0; done; return 1; }
while alive && [ $SECONDS -lt 540 ]; do sleep 2; done
pkill -f bench.region_eval; sleep 1
for v in full box nopos res4; do echo "== $v"; tail -1 $W/$v/metrics.jsonl; grep -h "category \|category@\|pos_neg \|position \|colour " $W/region_$v/region_eval.md; done
osprey model convert $W/full/final --out $W/full_bf16 --dtype bfloat16 > $W/convert.log 2>&1
for v in full box nopos res4; do osprey train plot $W/$v/metrics.jsonl --out $W/curves_$v.png >> $W/convert.log 2>&1; done
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints -C /tmp rb
[ -d $W/full_bf16 ] && tar -cf - -C $W full_bf16 | split -b 15m - $OUT/full_bf16.tar.part-
[ -d $W/full/final ] && tar -cf - -C $W/full final | split -b 15m - $OUT/full_final.tar.part-
ls -la $OUT
