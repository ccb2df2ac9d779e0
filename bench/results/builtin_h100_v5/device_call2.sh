#!/usr/bin/env bash
# Device call 2 (stop 15, #8): carry on version 3's CLIP (step 1,460 of 2,400, rate 3.6e-4, not annealed; its
# optimizer state is gone: fresh AdamW, fresh region level head) for its remaining 940 steps, cosine 3.6e-4 -> 0,
# fitted into 250 s; probe it; then one annealed stage-3 pass (builtin_stage3_final mix) from version 4 with the new
# tower swapped in (extractor/projector 2e-4 to re-fit it) if the probe beats version 3's 82.4 %, else from version 4
# as it is.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
nvidia-smi --query-gpu=name,memory.total --format=csv
W=/tmp/rb; mkdir -p $W
osprey data synth --out $W/data --n 20000 --workers 16 --no-progress > $W/data.log 2>&1
echo "data $SECONDS s"
(
osprey train clip --data $W/data --preset builtin --tokenizer osprey/assets/builtin --init runs/stop15/clip_v3.safetensors \
  --out $W/clip --steps 940 --warmup-steps 50 --lr 3.6e-4 --time-limit 250 --num-workers 15 --no-progress > $W/clip.log 2>&1
echo "clip $SECONDS s"
python -m bench.token_norms --model osprey/assets/builtin --clip-weights $W/clip/open_clip.safetensors --data $W/data \
  --images 20 --probe 300 --out $W/clip_probe.json > $W/probe.log 2>&1
echo "probe $SECONDS s"
swap=(); better=$(python -c "import json; print(json.load(open('$W/clip_probe.json'))['probe_pooled_features'] > 0.824)")
echo "probe better than version 3's: $better"
if [ "$better" = True ]; then
  swap=(--set clip_weights=$W/clip/open_clip.safetensors --set "optim.part_lr={mask_extractor: 2.0e-4, mm_projector: 2.0e-4}")
fi
MASTER_PORT=29600 timeout 330 osprey train --stage 3 --config builtin_stage3_final --set data.root=$W/data --set progress=false \
  --set data.num_workers=15 --model osprey/assets/builtin --output $W/s3 --max-steps 1800 --time-limit 190 "${swap[@]}" > $W/s3.log 2>&1
echo "stage 3 $SECONDS s"
osprey model convert $W/s3/final --out $W/s3_bf16 --dtype bfloat16 > $W/convert.log 2>&1
osprey train plot $W/s3/metrics.jsonl --out $W/curves_s3.png >> $W/convert.log 2>&1
osprey train plot $W/clip/metrics.jsonl --out $W/curves_clip.png >> $W/convert.log 2>&1 || true
) &
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt 548 ]; do sleep 2; done
jobs -r; echo "ended at $SECONDS s"
grep -h "time limit\|started from\|wrote" $W/clip.log | head; tail -1 $W/clip/metrics.jsonl; grep probe_pooled $W/clip_probe.json
grep -h "time limit\|resumed\|Error" $W/s3.log | head; tail -1 $W/s3/metrics.jsonl
tar -czf $OUT/small.tgz --exclude=data --exclude='*.safetensors' --exclude=checkpoints --exclude=final -C /tmp rb
[ -d $W/s3_bf16 ] && tar -cf - -C $W s3_bf16 | split -b 15m - $OUT/s3_bf16.tar.part-
[ -f $W/clip/open_clip.safetensors ] && split -b 15m $W/clip/open_clip.safetensors $OUT/open_clip.safetensors.part-
ls -la $OUT; echo "total $SECONDS s"
