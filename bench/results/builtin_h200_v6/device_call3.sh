#!/usr/bin/env bash
# Device call 3 (stop 17, #8), one GPU, two runs side by side: the box ablation on version 6 as an adaptation test. From version 6's
# weights (in osprey/assets/builtin), one builtin_stage3_final pass each with the same data and time: "full" pools
# each region over its mask (as trained), "box" over its box (`osprey model derive --mask-from-box --keep-extractor`).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w /tmp/ow . 2>&1 | tail -3; python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site /tmp/ow/*.whl 2>&1 | tail -3
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH OMP_NUM_THREADS=2
command -v python >/dev/null || { mkdir -p /tmp/bin; ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH; }
nvidia-smi --query-gpu=name,memory.total --format=csv; C=$(nproc --all); NW=$((C / 2 - 2))
W=/tmp/r17c; mkdir -p $W; D=/tmp/d17s
command -v osprey || exit 3
[ -f $D/manifest.json ] || osprey data synth --out $D --n 20000 --workers $((C - 2)) --no-progress > $W/data.log 2>&1
osprey model derive osprey/assets/builtin --out $W/box_init --mask-from-box --keep-extractor > $W/derive.log 2>&1 || exit 4
echo "data $SECONDS s"; T=$((290 - SECONDS)); echo "time limit $T s"; g=0; port=29641
for v in full box; do
  init=osprey/assets/builtin; [ $v = box ] && init=$W/box_init
  ( CUDA_VISIBLE_DEVICES=0 MASTER_PORT=$port osprey train --stage 3 --config builtin_stage3_final --set data.root=$D \
      --set progress=false --set data.num_workers=$NW --set micro_batch_size=256 --set global_batch_size=256 \
      --set optim.lr=2.5e-4 --set "optim.part_lr={mask_extractor: 1.0e-4, mm_projector: 1.0e-4}" \
      --model $init --output $W/$v --max-steps 4000 --time-limit $T > $W/$v.log 2>&1
    osprey model convert $W/$v/final --out $W/${v}_bf16 --dtype bfloat16 > $W/convert_$v.log 2>&1 ) &
  g=$((g + 1)); port=$((port + 1))
done
while [ -n "$(jobs -r)" ] && [ $SECONDS -lt 365 ]; do sleep 2; done
jobs -r; echo "ended at $SECONDS s"; pkill -f "osprey train"; sleep 2
for v in full box; do
  grep -h "time limit\|Error" $W/$v.log | head -3; tail -1 $W/$v/metrics.jsonl
  if [ ! -f $W/${v}_bf16/model.safetensors ] && [ -d $W/$v/checkpoints ]; then
    last=$(ls -d $W/$v/checkpoints/step-* | tail -1)/model; echo "$v fallback $last"; rm -rf $W/${v}_bf16
    osprey model convert $last --out $W/${v}_bf16 --dtype bfloat16 > $W/convert_$v.log 2>&1
  fi
  [ -d $W/${v}_bf16 ] && tar -cf - -C $W ${v}_bf16 | split -b 15m - $OUT/${v}_bf16.tar.part-
done
tar -czf $OUT/small.tgz --exclude='*.safetensors' --exclude=checkpoints --exclude=final --exclude='*.pt' --exclude='*_bf16' --exclude=box_init -C /tmp r17c
ls -la $OUT; echo "total $SECONDS s"
