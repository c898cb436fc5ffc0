#!/usr/bin/env bash
# Re-search the shipped bundles' post-processing on validation sets that hold real-scan mimics, embolic
# showers and small lesions, and measure old against new settings on the test sets.
#
#   bash Training/recipes/postprocess_shipped.sh [DATA=data] [REAL=../shared/data/isles22_case0009/ISLES-2022]
#
# Needs the sets of `EARLIER=1 bash Training/recipes/make_eval_sets.sh` in DATA. Copies each bundle as it
# was to DATA/bundles_before/<task> (git-ignored), writes the new post-processing block into
# StrokePredictor/Resources/Models/<task>/model.json (`postprocess --write`: the weights are untouched), and
# evaluates the new settings on every test set and the real validation case (which is never searched on),
# the earlier settings on the new mimic test sets and the real case (their other results are in the cards):
# DATA/pp/<task> (the search tables), DATA/eval/<task>_{before,after} (evaluate outputs).
# Stages can be skipped: STAGES="search after before" (default all three); TASKS="acute outcome" (default both).
# On a CPU shared with training jobs (2 cores, registration and prediction ~80 s per case), BUDGET=1 runs the
# variant that was run for the shipped bundles: validation on the four sets with mimics, regional mimics and
# physical cases, at most 12 cases each; flip averaging fixed on (as shipped before); test sets at most 16
# cases each, only the new mimic sets and the real case; the earlier settings measured on the same cases.
set -euo pipefail
DATA=${1:-data}
REAL=${2:-../shared/data/isles22_case0009/ISLES-2022}
PY=${PYTHON:-python}
STAGES=${STAGES:-search after before}
TASKS=${TASKS:-acute outcome}
MODELS=StrokePredictor/Resources/Models
VAL=(--data "$DATA/val_phys" --data "$DATA/val_rand" --data "$DATA/val_skull" --data "$DATA/val_regional"
     --data "$DATA/val_ood" --data "$DATA/val_mimics" --data "$DATA/val_mimic_only"
     --label val-physical --label val-randomized --label val-skull --label val-regional --label val-ood
     --label val-mimics --label val-mimic-only)
LIMIT=()
if [ "${BUDGET:-0}" = 1 ]; then
    VAL=(--data "$DATA/val_mimics" --data "$DATA/val_mimic_only" --data "$DATA/val_regional" --data "$DATA/val_phys"
         --label val-mimics --label val-mimic-only --label val-regional --label val-physical
         --max-cases 12 --flip-tta true)
    LIMIT=(--max-cases 16)
fi
SIMULATED=(--data "$DATA/test" --data "$DATA/test_regional" --data "$DATA/test_ood" --data "$DATA/test_mimics"
           --data "$DATA/test_mimic_only"
           --label simulated-test --label simulated-regional-mimics --label simulated-OOD --label simulated-mimics
           --label simulated-mimic-only)
for task in $TASKS; do
    TEST=("${SIMULATED[@]}")
    if [ "${BUDGET:-0}" = 1 ]; then  # the new mimic sets only, as the earlier settings
        TEST=(--data "$DATA/test_mimics" --data "$DATA/test_mimic_only" --label simulated-mimics
              --label simulated-mimic-only)
    fi
    if [ "$task" = acute ]; then  # the real case has no follow-up (outcome) mask
        TEST+=(--data "$REAL" --label real-ISLES22)
    fi
    if [[ " $STAGES " == *" search "* ]]; then
        if [ ! -d "$DATA/bundles_before/$task" ]; then
            mkdir -p "$DATA/bundles_before"
            cp -r "$MODELS/$task" "$DATA/bundles_before/$task"
        fi
        start=$SECONDS
        "$PY" -m Training postprocess --bundle "$MODELS/$task" "${VAL[@]}" --out "$DATA/pp/$task" --device cpu \
            --overwrite --write
        echo "searched $task in $((SECONDS - start)) s"
    fi
    if [[ " $STAGES " == *" after "* ]]; then
        start=$SECONDS
        "$PY" -m Training evaluate --bundle "$MODELS/$task" "${TEST[@]}" ${LIMIT[@]+"${LIMIT[@]}"} \
            --out "$DATA/eval/${task}_after" --device cpu --no-progress --overwrite --no-save-predictions
        echo "evaluated $task (new post-processing) in $((SECONDS - start)) s"
    fi
    if [[ " $STAGES " == *" before "* ]]; then  # the earlier settings on the new sets (the others are in the cards)
        BEFORE=(--data "$DATA/test_mimics" --data "$DATA/test_mimic_only" --label simulated-mimics
                --label simulated-mimic-only)
        if [ "$task" = acute ]; then
            BEFORE+=(--data "$REAL" --label real-ISLES22)
        fi
        start=$SECONDS
        "$PY" -m Training evaluate --bundle "$DATA/bundles_before/$task" "${BEFORE[@]}" ${LIMIT[@]+"${LIMIT[@]}"} \
            --out "$DATA/eval/${task}_before" --device cpu --no-progress --overwrite --no-save-predictions
        echo "evaluated $task (earlier post-processing) in $((SECONDS - start)) s"
    fi
done
