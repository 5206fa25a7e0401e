#!/usr/bin/env bash
# A CIFAR-10 study: SCE, InfoNCE and ReSSL at one schedule, seeds 0, 1 and 2, one run at a time,
# each into examples/results/cifar10-<loss>-w<WIDTH>-k<PER_CLASS>-seed<N>/. By default the CPU
# scale: ResNet-18 of width 16, the first 1,000 training images of each class, the 10,000 test
# images, 25 epochs, kNN every 5. A run with a summary.json is finished and skipped; one with only
# a checkpoint is resumed. Then examples/study_table.py tabulates them.
#
#   SCE_LOSS_DATA_DIR=/path/to/cifar10 bash examples/study.sh   # the folder of cifar10-jpeg.npz
#   SEEDS=0 LOSSES=sce bash examples/study.sh                   # a part of it
#   WIDTH=64 PER_CLASS=5000 EPOCHS=200 KNN_EVERY=10 bash examples/study.sh   # full scale, a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS=${RESULTS:-examples/results}
DATA_DIR=${SCE_LOSS_DATA_DIR:-data}
SEEDS=${SEEDS:-0 1 2}
LOSSES=${LOSSES:-sce infonce ressl}
WIDTH=${WIDTH:-16}
PER_CLASS=${PER_CLASS:-1000}
EPOCHS=${EPOCHS:-25}
KNN_EVERY=${KNN_EVERY:-5}
declare -A HYPER=(
  [sce]="--coeff 0.5 --temperature 0.1 --target-temperature 0.05"
  [infonce]="--temperature 0.2"
  [ressl]="--temperature 0.1 --target-temperature 0.04"
)
for seed in $SEEDS; do
  for loss in $LOSSES; do
    out="$RESULTS/cifar10-$loss-w$WIDTH-k$PER_CLASS-seed$seed"
    if [[ -f $out/summary.json ]]; then
      echo "finished, skipped: $out"
      continue
    fi
    # shellcheck disable=SC2206  # the hyper-parameters split into flags
    command=(examples/pretrain.py --data cifar10 --data-dir "$DATA_DIR" --per-class "$PER_CLASS"
      --width "$WIDTH" --epochs "$EPOCHS" --knn-every "$KNN_EVERY" --loss "$loss" ${HYPER[$loss]}
      --seed "$seed" --out "$out")
    resume=()
    if [[ -f $out/checkpoint.pt ]]; then
      resume=(--resume)
    fi
    "$PYTHON" "${command[@]}" "${resume[@]}"
    echo "python ${command[*]}  # $(date -u +%F)${resume:+, resumed}" >"$out/command.txt"
  done
done
