#!/usr/bin/env bash
# Device call 3 (stop 15, #8): one annealed stage-3 pass (builtin_stage3_final mix: yes/no 8x, category prompt 2x;
# LLM 3e-4, extractor/projector 2e-4) from version 4 with call 2's carried-on CLIP tower swapped in (probe 87.6 %
# against 82.4 %), fitted into 400 s of training; bf16 copy back (the newest checkpoint stands in if it is cut).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
nvidia-smi --query-gpu=name,memory.total --format=csv
W=/tmp/rb; mkdir -p $W
osprey data synth --out $W/data --n 20000 --workers 16 --no-progress > $W/data.log 2>&1
echo "data $SECONDS s"
MASTER_PORT=29600 osprey train --stage 3 --config builtin_stage3_final --set data.root=$W/data --set progress=false \
  --set data.num_workers=15 --model osprey/assets/builtin --output $W/s3 --max-steps 1800 --time-limit 400 \
  --set clip_weights=runs/stop15/clip_v5.safetensors --set "optim.part_lr={mask_extractor: 2.0e-4, mm_projector: 2.0e-4}" > $W/s3.log 2>&1 &
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt 530 ]; do sleep 2; done
jobs -r; echo "ended at $SECONDS s"; pkill -f "osprey train" ; sleep 2
src=$W/s3/final
if [ ! -d $src ]; then src=$(ls -d $W/s3/checkpoints/step-* | tail -1)/model; echo "cut: using $src"; fi
osprey model convert $src --out $W/s3_bf16 --dtype bfloat16 > $W/convert.log 2>&1
grep -h "time limit\|Error" $W/s3.log | head; tail -1 $W/s3/metrics.jsonl
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints --exclude=final -C /tmp rb
[ -d $W/s3_bf16 ] && tar -cf - -C $W s3_bf16 | split -b 15m - $OUT/s3_bf16.tar.part-
ls -la $OUT; echo "total $SECONDS s"
