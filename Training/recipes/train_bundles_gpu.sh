#!/usr/bin/env bash
# Reproduce the shipped model bundles on one CUDA GPU (an H100 needs about 7 minutes).
#
#   bash Training/recipes/train_bundles_gpu.sh PACK OUT [TRAIN_SECONDS] [WORKERS]
#
# PACK: the synthesis pack, built once on any machine with nilearn and the SOOP library:
#       python -m Training synthpack --soop ../shared/data/soop --out pack.npz
# OUT:  receives runs/<variant>/ (checkpoints, log.csv), bundles/<variant>/ (safetensors +
#       model.json) and gpu_benchmark.json. The four variants (acute and outcome, each with the
#       clinical fusion and imaging-only) train in lockstep on the same synthesised batches, so
#       the fusion ablation is paired. Needs torch, numpy, scipy, pyyaml, tqdm and monai only.
set -euo pipefail
PACK=${1:?usage: train_bundles_gpu.sh PACK OUT [TRAIN_SECONDS] [WORKERS]}
OUT=${2:?usage: train_bundles_gpu.sh PACK OUT [TRAIN_SECONDS] [WORKERS]}
SECONDS_BUDGET=${3:-360}
WORKERS=${4:-14}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
# For a quick dry run on a CPU: DEVICE=cpu EXTRA_TRAIN_ARGS="--grid-size 48,64,48 --batch-size 2
#   --val-samples 2 --val-every 2" BENCH_ARGS="--grid 48,64,48 --batch-size 2 --repeats 1"
read -r -a EXTRA <<< "${EXTRA_TRAIN_ARGS:-}"
read -r -a BENCH <<< "${BENCH_ARGS:-}"
mkdir -p "$OUT"
train() {
  "$PYTHON" -m Training train-synth --pack "$PACK" --out "$OUT/runs" --device "$DEVICE" \
    --time-limit "$SECONDS_BUDGET" --batch-size 8 --reuse 2 --lr 2e-3 --workers "$WORKERS" \
    --val-every 150 --val-samples 48 --seed 0 --overwrite "${EXTRA[@]}" "$@"
}
# bf16 + channels-last first; plain fp32 if that fails on this GPU/driver.
train || { echo "bf16 run failed; retrying in fp32" >&2; train --precision fp32 --no-channels-last; }
for variant in acute acute-imaging outcome outcome-imaging; do
  "$PYTHON" -m Training export --run "$OUT/runs/$variant" --out "$OUT/bundles/$variant" \
    --name "strokepredictor-$variant" --overwrite
done
"$PYTHON" Testing/benchmarks/bench_gpu.py --pack "$PACK" --out "$OUT/gpu_benchmark.json" --workers "$WORKERS" \
  --device "$DEVICE" "${BENCH[@]}" || true
