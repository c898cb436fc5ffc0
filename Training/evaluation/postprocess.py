"""``python -m Training postprocess``: choose a bundle's post-processing on validation data.

    python -m Training postprocess --bundle DIR --data VAL1 [--data VAL2 ...] --out OUT [--write [--force]]
    python -m Training postprocess --bundle DIR --data ISLES --split split.json --subset val --out OUT

Every case of every ``--data`` folder (ISLES 2022 layout, with ground truth) runs once through
:class:`StrokePredictorLib.inference.Predictor` with and without left-right flip averaging; the
probability on the DWI grid is then thresholded at every ``--thresholds`` value and its connected
components are kept or removed by every combination of the component rules of
:class:`StrokePredictorLib.postprocess.PostProcessing`: the smallest size (``--min-components-ml``),
the ADC gate on the median ADC (``--max-component-adcs``, 10^-3 mm^2/s; 0: none), the mean
probability (``--min-component-probabilities``; the predictive entropy is a function of it) and the
stricter ADC gate for small components (``--small-components-ml`` x ``--small-component-adcs``).
Components are labelled once per case and threshold; every setting is then scored from the
components' sizes, overlaps and statistics, which gives exactly the metrics of the resulting mask.

Selection rule (written down before any result of this search on the mimic sets was seen):

1. Per validation set and setting, averaged over the set's cases: Dice (both empty = 1), the
   volume agreement ``exp(-|ln((V_pred + 1 mL) / (V_true + 1 mL))|)`` (1 when right, 0.5 when off
   by a factor of two), the ISLES lesion-wise F1, and the lesion-wise precision tp / (tp + fp)
   (1 when both masks are empty, 0 when only one is).
2. Plausibility bound: a setting is implausible when, on any set, its mean predicted volume + 1 mL
   exceeds ten times the mean true volume + 1 mL, or the median over cases of
   (V_pred + 1) / (V_true + 1) exceeds ten. An implausible setting is never chosen when a plausible
   one exists (a model that marks the whole brain at some threshold gets a perfect lesion-wise F1
   and precision from one blob touching the lesion; the bound, and the weight on Dice and volume,
   stop it).
3. Score = mean over the sets of 0.35 Dice + 0.35 volume agreement + 0.15 lesion F1 + 0.15 lesion
   precision: Dice and volume error carry 70% of the weight, so every validation set counts equally.
4. Small lesions: a setting that removes every component under 0.5 mL (``min_component_ml`` >= 0.5)
   is eligible only if its lesion-wise F1 on true lesions under 1 mL, pooled over all validation
   cases, is at least that of the best-scoring plausible setting that keeps them.
5. The highest score among the plausible, eligible settings wins; a tie (to 1e-6) goes to the simpler
   setting: no flip, threshold nearer 0.5, fewer component rules, a smaller size limit, no or a more
   lenient ADC gate.
6. Only settings that the installed Predictor applies can be written: a combined component rule
   (mean probability or the small-component gate) needs a Predictor that applies
   :meth:`PostProcessing.apply` (``StrokePredictorLib.inference.COMPONENT_RULE``); otherwise the best
   setting without them is written, and the best overall is reported beside it.
7. A degenerate choice is refused unless ``--force``: no plausible setting, a mean Dice below 0.05
   over the sets, or an empty mask on every validation case that has a lesion. The table is still
   written and printed.
8. A bundle that grows the core by volume (``growth_volume``, run g21's outcome network) is searched
   with thresholds and size limits alone (:func:`for_growth_by_volume`): a gate on a component's median
   ADC, or a smallest mean probability, could remove a component because it grew, which would break the
   orderings in onset time and treatment.
9. Guard (``--guard FILE --guard-sets LABELS``, optional): a reference block (e.g. the one the bundle
   shipped with before this search existed) that the choice must beat where it matters most. It is
   scored in the same table (added to the grid when missing), and a setting is eligible only if, on
   every guard set, its mean false-positive volume per case is below the reference's, and its pooled
   lesion-wise F1 on lesions under 1 mL is above the reference's (both strictly). When no setting
   passes, the choice of rules 1-7 is made and ``guard.met`` in the result says so.

For the chosen setting, the split-conformal margin of the 95% lesion-volume interval is computed
over all the validation cases (:func:`StrokePredictorLib.postprocess.conformal_log_margin`). The
result is written to ``OUT/postprocess.json`` with the whole table (and ``OUT/postprocess.md``, the
table it chose from, also printed) and, with ``--write``, into the bundle's ``model.json``
(``postprocessing``), which every prediction then uses (:mod:`StrokePredictorLib.postprocess`). The
weights and their checksum are not touched.

Use validation cases only: never the test split, the out-of-distribution set or a real validation
case, which must stay unseen for the reported results.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib.errors import OutputExistsError, StrokePredictorError
from StrokePredictorLib.io import write_json
from StrokePredictorLib.postprocess import (
    PostProcessing,
    component_means,
    component_medians,
    conformal_log_margin,
    label_components,
    read_block,
)
from Training import config as config_mod
from Training.evaluation import metrics as M
from Training.evaluation.evaluate import EvaluateConfig, _clinical_of, collect, ground_truth_path, read_case

logger = logging.getLogger(__name__)

#: Weights of the score (rule 3 of the module docstring).
WEIGHTS = {"dice": 0.35, "volume_agreement": 0.35, "lesion_f1": 0.15, "lesion_precision": 0.15}
#: Plausibility bound: predicted volume (+1 mL) at most this many times the true volume (+1 mL).
PLAUSIBLE_RATIO = 10.0
#: Rule 4: a size limit at or above this removes every small lesion and must show that they gain.
SMALL_LIMIT_ML = 0.5
#: The fields of :class:`PostprocessConfig` that make the grid of settings (a search is only comparable to
#: another made on the same grid).
SEARCH_GRID_FIELDS = ("thresholds", "min_components_ml", "max_component_adcs", "min_component_probabilities",
                      "small_components_ml", "small_component_adcs")
#: Rule 7: below this mean Dice over the sets a choice is degenerate.
DEGENERATE_DICE = 0.05


class DegenerateChoiceError(StrokePredictorError):
    """The best setting is degenerate (implausible, empty or without overlap); --force writes it anyway."""


@dataclass(frozen=True)
class PostprocessConfig:
    """Options of ``python -m Training postprocess``."""

    bundle: Path | None = field(default=None, metadata={"help": "model bundle folder (required)"})
    data: tuple[Path, ...] = field(default=(), metadata={"help": "validation folder(s), ISLES 2022 layout"})
    label: tuple[str, ...] = field(default=(), metadata={"help": "one name per --data (default: folder names)"})
    split: Path | None = field(default=None, metadata={"help": "split.json restricting the FIRST --data folder"})
    subset: str = field(default="val", metadata={"help": "subset of --split to search on (train|val|test)"})
    out: Path | None = field(default=None, metadata={"help": "output folder for the table (required)"})
    thresholds: tuple[float, ...] = field(default=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                                          metadata={"help": "probability thresholds to try"})
    min_components_ml: tuple[float, ...] = field(default=(0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
                                                 metadata={"help": "smallest kept component sizes to try (mL)"})
    flip_tta: tuple[bool, ...] = field(default=(False, True), metadata={"help": "flip averaging off / on"})
    # Real-scan false positives had a median ADC of 0.82-0.91 x10^-3 mm^2/s and true lesions 0.55-0.73
    # (../shared/ARCHITECTURE.md, "Real scans", several real scans); subtle cortical lesions lie near 0.8.
    # The validation sets, which now hold those mimics, decide among the gates.
    max_component_adcs: tuple[float, ...] = field(
        default=(0.0, 0.75, 0.8, 0.85, 0.9),
        metadata={"help": "ADC gates to try: components with a median ADC at or above this (10^-3 mm^2/s) "
                          "are removed; 0: no gate"})
    min_component_probabilities: tuple[float, ...] = field(
        default=(0.0, 0.6, 0.7, 0.8),
        metadata={"help": "smallest mean probability of a kept component to try; 0: none"})
    small_components_ml: tuple[float, ...] = field(
        default=(0.0, 0.5, 1.0, 2.0),
        metadata={"help": "sizes under which a component must pass the stricter small-component ADC gate; 0: none"})
    small_component_adcs: tuple[float, ...] = field(
        default=(0.75, 0.8), metadata={"help": "stricter ADC gates of small components to try (10^-3 mm^2/s)"})
    guard: Path | None = field(default=None, metadata={
        "help": "JSON file with a reference post-processing block (the model.json 'postprocessing' fields, under "
                "'postprocessing'): the choice must have a lower false-positive volume per case on every "
                "--guard-sets set and a higher F1 on lesions under 1 mL than it (rule 9)"})
    guard_sets: tuple[str, ...] = field(default=(), metadata={
        "help": "labels of the validation sets the --guard compares false-positive volumes on (e.g. the mimic sets)"})
    mc_samples: int = field(default=20, metadata={"help": "Monte-Carlo dropout samples"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    max_cases: int = field(default=0, metadata={"help": "at most this many cases per folder (0: all)"})
    write: bool = field(default=False, metadata={"help": "store the best post-processing in the bundle"})
    force: bool = field(default=False, metadata={"help": "with --write, store even a degenerate choice"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier table in --out"})

    def __post_init__(self) -> None:
        for t in self.thresholds:
            if not 0.0 < t < 1.0:
                raise ValueError(f"thresholds must lie strictly between 0 and 1, got {t}")
        for name in ("min_components_ml", "max_component_adcs", "small_components_ml", "small_component_adcs"):
            for v in getattr(self, name):
                if not v >= 0:
                    raise ValueError(f"{name} must be >= 0, got {v}")
        for v in self.min_component_probabilities:
            if not 0.0 <= v < 1.0:
                raise ValueError(f"min_component_probabilities must lie in [0, 1), got {v}")
        if not (self.thresholds and self.min_components_ml and self.flip_tta and self.max_component_adcs
                and self.min_component_probabilities and self.small_components_ml and self.small_component_adcs):
            raise ValueError("give at least one value of every searched setting")
        if (self.guard is None) != (not self.guard_sets):
            raise ValueError("give --guard and --guard-sets together")

    def grid(self) -> list[PostProcessing]:
        """Every combination of the component rules at every threshold (without flip; distinct)."""
        small = [(0.0, 0.0)] + [(ml, adc) for ml in self.small_components_ml if ml > 0
                                for adc in self.small_component_adcs if adc > 0]
        settings = []
        for threshold, min_ml, gate, probability, (small_ml, small_adc) in itertools.product(
                self.thresholds, self.min_components_ml, self.max_component_adcs, self.min_component_probabilities,
                small):
            post = PostProcessing(threshold=threshold, min_component_ml=min_ml, max_component_adc=gate,
                                  min_component_probability=probability, small_component_ml=small_ml,
                                  small_component_adc=small_adc)
            if post not in settings:
                settings.append(post)
        return settings


#: Per-case values of one setting, in this order (the rows of :func:`score_case`).
CASE_FIELDS = ("dice", "lesion_f1", "pred_ml", "lesion_precision", "fp_component_ml",
               *(f"lesions_{key}_{name}" for key, *_ in M.SIZE_BINS for name in ("tp", "fp", "fn")))


def score_case(probability: np.ndarray, truth: np.ndarray, voxel_ml: float, settings: list[PostProcessing],
               adc: np.ndarray | None = None) -> np.ndarray:
    """The per-case values (:data:`CASE_FIELDS`) of every setting, float64 ``(len(settings), len(CASE_FIELDS))``.

    The ground truth and, per threshold, the prediction are labelled once (26-connectivity); each
    setting then keeps a subset of the predicted components, and Dice, the lesion-wise counts (ISLES
    matching: a true lesion is found when any voxel is predicted), the counts per lesion-size bin and
    the false-positive volume follow from the components' sizes and overlaps exactly as
    :mod:`Training.evaluation.metrics` computes them on the final mask (removing whole components merges
    nothing). ``adc`` (10^-3 mm^2/s, the probability's grid) is needed when a setting has an ADC rule.
    """
    truth = np.asarray(truth, bool)
    labels_t, n_t = M.label_components(truth)
    sizes_t = np.bincount(labels_t.ravel(), minlength=n_t + 1)[1:] * voxel_ml
    bin_of = {key: index for index, (key, *_) in enumerate(M.SIZE_BINS)}
    truth_bins = np.array([bin_of[M.size_bin(v)] for v in sizes_t], int)
    truth_voxels = int(truth.sum())
    out = np.zeros((len(settings), len(CASE_FIELDS)))
    for threshold in sorted({post.threshold for post in settings}):
        labels, sizes_ml = label_components(probability >= threshold, voxel_ml)
        count = sizes_ml.size
        inside = labels > 0
        both = inside & truth
        overlap = np.bincount(labels[both], minlength=count + 1)[1:]
        codes = np.unique(labels[both].astype(np.int64) * (n_t + 1) + labels_t[both])
        pairs = np.stack([codes // (n_t + 1), codes % (n_t + 1)])  # (predicted, true) labels that overlap
        chosen = [n for n, post in enumerate(settings) if post.threshold == threshold]
        needs_adc = any(settings[n].needs_adc for n in chosen)
        medians = component_medians(adc, labels, count) if needs_adc and count else (np.zeros(count) if needs_adc
                                                                                     else None)
        means = component_means(probability, labels, count) if any(
            settings[n].min_component_probability > 0 for n in chosen) else None
        pred_bins = np.array([bin_of[M.size_bin(v)] for v in sizes_ml], int)
        distinct: dict[bytes, np.ndarray] = {}
        for n in chosen:
            kept = settings[n].keep(sizes_ml, medians, means) if count else np.zeros(0, bool)
            key = kept.tobytes()
            if key not in distinct:
                distinct[key] = _values(kept, sizes_ml, overlap, pairs, truth_bins, pred_bins, n_t, truth_voxels,
                                        voxel_ml)
            out[n] = distinct[key]
    return out


def _values(kept: np.ndarray, sizes_ml: np.ndarray, overlap: np.ndarray, pairs: np.ndarray, truth_bins: np.ndarray,
            pred_bins: np.ndarray, n_t: int, truth_voxels: int, voxel_ml: float) -> np.ndarray:
    pred_ml = float(sizes_ml[kept].sum())
    pred_voxels = int(round(pred_ml / voxel_ml))
    intersection = int(overlap[kept].sum())
    dice = 1.0 if pred_voxels + truth_voxels == 0 else 2 * intersection / (pred_voxels + truth_voxels)
    found = np.zeros(n_t, bool)
    if pairs.size:
        hits = pairs[1][kept[pairs[0] - 1]]
        found[hits - 1] = True
    unmatched = kept & (overlap == 0)
    tp, fp = int(found.sum()), int(unmatched.sum())
    fn = n_t - tp
    f1 = 1.0 if tp + fp + fn == 0 else tp / (tp + (fp + fn) / 2)
    precision = (1.0 if fn == 0 else 0.0) if tp + fp == 0 else tp / (tp + fp)
    per_bin = []
    for index in range(len(M.SIZE_BINS)):
        in_bin = truth_bins == index
        per_bin += [int((found & in_bin).sum()), int((unmatched & (pred_bins == index)).sum()),
                    int((~found & in_bin).sum())]
    return np.array([dice, f1, pred_ml, precision, float(sizes_ml[unmatched].sum()), *per_bin], float)


def volume_agreement(predicted_ml: np.ndarray, true_ml: np.ndarray) -> np.ndarray:
    """``exp(-|ln((V_pred + 1) / (V_true + 1))|)`` per case: 1 when right, 0.5 when off by a factor of two."""
    return np.exp(-np.abs(np.log((np.asarray(predicted_ml) + 1.0) / (np.asarray(true_ml) + 1.0))))


def setting_key(row: dict) -> tuple:
    return (row["flip_tta"], row["threshold"], row["min_component_ml"], row["max_component_adc"],
            row.get("min_component_probability", 0.0), row.get("small_component_ml", 0.0),
            row.get("small_component_adc", 0.0))


def post_key(post: PostProcessing) -> tuple:
    """:func:`setting_key` of a block: the key of its row in the table."""
    return (post.flip_tta, post.threshold, post.min_component_ml, post.max_component_adc,
            post.min_component_probability, post.small_component_ml, post.small_component_adc)


def build_table(settings: list[PostProcessing], flips: tuple[bool, ...], per_set: dict[str, dict[bool, np.ndarray]],
                true_by_set: dict[str, np.ndarray]) -> list[dict]:
    """One row per (flip, setting): per-set means, the plausibility checks and the score (rules 1-3).

    Args:
        per_set: label -> flip -> ``(n_settings, n_cases, len(CASE_FIELDS))`` per-case values.
        true_by_set: label -> true volumes (mL) of the set's cases.
    """
    field_index = {name: n for n, name in enumerate(CASE_FIELDS)}
    table = []
    for flip in flips:
        for n, post in enumerate(settings):
            row: dict = {"flip_tta": flip, "threshold": post.threshold, "min_component_ml": post.min_component_ml,
                         "max_component_adc": post.max_component_adc,
                         "min_component_probability": post.min_component_probability,
                         "small_component_ml": post.small_component_ml,
                         "small_component_adc": post.small_component_adc}
            set_scores, plausible, small = [], True, np.zeros(3)
            for label, flips_values in per_set.items():
                values = flips_values[flip][n]  # (n_cases, fields)
                true_ml = true_by_set[label]
                predicted = values[:, field_index["pred_ml"]]
                agreement = volume_agreement(predicted, true_ml)
                means = {"dice": values[:, 0].mean(), "lesion_f1": values[:, 1].mean(),
                         "lesion_precision": values[:, 3].mean(), "volume_agreement": agreement.mean()}
                for key, value in means.items():
                    row[f"{label}_{key}"] = float(value)
                row[f"{label}_abs_volume_diff_ml"] = float(np.abs(predicted - true_ml).mean())
                row[f"{label}_fp_component_ml"] = float(values[:, field_index["fp_component_ml"]].mean())
                ratio_of_means = (predicted.mean() + 1.0) / (true_ml.mean() + 1.0)
                median_ratio = float(np.median((predicted + 1.0) / (true_ml + 1.0)))
                row[f"{label}_volume_ratio"] = float(ratio_of_means)
                row[f"{label}_median_volume_ratio"] = median_ratio
                plausible &= bool(ratio_of_means <= PLAUSIBLE_RATIO and median_ratio <= PLAUSIBLE_RATIO)
                set_scores.append(sum(WEIGHTS[key] * means[key] for key in WEIGHTS))
                small += values[:, [field_index[f"lesions_lt1ml_{name}"] for name in ("tp", "fp", "fn")]].sum(axis=0)
            tp, fp, fn = small
            row["small_lesions_n"] = int(tp + fn)
            row["small_lesion_f1"] = float(tp / (tp + (fp + fn) / 2)) if tp + fp + fn else math.nan
            row["plausible"] = plausible
            row["mean_dice"] = float(np.mean([row[f"{label}_dice"] for label in per_set]))
            row["score"] = float(np.mean(set_scores))
            table.append(row)
    return table


def _simplicity(row: dict) -> tuple:
    rules = sum([row["min_component_ml"] > 0, row["max_component_adc"] > 0, row["min_component_probability"] > 0,
                 row["small_component_ml"] > 0])
    gate = row["max_component_adc"]
    return (not row["flip_tta"], -abs(row["threshold"] - 0.5), -rules, -row["min_component_ml"], gate == 0, gate,
            -row["min_component_probability"], -row["small_component_ml"], row["small_component_adc"])


def choose(table: list[dict], *, applies_component_rule: bool = True, guard: dict | None = None,
           guard_sets: tuple[str, ...] = ()) -> dict:
    """The chosen row by the selection rule of the module docstring (rules 2-6, and rule 9 with a
    ``guard`` row of the table and its ``guard_sets``); every row gets ``eligible`` (bool) and
    ``excluded_because`` (text) set."""
    for row in table:
        row["eligible"], row["excluded_because"] = True, ""
        if not row.get("plausible", True):
            row["eligible"], row["excluded_because"] = False, "implausible volumes"
        elif not applies_component_rule and (row.get("min_component_probability", 0) > 0
                                             or row.get("small_component_ml", 0) > 0):
            row["eligible"], row["excluded_because"] = False, "the installed Predictor does not apply this rule"
    keeps_small = small_lesion_reference(table)
    reference = keeps_small["small_lesion_f1"] if keeps_small is not None else math.nan
    for row in table:
        if row["eligible"] and row["min_component_ml"] >= SMALL_LIMIT_ML and math.isfinite(reference):
            f1 = row.get("small_lesion_f1", math.nan)
            if not (math.isfinite(f1) and f1 >= reference):
                row["eligible"] = False
                row["excluded_because"] = (f"removes lesions under {SMALL_LIMIT_ML:g} mL without a gain on them "
                                           f"(F1 < 1 mL {f1:.3f} against {reference:.3f})")
    if guard is not None:
        failing = [(row, guard_failures(row, guard, guard_sets)) for row in table if row["eligible"]]
        if not all(failures for _, failures in failing):  # rule 9; when nothing passes, rules 1-7 choose
            for row, failures in failing:
                if failures:
                    row["eligible"], row["excluded_because"] = False, "guard: " + "; ".join(failures)
    chosen = _best([r for r in table if r["eligible"]])
    return chosen if chosen is not None else _best(table)  # nothing eligible: the best of all (degenerate)


def guard_failures(row: dict, guard: dict, guard_sets: tuple[str, ...]) -> list[str]:
    """Why ``row`` does not beat the ``guard`` row (rule 9); empty when it does."""
    failures = [f"false positives on {label} {row[f'{label}_fp_component_ml']:.3f} mL/case, not below "
                f"{guard[f'{label}_fp_component_ml']:.3f}" for label in guard_sets
                if not row[f"{label}_fp_component_ml"] < guard[f"{label}_fp_component_ml"]]
    f1, reference = row.get("small_lesion_f1", math.nan), guard.get("small_lesion_f1", math.nan)
    if not (math.isfinite(f1) and (not math.isfinite(reference) or f1 > reference)):
        failures.append(f"F1 < 1 mL {f1:.3f}, not above {reference:.3f}")
    return failures


def read_guard(path: Path) -> PostProcessing:
    """The reference block of rule 9 from ``path`` (a JSON object with a ``postprocessing`` block, as
    in ``model.json``)."""
    return read_block(path, "--guard")


def small_lesion_reference(table: list[dict]) -> dict | None:
    """Rule 4's reference: the best-scoring eligible setting that keeps components under 0.5 mL.

    Its lesion-wise F1 under 1 mL measures how many small lesions the network finds when the
    post-processing may not delete them all; the campaign compares bundles on it. Needs the
    eligibility marks of :func:`choose` (plausibility, Predictor support), which rule 4 does not
    change for these rows.
    """
    return _best([r for r in table if r.get("eligible", True) and r["min_component_ml"] < SMALL_LIMIT_ML])


def _best(rows: list[dict]) -> dict | None:
    """The highest score; a tie (to 1e-6) goes to the simpler setting (rule 5)."""
    return max(rows, key=lambda r: (round(r["score"], 6), *_simplicity(r))) if rows else None


def degenerate_reasons(row: dict, labels: list[str], any_lesion_found: bool) -> list[str]:
    """Why a chosen row is degenerate (rule 7); empty when it is not."""
    reasons = []
    if not row.get("plausible", True):
        worst = max(labels, key=lambda label: row[f"{label}_volume_ratio"])
        reasons.append(f"implausible volumes (on {worst}: (mean predicted + 1 mL) / (mean true + 1 mL) = "
                       f"{row[f'{worst}_volume_ratio']:.1f}, median per-case ratio "
                       f"{row[f'{worst}_median_volume_ratio']:.1f}; bound {PLAUSIBLE_RATIO:g})")
    if row["mean_dice"] < DEGENERATE_DICE:
        reasons.append(f"mean Dice {row['mean_dice']:.3f} below {DEGENERATE_DICE}")
    if not any_lesion_found:
        reasons.append("an empty mask on every validation case with a lesion")
    return reasons


def write_into_bundle(bundle_dir: Path, post: PostProcessing) -> None:
    """Store ``post`` as ``postprocessing`` in the bundle's ``model.json`` (atomic replace)."""
    path = Path(bundle_dir) / "model.json"
    metadata = json.loads(path.read_text())
    metadata["postprocessing"] = post.to_dict()
    write_json(metadata, path, overwrite=True)


def predictor_applies_component_rule() -> bool:
    """Whether the installed Predictor applies :meth:`PostProcessing.apply` (the combined component
    rules); it declares so with ``StrokePredictorLib.inference.COMPONENT_RULE = True``."""
    from StrokePredictorLib import inference

    return bool(getattr(inference, "COMPONENT_RULE", False))


def for_growth_by_volume(settings: list[PostProcessing]) -> list[PostProcessing]:
    """Rule 8: the settings with a threshold and a size limit alone (no ADC gate, no small-component gate,
    no smallest mean probability), for a bundle that grows the core by volume. Its final infarct grows
    into tissue whose ADC is still normal, so growing a component raises its median ADC, and a gate on
    that median could delete a component *because* it grew: no treatment would then give a smaller final
    infarct than thrombectomy (seen on a simulated test case with a gate at 0.9). A smallest mean
    probability does the same: the grown voxels' probabilities fall with their distance from the core, so
    a larger growth lowers the component's mean (run g26: a 0.67 mL outcome at thrombectomy 1 h became
    none at 20 h without treatment under a 0.8 limit). A size limit only ever keeps a grown component."""
    kept = [post for post in settings if not post.max_component_adc and not post.small_component_adc
            and not post.min_component_probability]
    logger.info("growth by volume: %d of %d settings with a threshold and a size limit alone are searched (rule 8)",
                len(kept), len(settings))
    return kept


def run(config: PostprocessConfig) -> dict:
    """Score every combination; returns ``{"best": ..., "table": [...]}`` (also written to OUT).

    Raises:
        DegenerateChoiceError: ``--write`` without ``--force`` and a degenerate choice (after the
            table is written).
    """
    from StrokePredictorLib.bundle import load_bundle
    from StrokePredictorLib.inference import Predictor, adc_of
    from StrokePredictorLib.preprocess import preprocess

    if config.bundle is None or config.out is None:
        raise StrokePredictorError("--bundle and --out are required.")
    out = Path(config.out)
    if (out / "postprocess.json").exists() and not config.overwrite:
        raise OutputExistsError(f"{out / 'postprocess.json'} exists; pass --overwrite to replace it.")
    bundle = load_bundle(config.bundle)
    if config.split is not None and config.subset == "test":
        logger.warning("Searching the post-processing on the test subset: the test results will be biased.")
    datasets = collect(EvaluateConfig(bundle=config.bundle, data=config.data, label=config.label, split=config.split,
                                      subset=config.subset, max_cases=config.max_cases, out=out), bundle.task)
    settings = config.grid()
    guard_post = read_guard(config.guard) if config.guard is not None else None
    if guard_post is not None:
        labels_known = [d.label for d in datasets]
        unknown = [label for label in config.guard_sets if label not in labels_known]
        if unknown:
            raise StrokePredictorError(f"--guard-sets {', '.join(unknown)}: not among the validation sets "
                                       f"({', '.join(labels_known)}).")
        if guard_post.flip_tta not in config.flip_tta:
            raise StrokePredictorError(f"--guard {config.guard}: its flip averaging ({guard_post.flip_tta}) is not "
                                       f"searched (--flip-tta {','.join(str(f) for f in config.flip_tta)}).")
        unflipped = dataclasses.replace(guard_post, flip_tta=False, volume_log_margin=0.0, selected_on="")
        if unflipped not in settings:
            settings.append(unflipped)
    if bundle.config.growth_volume:
        settings = for_growth_by_volume(settings)
    needs_adc = any(post.needs_adc for post in settings)
    predictors = {flip: Predictor(bundle, device=config.device, mc_samples=config.mc_samples, threshold=0.5,
                                  min_component_ml=0.0, max_component_adc=0.0, flip_tta=flip)
                  for flip in config.flip_tta}
    per_set: dict[str, dict[bool, np.ndarray]] = {}
    true_by_set: dict[str, np.ndarray] = {}
    for dataset in datasets:
        values: dict[bool, list[np.ndarray]] = {flip: [] for flip in config.flip_tta}
        true_volumes = []
        for record in dataset.cases:
            truth_path = ground_truth_path(record, dataset.root, bundle.task)
            assert truth_path is not None
            dwi, adc, flair, truth = read_case(record, truth_path)
            true_volumes.append(float(truth.sum()) * dwi.geometry.voxel_volume_ml)
            case = preprocess(dwi, adc, flair, grid=bundle.grid, normalization=bundle.normalization)
            clinical_record = _clinical_of(record, dataset.clinical)
            adc_source = (case.mapping.to_source(adc_of(case, bundle.normalization), order=1)  # as the Predictor
                          if needs_adc else None)
            for flip, predictor in predictors.items():
                probability = predictor.predict_preprocessed(case, clinical_record).probability
                values[flip].append(score_case(probability, truth, dwi.geometry.voxel_volume_ml, settings, adc_source))
            logger.info("%s %s scored", dataset.label, record.case_id)
        per_set[dataset.label] = {flip: np.stack(v, axis=1) for flip, v in values.items()}  # (settings, cases, fields)
        true_by_set[dataset.label] = np.asarray(true_volumes)
    table = build_table(settings, config.flip_tta, per_set, true_by_set)
    applies = predictor_applies_component_rule()
    guard_row = None
    if guard_post is not None:
        guard_row = next((r for r in table if setting_key(r) == post_key(guard_post)), None)
        if guard_row is None:  # a gate in the guard of a growth-by-volume bundle (rule 8)
            raise StrokePredictorError(f"--guard {config.guard}: its block is not searched for this bundle.")
        guard_row = dict(guard_row)
    guarded = {"guard": guard_row, "guard_sets": config.guard_sets}
    best = choose(table, applies_component_rule=applies, **guarded)
    best_any = choose([dict(r) for r in table], applies_component_rule=True, **guarded)
    choose(table, applies_component_rule=applies, **guarded)  # restore the eligibility marks of the written choice
    reference_rows = {
        "default": next((r for r in table if setting_key(r) == (False, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0)), None),
        "current": next((r for r in table if setting_key(r) == post_key(bundle.postprocessing)), None),
    }
    labels = list(per_set)
    index = settings.index(next(p for p in settings if post_key(p)[1:] == setting_key(best)[1:]))
    chosen_values = {label: per_set[label][best["flip_tta"]][index] for label in labels}
    has_lesion = np.concatenate([true_by_set[label] > 0 for label in labels])
    predicted = np.concatenate([chosen_values[label][:, CASE_FIELDS.index("pred_ml")] for label in labels])
    found = np.concatenate([chosen_values[label][:, 1] for label in labels])
    any_lesion_found = bool(not has_lesion.any() or np.any((predicted > 0) & has_lesion & (found > 0)))
    reasons = degenerate_reasons(best, labels, any_lesion_found)
    true_volumes = np.concatenate([true_by_set[label] for label in labels])
    margin = conformal_log_margin(true_volumes, predicted)
    sets = ", ".join(f"{d.label} ({len(d.cases)})" for d in datasets)
    guard_text = ""
    failures = guard_failures(best, guard_row, config.guard_sets) if guard_row is not None else []
    if guard_row is not None and not failures:
        guard_text = (f"; guarded: fewer false positives on {', '.join(config.guard_sets)} and a higher F1 on "
                      f"lesions under 1 mL than {guard_post.describe()}")
    post = PostProcessing(threshold=best["threshold"], flip_tta=best["flip_tta"],
                          min_component_ml=best["min_component_ml"], max_component_adc=best["max_component_adc"],
                          min_component_probability=best["min_component_probability"],
                          small_component_ml=best["small_component_ml"],
                          small_component_adc=best["small_component_adc"],
                          volume_log_margin=math.ceil(margin * 1e4) / 1e4,
                          selected_on=f"python -m Training postprocess: 0.35 Dice + 0.35 volume agreement + 0.15 "
                                      f"lesion F1 + 0.15 lesion precision, plausible volumes, on {sets}; conformal "
                                      f"volume margin over the same {true_volumes.size} cases" + guard_text)
    result = {"bundle": bundle.describe(), "criterion": CRITERION, "datasets": {
                  d.label: {"root": str(d.root), "n_cases": len(d.cases)} for d in datasets},
              "n_settings": len(table), "n_plausible": int(sum(r["plausible"] for r in table)),
              "predictor_applies_component_rule": applies, "best": best, "best_any_rule": best_any,
              "keeps_small": small_lesion_reference(table),
              "default": reference_rows["default"], "current": reference_rows["current"],
              "degenerate": reasons, "postprocessing": post.to_dict(), "table": table}
    if guard_row is not None:
        result["guard"] = {"file": str(config.guard), "sets": list(config.guard_sets), "row": guard_row,
                           "met": not failures, "failures": failures}
        if failures:
            logger.warning("No setting beats the guard block %s on %s: %s", guard_post.describe(),
                           ", ".join(config.guard_sets), "; ".join(failures))
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "postprocess.json", overwrite=True)
    (out / "postprocess.md").write_text(table_markdown(result))
    config_mod.save(config, out / "postprocess_config.json")
    if config.write:
        if reasons and not config.force:
            raise DegenerateChoiceError(
                "Refusing to write a degenerate post-processing into the bundle: " + "; ".join(reasons)
                + f". The table is in {out / 'postprocess.md'}; pass --force to write it anyway.")
        write_into_bundle(bundle.directory, post)
        logger.info("Stored %s in %s", post.describe(), bundle.directory / "model.json")
    return result


CRITERION = ("mean over sets of 0.35 Dice + 0.35 volume agreement + 0.15 lesion F1 + 0.15 lesion precision, "
             "among settings with plausible volumes (at most 10x the truth, +1 mL); a size limit >= 0.5 mL only "
             "if lesions under 1 mL gain")


def _describe_row(row: dict) -> str:
    post = PostProcessing(threshold=row["threshold"], flip_tta=row["flip_tta"],
                          min_component_ml=row["min_component_ml"], max_component_adc=row["max_component_adc"],
                          min_component_probability=row["min_component_probability"],
                          small_component_ml=row["small_component_ml"], small_component_adc=row["small_component_adc"])
    return post.describe()


def table_markdown(result: dict, top: int = 15) -> str:
    """The best eligible rows, the chosen, current and plain (threshold 0.5) settings as a markdown table."""
    labels = list(result["datasets"])
    header = ("| Rank | Setting | "
              + " | ".join(f"{name} Dice | {name} vol. agr. | {name} lesion F1 | {name} lesion prec. | "
                           f"{name} FP mL/case" for name in labels)
              + " | F1 < 1 mL | Plausible | Score | Note |")
    lines = [f"# Post-processing of `{result['bundle']['name']}`", "",
             f"Criterion: {result['criterion']}. Validation sets: "
             + ", ".join(f"{k} ({v['n_cases']} cases)" for k, v in result["datasets"].items())
             + f". {result['n_settings']} settings, {result['n_plausible']} plausible.", "",
             header, "|" + "---|" * (6 + 5 * len(labels))]
    ranked = sorted(result["table"], key=lambda r: -r["score"])
    rows = [(n + 1, r, "") for n, r in enumerate(ranked) if r.get("eligible")][:top]
    shown = {id(r) for _, r, _ in rows}
    rank_of = {id(r): n + 1 for n, r in enumerate(ranked)}
    for name in ("best", "best_any_rule", "current", "default"):
        row = result.get(name)
        if row is None:
            continue
        match = next((r for r in ranked if setting_key(r) == setting_key(row)), row)
        if id(match) not in shown:
            rows.append((rank_of.get(id(match), "-"), match, ""))
            shown.add(id(match))
    notes = {"best": "chosen", "best_any_rule": "best with every rule", "current": "bundle's current",
             "default": "threshold 0.5 alone"}
    for rank, row, _ in rows:
        tags = [notes[name] for name in notes if result.get(name) is not None
                and setting_key(result[name]) == setting_key(row)]
        if row.get("excluded_because"):
            tags.append(f"excluded: {row['excluded_because']}")
        cells = " | ".join(f"{row[f'{n}_dice']:.3f} | {row[f'{n}_volume_agreement']:.3f} | "
                           f"{row[f'{n}_lesion_f1']:.3f} | {row[f'{n}_lesion_precision']:.3f} | "
                           f"{row[f'{n}_fp_component_ml']:.2f}" for n in labels)
        small = row.get("small_lesion_f1", math.nan)
        lines.append(f"| {rank} | {_describe_row(row)} | {cells} | "
                     f"{'n/a' if not math.isfinite(small) else f'{small:.3f}'} | "
                     f"{'yes' if row.get('plausible', True) else 'no'} | {row['score']:.3f} | {'; '.join(tags)} |")
    if result.get("degenerate"):
        lines += ["", "**Degenerate choice**: " + "; ".join(result["degenerate"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    config = config_mod.parse(PostprocessConfig, argv, __doc__.split("\n")[0], prog="python -m Training postprocess")
    try:
        result = run(config)
    except DegenerateChoiceError:
        print((Path(config.out) / "postprocess.md").read_text())
        raise
    print(table_markdown(result))
    best, current = result["best"], result["current"]
    print(f"chosen: {_describe_row(best)}: score {best['score']:.3f}"
          + (f" (the bundle's current setting: {current['score']:.3f})" if current else ""))
    if result["degenerate"]:
        print("WARNING: degenerate choice: " + "; ".join(result["degenerate"]))
    return 0
