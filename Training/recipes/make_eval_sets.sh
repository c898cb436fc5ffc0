#!/usr/bin/env bash
# Fixed evaluation sets with real-scan mimics, embolic showers and small lesions, from
# held-out SOOP lesions only (the 5% validation and 10% test participants of
# Training.synthesis.gpu_synth.participant_split, never used for training), with fixed seeds:
#
#   bash Training/recipes/make_eval_sets.sh [SOOP_DIR=../shared/data/soop] [OUT=data] [WORKERS=2]
#
# Writes OUT/soop_val, OUT/soop_test (links to the held-out lesion files) and, each in the ISLES 2022
# layout (python -m Training generate, byte-identical for the same seed whatever WORKERS is):
#   val_mimics, test_mimics          32 cases each: SOOP lesions with mimics and showers in realistic
#                                    proportions (below)
#   val_mimic_only, test_mimic_only  32 cases each: real-scan mimics with no lesion (half the cases)
#                                    or a single small lesion of 0.02-1 mL
#   test_growth                      12 cases: the clinical growth check of outcome bundles (below)
#   test_gate                        30 cases: data/test's recipe with another seed (a fresh gate)
#   test_ablate                     120 cases: data/test's recipe with a third seed, for the fusion ablation
#   test_ablate2                    120 cases: a fourth seed, a fresh ablation set (test_ablate has judged g21)
#   test_ablate3                    120 cases: a fifth seed (test_ablate2 has judged g22)
#   test_ablate4                    120 cases: a sixth seed (test_ablate3 has judged g23)
#   test_ablate5                    120 cases: a seventh seed (test_ablate4 has judged g24)
#   test_ablate6                    120 cases: an eighth seed (test_ablate5 has judged g25)
#   test_ablate7                    120 cases: a ninth seed (test_ablate6 has judged g26)
#   test_ablate8                    120 cases: a tenth seed (test_ablate7 has judged g27)
#   test_ablate9                    480 cases: an eleventh seed, four times larger (test_ablate8 could
#                                   not decide g28: a 120-case interval is about +-0.013 wide)
# With EARLIER=1 it also rebuilds the earlier validation and test sets of the README
# ("Reproducing the bundled models") with their committed seeds. Each set's wall time is printed.
#
# Proportions of the *_mimics sets: real-scan mimics in 90% of the cases (susceptibility at the
# skull base is seen on most real EPI DWI), an embolic shower in 30% of the cases with a lesion
# (cardio-embolism causes roughly a quarter of ischaemic strokes, and many more cases show several
# acute foci), a single small lesion (0.02-1 mL) in 15%, the rest the held-out SOOP lesion as it is
# (real sizes: many under 1 mL); broad regional DWI hyperintensities in half of the cases; the
# cerebellar cortex's own ADC in all (it is anatomy, not an option, in real scans).
set -euo pipefail
SOOP=${1:-../shared/data/soop}
OUT=${2:-data}
WORKERS=${3:-2}
PY=${PYTHON:-python}
MIX=(--scan-mimics 0.9 --showers 0.3 --small-lesions 0.15 --regional-mimics 0.5 --cerebellar-adc 1.0)
ONLY=(--scan-mimics 1.0 --small-lesions 1.0 --empty-fraction 0.5 --regional-mimics 0.5 --cerebellar-adc 1.0)

"$PY" -m Training synthpack --soop "$SOOP" --skip-pack --heldout-dir "$OUT/soop_val" --heldout-split val
"$PY" -m Training synthpack --soop "$SOOP" --skip-pack --heldout-dir "$OUT/soop_test" --heldout-split test

generate() {  # NAME CASES SEED LESIONS [options...]
    local name=$1 cases=$2 seed=$3 lesions=$4
    shift 4
    local start=$SECONDS
    "$PY" -m Training generate --out "$OUT/$name" --cases "$cases" --seed "$seed" --lesions "$OUT/$lesions" \
        --workers "$WORKERS" "$@"
    echo "generated $OUT/$name ($cases cases, seed $seed) in $((SECONDS - start)) s with $WORKERS worker(s)"
}

generate val_mimics 32 6201 soop_val "${MIX[@]}"
generate val_mimic_only 32 6202 soop_val "${ONLY[@]}"
if [ "${EARLIER:-0}" = 1 ]; then
    generate val_phys 16 5005 soop_val
    generate val_rand 16 5006 soop_val --mode randomized
    generate val_skull 8 5007 soop_val --skull
    generate val_regional 16 5008 soop_val --regional-mimics 1.0
    generate val_ood 16 5009 soop_val --ood
fi
generate test_mimics 32 6101 soop_test "${MIX[@]}"
# the first 12 cases of the earlier test set (byte-identical images and masks: same seed), whose dataset.json
# records each case's simulated final infarct under thrombectomy at 1 h and no treatment at 20 h, for
# python -m Training behaviour --data OUT/test_growth
generate test_growth 12 1001 soop_test
generate test_mimic_only 32 6102 soop_test "${ONLY[@]}"
if [ "${EARLIER:-0}" = 1 ]; then
    generate test 30 1001 soop_test
    generate test_ood 16 2002 soop_test --ood
    generate test_regional 20 3003 soop_test --regional-mimics 1.0
fi
# the recipe of the 30-case test set with a new seed: a gate for outcome candidates that no earlier candidate
# was judged on (the outcome model card, selection g17)
generate test_gate 30 1101 soop_test
# the same recipe, four times as many cases and a third seed: the fusion ablation's set (outcome model card, g20),
# whose interval is about half as wide as on a 30-case set
generate test_ablate 120 1401 soop_test
# test_ablate and test_gate judged outcome run g21: the next outcome candidate is judged on a set no candidate has seen
generate test_ablate2 120 1402 soop_test
# test_ablate2 judged g22: g23 is judged on a fifth seed
generate test_ablate3 120 1403 soop_test
# test_ablate3 judged g23: g24 is judged on a sixth seed
generate test_ablate4 120 1404 soop_test
# test_ablate4 judged g24: g25 is judged on a seventh seed
generate test_ablate5 120 1405 soop_test
# test_ablate5 judged g25: g26 is judged on an eighth seed
generate test_ablate6 120 1406 soop_test
# test_ablate6 judged g26: g27 is judged on a ninth seed
generate test_ablate7 120 1407 soop_test
generate test_ablate8 120 1408 soop_test
generate test_ablate9 480 1409 soop_test
