"""Metrics against hand-computed values on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from Training.evaluation import metrics as M


def _masks() -> tuple[np.ndarray, np.ndarray]:
    # 1 x 4 x 4 arrays ([k, j, i]); target 4 voxels, prediction 3 voxels, 2 overlapping.
    target = np.zeros((1, 4, 4), bool)
    target[0, 0, 0:4] = True
    prediction = np.zeros((1, 4, 4), bool)
    prediction[0, 0, 2:4] = True
    prediction[0, 3, 3] = True
    return prediction, target


def test_overlap_metrics_hand_computed() -> None:
    prediction, target = _masks()
    # tp=2, fp=1, fn=2, tn=11
    assert M.confusion(prediction, target) == (2, 1, 2, 11)
    assert M.dice(prediction, target) == pytest.approx(4 / 7)
    assert M.iou(prediction, target) == pytest.approx(2 / 5)
    assert M.sensitivity(prediction, target) == pytest.approx(0.5)
    assert M.specificity(prediction, target) == pytest.approx(11 / 12)
    assert M.precision(prediction, target) == pytest.approx(2 / 3)


def test_empty_masks() -> None:
    empty = np.zeros((2, 3, 3), bool)
    some = empty.copy()
    some[0, 0, 0] = True
    assert M.dice(empty, empty) == 1.0
    assert M.iou(empty, empty) == 1.0
    assert M.lesion_f1(empty, empty) == 1.0
    assert M.sensitivity(empty, empty) == 1.0 and M.precision(empty, empty) == 1.0
    assert M.hd95(empty, empty) == 0.0
    assert M.dice(some, empty) == 0.0 and M.dice(empty, some) == 0.0
    assert M.lesion_f1(some, empty) == 0.0  # one false positive
    assert M.lesion_f1(empty, some) == 0.0  # one false negative
    assert math.isnan(M.hd95(some, empty))
    assert M.sensitivity(some, empty) == 0.0
    assert M.precision(empty, some) == 0.0
    assert M.abs_volume_difference_ml(some, empty, 0.008) == pytest.approx(0.008)


def test_lesion_wise_with_several_components_and_26_connectivity() -> None:
    target = np.zeros((5, 5, 5), bool)
    target[0, 0, 0] = True
    target[1, 1, 1] = True  # diagonal neighbour: same lesion under 26-connectivity
    target[4, 4, 4] = True  # second lesion, missed
    target[0, 4, 0] = True  # third lesion, found
    prediction = np.zeros_like(target)
    prediction[1, 1, 1] = True  # hits lesion 1 by one voxel
    prediction[0, 4, 0:2] = True  # hits lesion 3
    prediction[3, 0, 4] = True  # false positive
    prediction[2, 2, 4] = True  # another false positive (not touching the one above)
    assert M.count_lesions(target) == 3
    assert M.count_lesions(prediction) == 4
    assert M.lesion_detection(prediction, target) == (2, 2, 1)
    assert M.lesion_f1(prediction, target) == pytest.approx(2 / (2 + 3 / 2))
    assert M.abs_lesion_count_difference(prediction, target) == 1
    # 4 vs 5 voxels at 2x2x2 mm (0.008 mL each)
    assert M.abs_volume_difference_ml(prediction, target, 0.008) == pytest.approx(0.008)


def test_hd95_uses_spacing() -> None:
    # Two single voxels 3 apart along i; spacing i = 2 mm -> 6 mm; along k with k spacing 5 mm -> 15 mm.
    a = np.zeros((4, 1, 4), bool)
    b = np.zeros_like(a)
    a[0, 0, 0] = True
    b[0, 0, 3] = True
    assert M.hd95(a, b, spacing=(2.0, 1.0, 5.0)) == pytest.approx(6.0)
    c = np.zeros_like(a)
    c[3, 0, 0] = True
    assert M.hd95(a, c, spacing=(2.0, 1.0, 5.0)) == pytest.approx(15.0)
    assert M.hd95(a, a, spacing=(2.0, 1.0, 5.0)) == 0.0


def test_ece_hand_computed() -> None:
    probability = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    target = np.array([0, 0, 1, 0, 1, 1], bool)
    # 10 bins: bin0 mean p 0.05, frac 0 -> gap .05 (w 2/6); bin9 p .95, frac .5 -> .45 (2/6);
    # bin5 p .55 frac 1 -> .45 (2/6). ECE = (0.05 + 0.45 + 0.45) / 3
    assert M.expected_calibration_error(probability, target, n_bins=10) == pytest.approx(0.95 / 3)
    mask = np.array([1, 1, 1, 1, 0, 0], bool)
    assert M.expected_calibration_error(probability, target, mask, n_bins=10) == pytest.approx(0.25)
    bins = M.reliability_bins(np.array([1.0, 0.0]), np.array([1, 0], bool), n_bins=10)
    assert bins.counts[9] == 1 and bins.counts[0] == 1 and bins.ece() == 0.0


def test_auroc_and_error_detection() -> None:
    assert M.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == pytest.approx(0.75)
    assert M.auroc(np.array([0.5, 0.5]), np.array([0, 1], bool)) == pytest.approx(0.5)
    assert math.isnan(M.auroc(np.array([0.1, 0.2]), np.array([1, 1], bool)))
    prediction = np.array([1, 1, 0, 0], bool)
    target = np.array([1, 0, 0, 1], bool)  # errors at 1 and 3
    uncertainty = np.array([0.1, 0.9, 0.2, 0.8])
    assert M.error_detection_auroc(uncertainty, prediction, target) == 1.0


def test_interval_coverage() -> None:
    assert M.volume_in_interval(5.0, (4.0, 6.0))
    assert not M.volume_in_interval(7.0, (4.0, 6.0))
    assert M.interval_coverage([1.0, 5.0, 9.0, 2.0], [(0, 2), (4, 6), (0, 1), (2, 2)]) == pytest.approx(0.75)


def test_accumulator_aggregate_and_reset() -> None:
    prediction, target = _masks()
    acc = M.MetricAccumulator(n_bins=10)
    probability = prediction.astype(float) * 0.9 + 0.05
    acc.update(prediction, target, (1.0, 1.0, 1.0), case_id="a", probability=probability,
               uncertainty=np.abs(probability - 0.5), volume_interval_ml=(0.0, 0.01))
    empty = np.zeros_like(target)
    acc.update(empty, empty, (1.0, 1.0, 1.0), case_id="b", volume_interval_ml=(0.0, 0.0))
    summary = acc.aggregate()
    assert summary["n_cases"] == 2
    dice = summary["metrics"]["dice"]
    assert dice["mean"] == pytest.approx((4 / 7 + 1) / 2)
    assert dice["median"] == pytest.approx((4 / 7 + 1) / 2)
    assert dice["sd"] == pytest.approx(np.std([4 / 7, 1.0], ddof=1))
    assert summary["metrics"]["hd95_mm"]["n"] == 2
    assert summary["volume_interval_coverage"] == pytest.approx(1.0)  # 0.004 in [0, .01]; 0 in [0, 0]
    # pooled ECE over 16 voxels: bin 0 (p .05): 13 voxels, 2 positive; bin 9 (p .95): 3 voxels, 2 positive
    expected = 13 / 16 * abs(2 / 13 - 0.05) + 3 / 16 * abs(2 / 3 - 0.95)
    assert summary["pooled_ece"] == pytest.approx(expected)
    acc.reset()
    assert acc.aggregate()["n_cases"] == 0


def test_summarize_ignores_nan() -> None:
    s = M.summarize([1.0, math.nan, 3.0])
    assert s["mean"] == 2.0 and s["n"] == 2 and s["n_undefined"] == 1


def test_lesion_metrics_by_size_hand_computed() -> None:
    """Voxels of 0.5 mL: a 1-voxel lesion (0.5 mL, < 1 mL) found, a 4-voxel lesion (2 mL) missed,
    a 30-voxel lesion (15 mL) found; predicted components: one 1-voxel false positive (0.5 mL), one
    3-voxel false positive (1.5 mL)."""
    target = np.zeros((10, 10, 10), bool)
    prediction = np.zeros_like(target)
    target[0, 0, 0] = prediction[0, 0, 0] = True
    target[0, 5:7, 5:7] = True
    target[5:8, 0:10, 9] = True
    prediction[6, 3, 9] = True
    prediction[9, 9, 0] = True
    prediction[3, 5:8, 0] = True
    by_size, fp_ml = M.lesion_detection_by_size(prediction, target, 0.5)
    assert by_size == {"lt1ml": (1, 1, 0), "1to10ml": (0, 1, 1), "gt10ml": (1, 0, 0)}
    assert fp_ml == pytest.approx(2.0)
    assert M.lesion_precision(prediction, target) == pytest.approx(2 / 4)
    empty = np.zeros_like(target)
    assert M.lesion_precision(empty, empty) == 1.0 and M.lesion_precision(empty, target) == 0.0
    assert M.lesion_precision(prediction, empty) == 0.0
    acc = M.MetricAccumulator()
    acc.update(prediction, target, (np.cbrt(500.0),) * 3)  # 0.5 mL voxels
    acc.update(empty, target, (np.cbrt(500.0),) * 3)
    summary = acc.aggregate()
    small = summary["by_size"]["lt1ml"]
    assert (small["n_true"], small["tp"], small["fp"], small["fn"]) == (2, 1, 1, 1)
    assert small["f1"] == pytest.approx(1 / (1 + 1)) and small["precision"] == pytest.approx(0.5)
    assert summary["by_size"]["gt10ml"]["sensitivity"] == pytest.approx(0.5)
    assert summary["metrics"]["fp_component_ml"]["mean"] == pytest.approx(1.0)
    assert summary["dice_by_case_volume"]["gt10ml"]["n"] == 2  # 17.5 mL of lesion per case
    assert summary["dice_by_case_volume"]["lt1ml"]["n"] == 0
