"""Segmentation and uncertainty metrics: plain functions plus an accumulate/aggregate/reset class.

Conventions:

* Masks are boolean (or 0/1) arrays indexed ``[k, j, i]``; ``spacing`` is given in the
  :class:`StrokePredictorLib.io.Geometry` order ``(i, j, k)`` in mm and reversed internally.
* The ISLES 2022 challenge metrics follow the organisers' definitions (ezequieldlrosa/isles22,
  ``utils/eval_utils.py``): Dice with both-empty = 1; absolute volume difference in mL;
  absolute difference of the number of 26-connected lesions; lesion-wise F1 with 26-connectivity,
  where a ground-truth component is a true positive if any of its voxels overlaps the prediction
  (a false negative otherwise) and a predicted component overlapping no ground-truth voxel is a
  false positive; F1 = tp / (tp + (fp + fn) / 2), and 1 when both masks are empty.
* Empty masks elsewhere: IoU, sensitivity and precision are 1 when their denominator is empty
  because both masks are empty, and 0 when only one mask is empty (nothing found / all wrong);
  specificity is 1 when there is no negative voxel. HD95 is 0 mm when both masks are empty and
  NaN (undefined) when exactly one is empty; aggregation ignores NaN and reports how many
  cases were undefined.

* Lesion size (:data:`SIZE_BINS`: under 1 mL, 1-10 mL, over 10 mL): lesion-wise counts per size
  bin with the ISLES matching, a ground-truth component binned by its own volume (found or missed)
  and an unmatched predicted component (false positive) by its own volume; pooled over cases, per
  bin, sensitivity = tp / (tp + fn), precision = tp / (tp + fp) and F1 = tp / (tp + (fp + fn) / 2)
  (the ISLES F1 restricted to the bin). Per case, the lesion-wise precision tp / (tp + fp) (1 when
  both masks are empty, 0 when only one is) and the false-positive volume: the mL of predicted
  components that touch no ground-truth voxel (on a set of mimics, what the model wrongly marks).
  Dice by size groups the cases by their total lesion volume.

Uncertainty quality:

* expected calibration error (ECE) of the voxel probabilities over brain voxels with equal-width
  bins: ``sum_b n_b / N * |frac_positive_b - mean_probability_b|``;
* AUROC of voxel-wise error detection: how well the uncertainty ranks wrongly classified brain
  voxels above correctly classified ones (0.5 = no better than chance);
* coverage of the lesion-volume interval: the fraction of cases whose true lesion volume lies in
  the predicted 95 % interval (nominal 0.95).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, stats

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)

#: Per-case metric names, in table order.
SEGMENTATION_METRICS: tuple[str, ...] = (
    "dice", "iou", "sensitivity", "specificity", "precision", "hd95_mm",
    "abs_volume_diff_ml", "abs_lesion_count_diff", "lesion_f1", "lesion_precision", "fp_component_ml",
    "volume_true_ml", "volume_pred_ml",
)
#: Lesion-size bins: (key, label, lower mL inclusive, upper mL exclusive).
SIZE_BINS: tuple[tuple[str, str, float, float], ...] = (
    ("lt1ml", "< 1 mL", 0.0, 1.0), ("1to10ml", "1-10 mL", 1.0, 10.0), ("gt10ml", "> 10 mL", 10.0, math.inf))
UNCERTAINTY_METRICS: tuple[str, ...] = ("ece", "error_auroc", "volume_in_interval")


def _as_bool(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(bool, copy=False)


def _check_pair(prediction: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction, target = _as_bool(prediction), _as_bool(target)
    if prediction.shape != target.shape:
        raise ValueError(f"Prediction shape {prediction.shape} differs from ground-truth shape {target.shape}.")
    return prediction, target


def confusion(prediction: np.ndarray, target: np.ndarray) -> tuple[int, int, int, int]:
    """Voxel counts (tp, fp, fn, tn) of two masks of equal shape."""
    prediction, target = _check_pair(prediction, target)
    tp = int(np.count_nonzero(prediction & target))
    fp = int(np.count_nonzero(prediction & ~target))
    fn = int(np.count_nonzero(~prediction & target))
    tn = int(prediction.size - tp - fp - fn)
    return tp, fp, fn, tn


def _ratio(numerator: int, denominator: int, both_empty: float) -> float:
    return both_empty if denominator == 0 else numerator / denominator


def dice(prediction: np.ndarray, target: np.ndarray, empty_value: float = 1.0) -> float:
    """Dice = 2|P∩T| / (|P| + |T|); ``empty_value`` (1) when both masks are empty (ISLES 2022)."""
    tp, fp, fn, _ = confusion(prediction, target)
    return _ratio(2 * tp, 2 * tp + fp + fn, empty_value)


def iou(prediction: np.ndarray, target: np.ndarray, empty_value: float = 1.0) -> float:
    """Jaccard index |P∩T| / |P∪T|; ``empty_value`` when both are empty."""
    tp, fp, fn, _ = confusion(prediction, target)
    return _ratio(tp, tp + fp + fn, empty_value)


def sensitivity(prediction: np.ndarray, target: np.ndarray) -> float:
    """Recall tp / (tp + fn); 1 when the ground truth is empty and nothing is predicted, 0 when
    the ground truth is empty but something is predicted (no lesion to find, only errors)."""
    tp, fp, fn, _ = confusion(prediction, target)
    if tp + fn == 0:
        return 1.0 if fp == 0 else 0.0
    return tp / (tp + fn)


def specificity(prediction: np.ndarray, target: np.ndarray) -> float:
    """tn / (tn + fp); 1 when there is no negative voxel."""
    _, fp, _, tn = confusion(prediction, target)
    return _ratio(tn, tn + fp, 1.0)


def precision(prediction: np.ndarray, target: np.ndarray) -> float:
    """tp / (tp + fp); 1 when both are empty, 0 when nothing is predicted but a lesion exists."""
    tp, fp, fn, _ = confusion(prediction, target)
    if tp + fp == 0:
        return 1.0 if fn == 0 else 0.0
    return tp / (tp + fp)


def _spacing_kji(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    spacing_arr = np.asarray(spacing, dtype=float)
    if spacing_arr.shape != (ndim,):
        raise ValueError(f"spacing must have {ndim} values (i, j, k order), got {spacing!r}.")
    return spacing_arr[::-1]


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)
    return mask & ~eroded


def hd95(prediction: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between mask surfaces, in mm.

    The surface of a mask is its voxels with a 6-neighbour outside it. HD95 is the larger of the
    two directed 95th percentiles (prediction surface to ground truth surface and back), with
    physical distances from ``spacing`` ``(i, j, k)`` mm.

    Returns:
        0.0 when both masks are empty; NaN when exactly one is empty (undefined).
    """
    prediction, target = _check_pair(prediction, target)
    has_p, has_t = prediction.any(), target.any()
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return math.nan
    sampling = _spacing_kji(spacing, prediction.ndim)
    surface_p, surface_t = _surface(prediction), _surface(target)
    to_t = ndimage.distance_transform_edt(~surface_t, sampling=sampling)
    to_p = ndimage.distance_transform_edt(~surface_p, sampling=sampling)
    return float(max(np.percentile(to_t[surface_p], 95), np.percentile(to_p[surface_t], 95)))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a 3-D mask: (labels int32, count)."""
    mask = _as_bool(mask)
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    labels, count = ndimage.label(mask, structure=structure)
    return labels, int(count)


def count_lesions(mask: np.ndarray) -> int:
    """Number of 26-connected lesions."""
    return label_components(mask)[1]


def volume_ml(mask: np.ndarray, voxel_volume_ml: float) -> float:
    """Mask volume in mL (``voxel_volume_ml`` = product of the spacing in mm / 1000)."""
    return float(np.count_nonzero(mask)) * float(voxel_volume_ml)


def abs_volume_difference_ml(prediction: np.ndarray, target: np.ndarray, voxel_volume_ml: float) -> float:
    """ISLES 2022 absolute volume difference |V_pred - V_true| in mL."""
    prediction, target = _check_pair(prediction, target)
    return abs(volume_ml(prediction, voxel_volume_ml) - volume_ml(target, voxel_volume_ml))


def abs_lesion_count_difference(prediction: np.ndarray, target: np.ndarray) -> int:
    """ISLES 2022 absolute difference of the numbers of 26-connected lesions."""
    prediction, target = _check_pair(prediction, target)
    return abs(count_lesions(prediction) - count_lesions(target))


def lesion_detection(prediction: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """Lesion-wise (tp, fp, fn) with 26-connectivity, as ISLES 2022 defines them.

    tp: ground-truth components overlapping the prediction in at least one voxel; fn: the other
    ground-truth components; fp: predicted components overlapping no ground-truth voxel.
    """
    prediction, target = _check_pair(prediction, target)
    labels_t, n_t = label_components(target)
    labels_p, n_p = label_components(prediction)
    found = np.unique(labels_t[prediction & target])
    tp = int(np.count_nonzero(found))
    fn = n_t - tp
    hit = np.unique(labels_p[prediction & target])
    fp = n_p - int(np.count_nonzero(hit))
    return tp, fp, fn


def lesion_f1(prediction: np.ndarray, target: np.ndarray, empty_value: float = 1.0) -> float:
    """ISLES 2022 lesion-wise F1 = tp / (tp + (fp + fn) / 2); ``empty_value`` when both are empty."""
    tp, fp, fn = lesion_detection(prediction, target)
    if tp + fp + fn == 0:
        return empty_value
    return tp / (tp + (fp + fn) / 2)


def lesion_precision(prediction: np.ndarray, target: np.ndarray) -> float:
    """Lesion-wise precision tp / (tp + fp) with the ISLES matching; 1 when both masks are empty,
    0 when only one is (nothing found, or all wrong)."""
    tp, fp, fn = lesion_detection(prediction, target)
    if tp + fp == 0:
        return 1.0 if fn == 0 else 0.0
    return tp / (tp + fp)


def size_bin(volume_ml: float) -> str:
    """The :data:`SIZE_BINS` key of a lesion (or case) volume in mL."""
    for key, _, low, high in SIZE_BINS:
        if low <= volume_ml < high:
            return key
    return SIZE_BINS[-1][0]


def lesion_detection_by_size(prediction: np.ndarray, target: np.ndarray,
                             voxel_volume_ml: float) -> tuple[dict[str, tuple[int, int, int]], float]:
    """Lesion-wise (tp, fp, fn) per size bin and the false-positive volume (mL).

    A ground-truth component counts in the bin of its own volume as tp (any voxel overlaps the
    prediction) or fn; a predicted component that overlaps no ground-truth voxel counts as fp in
    the bin of its own volume, and its volume adds to the false-positive volume.

    Returns:
        ({bin key: (tp, fp, fn)}, false-positive volume in mL).
    """
    prediction, target = _check_pair(prediction, target)
    counts = {key: [0, 0, 0] for key, *_ in SIZE_BINS}
    labels_t, n_t = label_components(target)
    labels_p, n_p = label_components(prediction)
    sizes_t = np.bincount(labels_t.ravel(), minlength=n_t + 1)[1:] * voxel_volume_ml
    sizes_p = np.bincount(labels_p.ravel(), minlength=n_p + 1)[1:] * voxel_volume_ml
    found = np.zeros(n_t + 1, bool)
    found[np.unique(labels_t[prediction & target])] = True
    hit = np.zeros(n_p + 1, bool)
    hit[np.unique(labels_p[prediction & target])] = True
    for index, size in enumerate(sizes_t, start=1):
        counts[size_bin(size)][0 if found[index] else 2] += 1
    fp_volume = 0.0
    for index, size in enumerate(sizes_p, start=1):
        if not hit[index]:
            counts[size_bin(size)][1] += 1
            fp_volume += float(size)
    return {key: (tp, fp, fn) for key, (tp, fp, fn) in counts.items()}, fp_volume


def pooled_by_size(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Pooled lesion-wise counts and rates per size bin over per-case rows that hold
    ``lesions_<bin>_tp``, ``_fp`` and ``_fn`` (as :func:`segmentation_metrics` writes them)."""
    result = {}
    for key, label, _, _ in SIZE_BINS:
        tp, fp, fn = (int(sum(row.get(f"lesions_{key}_{name}", 0) for row in rows)) for name in ("tp", "fp", "fn"))
        result[key] = {"label": label, "n_true": tp + fn, "tp": tp, "fp": fp, "fn": fn,
                       "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
                       "precision": tp / (tp + fp) if tp + fp else math.nan,
                       "f1": tp / (tp + (fp + fn) / 2) if tp + fp + fn else math.nan}
    return result


# ----------------------------------------------------------------------------------------
# Uncertainty quality
# ----------------------------------------------------------------------------------------
@dataclass
class ReliabilityBins:
    """Sufficient statistics of a reliability diagram with equal-width bins on [0, 1].

    Attributes:
        counts: voxels per bin, shape (n_bins,).
        sum_probability: sum of predicted probabilities per bin.
        sum_positive: number of ground-truth positive voxels per bin.
    """

    counts: np.ndarray
    sum_probability: np.ndarray
    sum_positive: np.ndarray

    @classmethod
    def empty(cls, n_bins: int = 15) -> ReliabilityBins:
        return cls(np.zeros(n_bins, np.int64), np.zeros(n_bins), np.zeros(n_bins))

    @property
    def n_bins(self) -> int:
        return int(self.counts.size)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.n_bins + 1)

    def add(self, other: ReliabilityBins) -> ReliabilityBins:
        return ReliabilityBins(self.counts + other.counts, self.sum_probability + other.sum_probability,
                               self.sum_positive + other.sum_positive)

    def mean_probability(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sum_probability / np.maximum(self.counts, 1), np.nan)

    def fraction_positive(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sum_positive / np.maximum(self.counts, 1), np.nan)

    def ece(self) -> float:
        total = int(self.counts.sum())
        if total == 0:
            return math.nan
        used = self.counts > 0
        gap = np.abs(self.fraction_positive()[used] - self.mean_probability()[used])
        return float(np.sum(self.counts[used] / total * gap))

    def to_dict(self) -> dict:
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(),
                "mean_probability": [None if math.isnan(v) else float(v) for v in self.mean_probability()],
                "fraction_positive": [None if math.isnan(v) else float(v) for v in self.fraction_positive()]}


def reliability_bins(probability: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None,
                     n_bins: int = 15) -> ReliabilityBins:
    """Bin voxel probabilities (inside ``mask``, e.g. the brain) into ``n_bins`` equal-width bins.

    A probability of exactly 1 falls into the last bin.
    """
    probability = np.asarray(probability, dtype=np.float64)
    target = _as_bool(target)
    if probability.shape != target.shape:
        raise ValueError(f"Probability shape {probability.shape} differs from ground-truth shape {target.shape}.")
    if mask is not None:
        mask = _as_bool(mask)
        probability, target = probability[mask], target[mask]
    else:
        probability, target = probability.ravel(), target.ravel()
    index = np.clip((np.clip(probability, 0.0, 1.0) * n_bins).astype(np.int64), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.int64)
    sum_probability = np.bincount(index, weights=probability, minlength=n_bins)
    sum_positive = np.bincount(index, weights=target.astype(np.float64), minlength=n_bins)
    return ReliabilityBins(counts, sum_probability, sum_positive)


def expected_calibration_error(probability: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None,
                               n_bins: int = 15) -> float:
    """ECE over the voxels in ``mask`` with ``n_bins`` equal-width bins (NaN if no voxel)."""
    return reliability_bins(probability, target, mask, n_bins).ece()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count one half).

    Computed with the Mann-Whitney U statistic; NaN when one class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = _as_bool(labels).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def error_detection_auroc(uncertainty: np.ndarray, prediction: np.ndarray, target: np.ndarray,
                          mask: np.ndarray | None = None) -> float:
    """AUROC of detecting wrongly classified voxels (prediction != target) by their uncertainty,
    over the voxels in ``mask``; NaN when there is no error or no correct voxel."""
    prediction, target = _check_pair(prediction, target)
    errors = prediction != target
    uncertainty = np.asarray(uncertainty)
    if mask is not None:
        mask = _as_bool(mask)
        return auroc(uncertainty[mask], errors[mask])
    return auroc(uncertainty, errors)


def volume_in_interval(true_volume_ml: float, interval_ml: Sequence[float]) -> bool:
    """Whether the true volume lies in the closed interval ``[lo, hi]`` (mL)."""
    lo, hi = float(interval_ml[0]), float(interval_ml[1])
    return lo <= float(true_volume_ml) <= hi


def interval_coverage(true_volumes_ml: Sequence[float], intervals_ml: Sequence[Sequence[float]]) -> float:
    """Fraction of cases whose true volume lies in its interval (NaN with no case)."""
    if len(true_volumes_ml) != len(intervals_ml):
        raise ValueError("true_volumes_ml and intervals_ml must have the same length.")
    if not len(true_volumes_ml):
        return math.nan
    return float(np.mean([volume_in_interval(v, i) for v, i in zip(true_volumes_ml, intervals_ml, strict=False)]))


# ----------------------------------------------------------------------------------------
# Per-case evaluation and accumulation
# ----------------------------------------------------------------------------------------
def segmentation_metrics(prediction: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """All segmentation metrics of one case (see :data:`SEGMENTATION_METRICS`).

    Args:
        prediction, target: masks ``[k, j, i]``.
        spacing: voxel size (i, j, k) in mm.
    """
    prediction, target = _check_pair(prediction, target)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    by_size, fp_volume = lesion_detection_by_size(prediction, target, voxel_ml)
    counts = {f"lesions_{key}_{name}": float(value) for key, values in by_size.items()
              for name, value in zip(("tp", "fp", "fn"), values, strict=True)}
    return {
        "dice": dice(prediction, target),
        "iou": iou(prediction, target),
        "sensitivity": sensitivity(prediction, target),
        "specificity": specificity(prediction, target),
        "precision": precision(prediction, target),
        "hd95_mm": hd95(prediction, target, spacing),
        "abs_volume_diff_ml": abs_volume_difference_ml(prediction, target, voxel_ml),
        "abs_lesion_count_diff": float(abs_lesion_count_difference(prediction, target)),
        "lesion_f1": lesion_f1(prediction, target),
        "lesion_precision": lesion_precision(prediction, target),
        "fp_component_ml": fp_volume,
        "volume_true_ml": volume_ml(target, voxel_ml),
        "volume_pred_ml": volume_ml(prediction, voxel_ml),
        **counts,
    }


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, sd (ddof=1; 0 for one value), median, min, max and n of the finite values, plus the
    number of undefined (NaN) values."""
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    finite = array[np.isfinite(array)]
    n_undefined = int(array.size - finite.size)
    if finite.size == 0:
        return {"mean": math.nan, "sd": math.nan, "median": math.nan, "min": math.nan, "max": math.nan,
                "n": 0, "n_undefined": n_undefined}
    return {
        "mean": float(finite.mean()),
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "median": float(np.median(finite)),
        "min": float(finite.min()),
        "max": float(finite.max()),
        "n": int(finite.size),
        "n_undefined": n_undefined,
    }


@dataclass
class MetricAccumulator:
    """Accumulate per-case metrics, then aggregate; ``reset`` starts over.

    Example::

        acc = MetricAccumulator(n_bins=15)
        for case in cases:
            acc.update(pred, gt, spacing, case_id=..., probability=p, uncertainty=u, brain=b,
                       volume_interval_ml=(lo, hi))
        summary = acc.aggregate()
    """

    n_bins: int = 15
    rows: list[dict] = field(default_factory=list)
    bins: ReliabilityBins | None = None

    def reset(self) -> None:
        self.rows = []
        self.bins = None

    def update(
        self,
        prediction: np.ndarray,
        target: np.ndarray,
        spacing: Sequence[float],
        *,
        case_id: str | None = None,
        probability: np.ndarray | None = None,
        uncertainty: np.ndarray | None = None,
        brain: np.ndarray | None = None,
        volume_interval_ml: Sequence[float] | None = None,
        extra: dict | None = None,
    ) -> dict:
        """Compute and store the metrics of one case; returns its row.

        Args:
            prediction, target: masks ``[k, j, i]``.
            spacing: voxel size (i, j, k) in mm.
            case_id: identifier stored in the row.
            probability: voxel probabilities (for ECE, over ``brain``).
            uncertainty: voxel uncertainty (for the error-detection AUROC, over ``brain``).
            brain: mask of the voxels over which calibration is measured (default: all).
            volume_interval_ml: predicted 95 % interval of the lesion volume.
            extra: further columns to store (e.g. timings).
        """
        row: dict = {"case_id": case_id if case_id is not None else f"case{len(self.rows)}"}
        row.update(segmentation_metrics(prediction, target, spacing))
        if probability is not None:
            case_bins = reliability_bins(probability, target, brain, self.n_bins)
            row["ece"] = case_bins.ece()
            self.bins = case_bins if self.bins is None else self.bins.add(case_bins)
        if uncertainty is not None:
            row["error_auroc"] = error_detection_auroc(uncertainty, prediction, target, brain)
        if volume_interval_ml is not None:
            row["volume_ci_lo_ml"] = float(volume_interval_ml[0])
            row["volume_ci_hi_ml"] = float(volume_interval_ml[1])
            row["volume_in_interval"] = float(volume_in_interval(row["volume_true_ml"], volume_interval_ml))
        if extra:
            row.update(extra)
        self.rows.append(row)
        return row

    __call__ = update

    def aggregate(self) -> dict:
        """Summary of every numeric column ({name: summarize(...)}) plus, when probabilities were
        given, the pooled ECE and reliability bins over all cases (``"pooled_ece"``,
        ``"reliability"``), the interval coverage (``"volume_interval_coverage"``), the pooled
        lesion-wise counts and rates per size bin (``"by_size"``, :func:`pooled_by_size`) and the
        Dice of the cases grouped by their total lesion volume (``"dice_by_case_volume"``; cases
        without lesion left out)."""
        names: list[str] = []
        for row in self.rows:
            for key, value in row.items():
                if key != "case_id" and key not in names and isinstance(value, (int, float)):
                    names.append(key)
        result: dict = {"n_cases": len(self.rows), "metrics": {
            name: summarize([row[name] for row in self.rows if name in row]) for name in names}}
        if self.bins is not None:
            result["pooled_ece"] = self.bins.ece()
            result["reliability"] = self.bins.to_dict()
        if any("lesions_lt1ml_tp" in row for row in self.rows):
            result["by_size"] = pooled_by_size(self.rows)
            result["dice_by_case_volume"] = {
                key: summarize([row["dice"] for row in self.rows if size_bin(row["volume_true_ml"]) == key
                                and row["volume_true_ml"] > 0]) for key, *_ in SIZE_BINS}
        covered = [row["volume_in_interval"] for row in self.rows if "volume_in_interval" in row]
        if covered:
            result["volume_interval_coverage"] = float(np.mean(covered))
        return result
