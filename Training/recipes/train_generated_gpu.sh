#!/usr/bin/env bash
# One-GPU recipe: generate data -> preprocess -> train the acute and outcome lite models within a
# time budget -> export both bundles.
#
#   bash Training/recipes/train_generated_gpu.sh OUT_DIR [CASES=160] [SECONDS_PER_TASK=180] [MODE=randomized]
#
# Writes OUT_DIR/bundles/{acute,outcome} (model bundles) and OUT_DIR/scratch/{data,cache,runs}.
# `python` must have the requirements. The two tasks train at the same time on the one GPU
# (PARALLEL=0: one after the other). Wall time is about generation + preprocessing +
# SECONDS_PER_TASK (twice with PARALLEL=0) + ~1 min of start-up and export.
# Environment overrides: PARALLEL (1), BATCH (4), DEVICE (cuda), STEPS_PER_EPOCH (200), WORKERS (nproc).
set -euo pipefail
OUT=${1:?usage: train_generated_gpu.sh OUT_DIR [CASES] [SECONDS_PER_TASK] [MODE]}
CASES=${2:-160}
SECONDS_PER_TASK=${3:-180}
MODE=${4:-randomized}
PARALLEL=${PARALLEL:-1}
BATCH=${BATCH:-4}
DEVICE=${DEVICE:-cuda}
STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-200}
WORKERS=${WORKERS:-$(nproc)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$OUT/scratch
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
stamp() { echo "[train_generated_gpu $((SECONDS - start)) s] $*"; }

stamp "generate $CASES cases ($MODE) with $WORKERS workers"
python -m Training generate --out "$WORK/data" --cases "$CASES" --seed 0 --mode "$MODE" --workers "$WORKERS" --overwrite
stamp "preprocess"
python -m Training preprocess --data "$WORK/data" --out "$WORK/cache" --preset lite --workers "$WORKERS" --no-progress

train() {  # task, data-loader workers
  python -m Training train --cache "$WORK/cache" --out "$WORK/runs/$1" --task "$1" --preset lite \
    --device "$DEVICE" --batch-size "$BATCH" --workers "$2" --epochs 100000 --steps-per-epoch "$STEPS_PER_EPOCH" \
    --time-limit "$SECONDS_PER_TASK" --warmup-steps 100 --overwrite --no-progress
}
if [ "$PARALLEL" = 1 ]; then
  stamp "train acute and outcome together, $SECONDS_PER_TASK s"
  train acute $(( WORKERS / 2 > 1 ? WORKERS / 2 : 1 )) & acute=$!
  train outcome $(( WORKERS / 2 > 1 ? WORKERS / 2 : 1 )) & outcome=$!
  wait $acute && wait $outcome
else
  for task in acute outcome; do stamp "train $task, $SECONDS_PER_TASK s"; train $task "$WORKERS"; done
fi

for task in acute outcome; do
  python -m Training export --run "$WORK/runs/$task" --out "$OUT/bundles/$task" \
    --name "strokepredictor-lite-$task" --overwrite
  stamp "$task: $(cat "$WORK/runs/$task/result.json" | tr -d '\n ')"
done
stamp "bundles in $OUT/bundles"
