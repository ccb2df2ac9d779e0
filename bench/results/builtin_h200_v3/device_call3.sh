#!/usr/bin/env bash
# Device call 3 (stop 13, #8): stage 3, second pass, from call 2's step-1000 model (runs/stop13/s3a): a new
# 2600-step cosine schedule at LLM 5e-4, extractor/projector 1e-4, warm-up 2 %; then norms, bf16, region_eval.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
nvidia-smi --query-gpu=name,memory.total --format=csv
W=/tmp/rb; mkdir -p $W
osprey data synth --out $W/data --n 20000 --workers 16 --no-progress > $W/data.log 2>&1
echo "data $SECONDS s"
(
  timeout 430 osprey train --stage 3 --config builtin_stage3 --set data.root=$W/data --set progress=false \
    --set data.num_workers=15 --model runs/stop13/s3a --output $W/pass2 --max-steps 2600 --set save_steps=500 \
    --set optim.lr=5.0e-4 --set optim.warmup_ratio=0.02 --set "optim.part_lr={mask_extractor: 1.0e-4, mm_projector: 1.0e-4}" \
    > $W/pass2.log 2>&1
  if [ ! -d $W/pass2/final ]; then last=$(ls -d $W/pass2/checkpoints/step-* | tail -1); echo "stopped early; using $last" >> $W/pass2.log; cp -r $last/model $W/pass2/final; fi
  echo "trained $SECONDS s"
  osprey model convert $W/pass2/final --out $W/pass2_bf16 --dtype bfloat16 > $W/convert.log 2>&1
  osprey train plot $W/pass2/metrics.jsonl --out $W/curves_pass2.png >> $W/convert.log 2>&1
  python -m bench.region_eval --data $W/data --split test --limit 60 --model pass2=$W/pass2/final --out $W/region_pass2 > $W/region_pass2.log 2>&1
  echo "eval $SECONDS s"
  python -m bench.token_norms --model $W/pass2/final --data $W/data --images 20 --probe 300 --reliance 64 --template infer \
    --out $W/pass2_norms.json > $W/norms.log 2>&1
  echo "norms $SECONDS s"
) &
pid=$!
while kill -0 $pid 2>/dev/null && [ $SECONDS -lt 565 ]; do sleep 2; done
pkill -f bench.region_eval; pkill -f bench.token_norms; sleep 1
tail -2 $W/pass2/metrics.jsonl; tail -3 $W/pass2.log; tail -30 $W/region_pass2/region_eval.md
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints -C /tmp rb
[ -d $W/pass2_bf16 ] && tar -cf - -C $W pass2_bf16 | split -b 15m - $OUT/pass2_bf16.tar.part-
[ -d $W/pass2/final ] && tar -cf - -C $W/pass2 final | split -b 15m - $OUT/pass2_final.tar.part-
ls -la $OUT
