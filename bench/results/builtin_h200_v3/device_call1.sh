#!/usr/bin/env bash
# Device call 1 (stop 13, #8): CLIP pretraining of the built-in tower with region embeddings read from every level
# (LevelRegionHead), then the linear probes of clip_probe.json.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
which python python3
nvidia-smi --query-gpu=name,memory.total --format=csv
W=/tmp/rb
(WORK=$W N=20000 S0=2400 S0_TIME=430 UNTIL=clip bash bench/builtin_recipe.sh > /tmp/recipe.log 2>&1) &
pid=$!
while kill -0 $pid 2>/dev/null && [ $SECONDS -lt 555 ]; do sleep 2; done
pkill -f bench.token_norms; sleep 1
cat /tmp/recipe.log; tail -3 $W/clip.log
python - <<'PY'
import json
d = json.load(open("/tmp/rb/clip_probe.json")); print({k: v for k, v in d.items() if "probe" in k})
PY
cp /tmp/recipe.log $W/
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoint.pt -C /tmp rb
[ -f $W/clip/open_clip.safetensors ] && split -b 15m $W/clip/open_clip.safetensors $OUT/open_clip.safetensors.part-
md5sum $W/full/init/tokenizer* $W/clip/open_clip.safetensors
ls -la $OUT
