#!/usr/bin/env bash
# Stage-3 training-step scaling on one host: bench/train_step.py on 1 GPU, then on 2, 4, 8 under a launcher, each
# larger run compared with the 1-GPU one (`--baseline`: scaling_efficiency = tokens/s per GPU at N / at 1).
# One JSON per GPU count in OUT (gpus1.json, gpus2.json, ...), and a table on stdout.
#
#   OUT=bench/results/train_scaling_h100 bash bench/train_scaling.sh        # every power of two up to the GPUs here
#   GPUS="1 2" LAUNCHER=deepspeed bash bench/train_scaling.sh                 # DeepSpeed's launcher, not torchrun
#   SETTING="--preset osprey-7b --zero 3 --batch-size 4 --grad-ckpt" bash bench/train_scaling.sh   # full fine-tune
#   GPUS="1 2" SETTING="--preset tiny --device cpu --no-bf16" bash bench/train_scaling.sh        # CPU ranks (gloo)
#
# SETTING defaults to the fastest one-GPU 7B LoRA setting (docs/train.md). Each rank takes SETTING's per-GPU
# batch, so the global batch grows with N (weak scaling, as the data-parallel recipe trains). Across nodes the same
# runs go through a hostfile (docs/train.md, "several nodes"); this script covers one host.
set -euo pipefail
cd "$(dirname "$0")/.."
SETTING=${SETTING:---preset osprey-7b --lora --zero 2 --batch-size 8 --compile --lora-dropout 0}
LAUNCHER=${LAUNCHER:-torchrun}
STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}
OUT=${OUT:-runs/train_scaling}; mkdir -p "$OUT"
if [ -z "${GPUS:-}" ]; then
  have=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "$have" -ge 1 ] || { echo "train_scaling: no GPU found; name the rank counts with GPUS=\"1 2\"" >&2; exit 2; }
  GPUS=1; n=2; while [ "$n" -le "$have" ]; do GPUS="$GPUS $n"; n=$((n * 2)); done
fi
case " $GPUS " in *" 1 "*) ;; *) echo "train_scaling: GPUS must include 1 (the baseline)" >&2; exit 2 ;; esac

launch() {  # launch N ARGS...: bench/train_step.py on N ranks of this host
  local n=$1; shift
  if [ "$n" = 1 ]; then python bench/train_step.py "$@"; return; fi
  case "$LAUNCHER" in
    torchrun) python -m torch.distributed.run --standalone --nproc_per_node "$n" bench/train_step.py "$@" ;;
    deepspeed) deepspeed --num_gpus "$n" --master_port "${MASTER_PORT:-29517}" bench/train_step.py "$@" ;;
    *) echo "train_scaling: LAUNCHER is torchrun or deepspeed, not $LAUNCHER" >&2; exit 2 ;;
  esac
}

for n in 1 $(echo "$GPUS" | tr ' ' '\n' | grep -vx 1 | sort -n); do
  echo "== $n rank(s): $SETTING (launcher: $LAUNCHER)"
  baseline=(); [ "$n" = 1 ] || baseline=(--baseline "$OUT/gpus1.json")
  # shellcheck disable=SC2086
  launch "$n" $SETTING --steps "$STEPS" --warmup "$WARMUP" "${baseline[@]}" --out "$OUT/gpus$n.json" \
    > "$OUT/gpus$n.log" 2>&1 || { echo "   failed, see $OUT/gpus$n.log" >&2; tail -5 "$OUT/gpus$n.log" >&2; exit 1; }
done

python - "$OUT" $GPUS <<'PY'
import json, sys
out, counts = sys.argv[1], sorted({int(n) for n in sys.argv[2:]})
print("| ranks (GPUs) | tokens/s | tokens/s per rank | MFU per GPU | scaling efficiency |")
print("| --- | --- | --- | --- | --- |")
for n in counts:
    r = json.load(open(f"{out}/gpus{n}.json"))
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] else "-"
    print(f"| {n} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {mfu} | "
          f"{r.get('scaling_efficiency', 1.0):.3f} |")
PY
