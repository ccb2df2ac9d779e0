#!/usr/bin/env bash
# Device call 4 (stop 15, #8), on call 2's still-warm machine: an annealed builtin_stage3_final pass (LLM 3e-4,
# extractor/projector 1e-4) from call 2's pass at step 500 (version 4 + the carried-on CLIP tower), fitted into 340 s.
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
[ -d /tmp/site/deepspeed ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
W=/tmp/rb; ls $W/data/manifest.json $W/s3/checkpoints/step-000500/model || exit 3
MASTER_PORT=29601 osprey train --stage 3 --config builtin_stage3_final --set data.root=$W/data --set progress=false \
  --set data.num_workers=15 --model $W/s3/checkpoints/step-000500/model --output $W/s3b --max-steps 1800 --time-limit 340 > $W/s3b.log 2>&1 &
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt 445 ]; do sleep 2; done
jobs -r; echo "ended at $SECONDS s"; pkill -f "osprey train" ; sleep 2
src=$W/s3b/final
if [ ! -d $src ]; then src=$(ls -d $W/s3b/checkpoints/step-* | tail -1)/model; echo "cut: using $src"; fi
osprey model convert $src --out $W/s3b_bf16 --dtype bfloat16 > $W/convert_b.log 2>&1
osprey train plot $W/s3b/metrics.jsonl --out $W/curves_s3b.png >> $W/convert_b.log 2>&1
grep -h "time limit\|Error" $W/s3b.log | head; tail -1 $W/s3b/metrics.jsonl
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints --exclude=final --exclude=s3_bf16 -C /tmp rb
[ -d $W/s3b_bf16 ] && tar -cf - -C $W s3b_bf16 | split -b 15m - $OUT/s3b_bf16.tar.part-
ls -la $OUT; echo "total $SECONDS s"
