#!/usr/bin/env bash
# Device call 1 (stop 15, #8): the dataset, a whole CLIP schedule fitted into 360 s (annealed, --time-limit), its
# probe, stages 1 and 2 (50 steps each) of the full model; the stage-2 model comes back in bf16 for stage 3.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
nvidia-smi --query-gpu=name,memory.total --format=csv
W=/tmp/rb
N=20000 S0=2000 S0_TIME=360 S1=50 S2=50 VARIANTS=full UNTIL=stage2 WORK=$W bash bench/builtin_recipe.sh > /tmp/recipe.log 2>&1 &
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt 535 ]; do sleep 2; done
jobs -r; echo "recipe ended at $SECONDS s"; cat /tmp/recipe.log; cp /tmp/recipe.log $W/
tail -3 $W/clip.log; tail -1 $W/clip/metrics.jsonl; cat $W/clip_probe.json
[ -d $W/full/stage2/final ] && osprey model convert $W/full/stage2/final --out $W/stage2_bf16 --dtype bfloat16 > /dev/null 2>&1
for s in 1 2; do [ -f $W/full/stage$s/metrics.jsonl ] && tail -1 $W/full/stage$s/metrics.jsonl; done
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints --exclude=final -C /tmp rb
[ -d $W/stage2_bf16 ] && tar -cf - -C $W stage2_bf16 | split -b 15m - $OUT/stage2_bf16.tar.part-
[ -f $W/clip/open_clip.safetensors ] && split -b 15m $W/clip/open_clip.safetensors $OUT/open_clip.safetensors.part-
ls -la $OUT; echo "total $SECONDS s"
