#!/usr/bin/env bash
# Device call 2 (stop 13, #8): the built-in model from call 1's CLIP tower (every-level region head):
# stage 1 (50 steps), stage 2 (50), stage 3 (2000-step schedule, stopped at 330 s), norms, bf16, region_eval.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
nvidia-smi --query-gpu=name,memory.total --format=csv
W=/tmp/rb; mkdir -p $W/clip; cp runs/stop13/open_clip.safetensors $W/clip/
(WORK=$W N=20000 S0=2400 S1=50 S2=50 S3=2000 S3_TIMEOUT=330 VARIANTS=full EVAL_LIMIT=60 bash bench/builtin_recipe.sh > $W/recipe.log 2>&1) &
pid=$!
while kill -0 $pid 2>/dev/null && [ $SECONDS -lt 565 ]; do sleep 2; done
pkill -f bench.region_eval; pkill -f bench.token_norms; sleep 1
cat $W/recipe.log; md5sum $W/full/init/tokenizer.json; tail -2 $W/full/stage3/metrics.jsonl; tail -3 $W/full_stage3.log
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints --exclude=clip/checkpoint.pt -C /tmp rb
[ -d $W/full/stage3/final ] && tar -cf - -C $W/full/stage3 final | split -b 15m - $OUT/stage3_final.tar.part-
[ -d $W/builtin_bf16 ] && tar -cf - -C $W builtin_bf16 | split -b 15m - $OUT/builtin_bf16.tar.part-
ls -la $OUT
