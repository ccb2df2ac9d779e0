#!/usr/bin/env bash
# Device call 2 (stop 17, #8), G GPUs: the third annealed stage-3 pass (builtin_stage3_final mix), from call 1's pass, which followed stop 16's first
# pass (2x H100: the carried-on CLIP tower, 753 steps on the 60,000-image dataset; swapped into osprey/assets/builtin for
# the call: the working tree limit), G ranks x 512 = global 512 G, LLM 2.5e-4, extractor/projector 1e-4.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
# the project itself (its `osprey` command and the entry points that register each folder's subcommands)
python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w /tmp/ow . 2>&1 | tail -3; python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site /tmp/ow/*.whl 2>&1 | tail -3
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
nvidia-smi --query-gpu=name,memory.total --format=csv; C=$(nproc --all); G=$(nvidia-smi -L | wc -l)
NW=$((C / G - 2)); [ $NW -gt 14 ] && NW=14; echo "$G GPUs, $C cores, $NW loader workers a rank"
W=/tmp/r17b; mkdir -p $W; D=/tmp/d17
[ -f $D/manifest.json ] || osprey data synth --out $D --n 20000 --extra-train 40000 --workers $((C - 2)) --no-progress > $W/data.log 2>&1
command -v osprey || exit 3; echo "data $SECONDS s"
(
T=$((445 - SECONDS)); echo "stage-3 time limit $T s"
python -m torch.distributed.run --nproc_per_node $G --master_port 29632 -m osprey.cli train --stage 3 \
  --config builtin_stage3_final --set data.root=$D --set progress=false \
  --set data.num_workers=$NW --set micro_batch_size=512 --set global_batch_size=$((512 * G)) --set optim.lr=2.5e-4 \
  --set "optim.part_lr={mask_extractor: 1.0e-4, mm_projector: 1.0e-4}" \
  --model osprey/assets/builtin --output $W/s3 --max-steps 4000 --time-limit $T > $W/s3.log 2>&1
echo "stage 3 $SECONDS s"
osprey model convert $W/s3/final --out $W/s3_bf16 --dtype bfloat16 > $W/convert.log 2>&1
osprey train plot $W/s3/metrics.jsonl --out $W/curves_s3.png >> $W/convert.log 2>&1
) &
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt 555 ]; do sleep 2; done
jobs -r; echo "ended at $SECONDS s"; pkill -f "osprey.cli train"; sleep 3
grep -h "time limit\|data:\|optimizer\|Error\|error" $W/s3.log | head; tail -1 $W/s3/metrics.jsonl
if [ ! -f $W/s3_bf16/model.safetensors ] && [ -d $W/s3/checkpoints ]; then  # cut: the newest checkpoint's model
  last=$(ls -d $W/s3/checkpoints/step-* | tail -1)/model; echo "fallback $last"; rm -rf $W/s3_bf16
  osprey model convert $last --out $W/s3_bf16 --dtype bfloat16 > $W/convert.log 2>&1
fi
tar -czf $OUT/small.tgz --exclude='*.safetensors' --exclude=checkpoints --exclude=final --exclude='*.pt' -C /tmp r17b
[ -d $W/s3_bf16 ] && tar -cf - -C $W s3_bf16 | split -b 15m - $OUT/s3_bf16.tar.part-
ls -la $OUT; echo "total $SECONDS s"
