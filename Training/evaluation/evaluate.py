"""``python -m Training evaluate``: a bundle against ground truth, end to end, beside the classical rule.

For every case of every ``--data`` folder (ISLES 2022 layout), the bundle runs through
:class:`StrokePredictorLib.inference.Predictor` on the raw files exactly as a user's prediction
would (outputs on the DWI grid), and the classical threshold rule (:mod:`Training.evaluation.baseline`) runs
on the same files. Both are compared with the ground truth (``--task acute``: ``*_msk``;
``outcome``: ``*_outcome``) with the ISLES 2022 metrics and more (:mod:`Training.evaluation.metrics`); the
model's uncertainty is judged by its calibration (ECE over brain voxels, reliability diagram),
the AUROC of voxel-wise error detection by the predictive entropy, and the coverage of the
95 % lesion-volume interval.

``--split FILE --subset test`` restricts the FIRST ``--data`` folder to the cases of that subset
(the in-distribution test split); further folders (out-of-distribution sets, real cases) are
evaluated completely. Clinical values come from ``DIR/clinical.csv`` when present, else the age
and sex of the JSON sidecars.

Outputs in ``--out``: ``per_case.csv`` (one row per data set, case and method),
``summary.json`` (mean, sd, median... of every metric per data set and method, the pooled
reliability bins), ``results.md`` (the side-by-side table), ``evaluate_config.json``, and with
``--save-predictions`` ``predictions/<label>/<case>/{probability,entropy,lesion,baseline}.nii.gz``
for the figures of ``python -m Training visualize --eval OUT``.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib import clinical
from StrokePredictorLib.errors import InputImageError, OutputExistsError, StrokePredictorError
from StrokePredictorLib.io import CaseRecord, Volume, discover_isles, read_volume, write_json, write_volume
from StrokePredictorLib.postprocess import interval_capped
from Training import config as config_mod
from Training.evaluation import baseline as baseline_mod
from Training.evaluation import metrics as M

logger = logging.getLogger(__name__)

METHODS = ("model", "baseline")
TABLE_METRICS = (("dice", "Dice"), ("lesion_f1", "Lesion F1"), ("lesion_precision", "Lesion precision"),
                 ("abs_volume_diff_ml", "Abs. vol. diff. (mL)"),
                 ("abs_lesion_count_diff", "Abs. lesion-count diff."), ("hd95_mm", "HD95 mm"))


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of ``python -m Training evaluate``."""

    bundle: Path | None = field(default=None, metadata={"help": "model bundle folder (required)"})
    data: tuple[Path, ...] = field(default=(), metadata={"help": "ISLES-layout folder(s) to evaluate on"})
    label: tuple[str, ...] = field(default=(), metadata={"help": "one name per --data (default: folder names)"})
    split: Path | None = field(default=None, metadata={"help": "split.json restricting the FIRST --data folder"})
    subset: str = field(default="test", metadata={"help": "subset of --split: train|val|test"})
    out: Path | None = field(default=None, metadata={"help": "output folder (required)"})
    task: str = field(default="", metadata={"help": "acute|outcome (default: the bundle's task)"})
    mc_samples: int = field(default=20, metadata={"help": "Monte-Carlo dropout samples"})
    seed: int = field(default=0, metadata={"help": "seed of the dropout masks"})
    threshold: float | None = field(default=None, metadata={
        "help": "probability threshold of the lesion mask (default: the bundle's post-processing)"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    n_bins: int = field(default=15, metadata={"help": "equal-width bins of the calibration error"})
    max_cases: int = field(default=0, metadata={"help": "evaluate at most this many cases per folder (0: all)"})
    baseline: bool = field(default=True, metadata={"help": "also evaluate the classical threshold rule"})
    flair: bool = field(default=True, metadata={
        "help": "give the model a case's FLAIR when it has one (--no-flair: DWI and ADC only)"})
    save_predictions: bool = field(default=True, metadata={"help": "write per-case NIfTI outputs for figures"})
    overwrite: bool = field(default=False, metadata={"help": "replace the outputs of an earlier evaluation"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.task not in ("", "acute", "outcome"):
            raise ValueError(f"task must be 'acute' or 'outcome', got '{self.task}'")
        if self.subset not in ("train", "val", "test"):
            raise ValueError(f"subset must be train, val or test, got '{self.subset}'")


@dataclass
class DatasetCases:
    """The cases of one ``--data`` folder that will be evaluated."""

    label: str
    root: Path
    cases: list[CaseRecord]
    clinical: dict[str, clinical.ClinicalRecord]


def ground_truth_path(record: CaseRecord, root: Path, task: str) -> Path | None:
    """The ground-truth mask of a case: ``*_msk`` (acute) or ``*_outcome`` (outcome)."""
    if task == "acute":
        return record.mask
    from Training.data.cache import outcome_path

    return outcome_path(record, root)


def _clinical_of(record: CaseRecord, table: dict[str, clinical.ClinicalRecord]) -> clinical.ClinicalRecord:
    if record.case_id in table:
        return table[record.case_id]
    values: dict[str, object] = {}
    if record.age is not None and 18 <= record.age <= 110:
        values["age"] = record.age
    if record.sex is not None:
        values["sex"] = record.sex
    return clinical.validate(values)


def collect(config: EvaluateConfig, task: str) -> list[DatasetCases]:
    """Discover the cases of every ``--data`` folder (the split applied to the first)."""
    if not config.data:
        raise StrokePredictorError("Give at least one --data folder to evaluate on.")
    if config.label and len(config.label) != len(config.data):
        raise StrokePredictorError(f"Give one --label per --data folder ({len(config.data)}), got {len(config.label)}.")
    labels = list(config.label) or [Path(d).resolve().name for d in config.data]
    if len(set(labels)) != len(labels):
        raise StrokePredictorError(f"The data set labels must differ ({', '.join(labels)}); give --label.")
    datasets = []
    for index, (root, label) in enumerate(zip(config.data, labels, strict=False)):
        root = Path(root)
        records = discover_isles(root)
        if index == 0 and config.split is not None:
            from Training.data.cache import read_split

            wanted = set(read_split(config.split)[config.subset])
            records = [r for r in records if r.case_id in wanted]
            if not records:
                raise StrokePredictorError(f"No case of {root} is in the '{config.subset}' subset of {config.split}.")
        with_truth = [r for r in records if ground_truth_path(r, root, task) is not None]
        if len(with_truth) < len(records):
            logger.warning("%s: %d case(s) without a %s ground truth are skipped.", label,
                           len(records) - len(with_truth), task)
        if not with_truth:
            raise StrokePredictorError(f"No case in {root} has a {task} ground-truth mask "
                                       f"({'*_msk' if task == 'acute' else '*_outcome'}.nii.gz in derivatives/).")
        if config.max_cases:
            with_truth = with_truth[: config.max_cases]
        csv_path = root / "clinical.csv"
        if not csv_path.is_file() and (root / "ISLES-2022").is_dir():
            csv_path = root / "ISLES-2022" / "clinical.csv"
        table = clinical.read_csv(csv_path) if csv_path.is_file() else {}
        datasets.append(DatasetCases(label, root, with_truth, table))
    return datasets


def _check_outputs(out: Path, overwrite: bool) -> None:
    names = ("per_case.csv", "summary.json", "results.md", "evaluate_config.json")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{out} holds the outputs of an earlier evaluation ({', '.join(existing)}); "
                                "pass --overwrite to replace them or choose another --out.")


def read_case(record: CaseRecord, truth_path: Path) -> tuple[Volume, Volume, Volume | None, np.ndarray]:
    """DWI, ADC, FLAIR (or None) and the bool ground truth of a case.

    Raises:
        InputImageError: an unreadable file, or a ground truth that is not on the DWI grid.
    """
    dwi = read_volume(record.dwi, role="DWI")
    adc = read_volume(record.adc, role="ADC")
    flair = read_volume(record.flair, role="FLAIR") if record.flair is not None else None
    truth_volume = read_volume(truth_path, role="ground-truth mask")
    if not truth_volume.geometry.same_grid(dwi.geometry, 0.05):
        raise InputImageError(f"Ground-truth mask {truth_path} is not on the DWI grid of case {record.case_id}.")
    return dwi, adc, flair, truth_volume.array > 0.5


def evaluate_case(predictor: object, record: CaseRecord, truth_path: Path, clinical_record: clinical.ClinicalRecord,
                  *, with_baseline: bool, n_bins: int, use_flair: bool = True) -> dict:
    """Evaluate one case; returns {"model": row, "baseline": row, "bins": ReliabilityBins, arrays...}.
    ``use_flair=False`` leaves the case's FLAIR out (DWI and ADC only)."""
    dwi, adc, flair, truth = read_case(record, truth_path)
    flair = flair if use_flair else None
    spacing = dwi.geometry.spacing
    rule = baseline_mod.classical_rule(dwi, adc)
    brain = rule.brain | truth
    tick = time.perf_counter()
    prediction = predictor.predict(dwi, adc, flair, clinical_record)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - tick
    model_acc = M.MetricAccumulator(n_bins=n_bins)
    model_row = model_acc.update(
        prediction.mask.astype(bool), truth, spacing, case_id=record.case_id, probability=prediction.probability,
        uncertainty=prediction.entropy, brain=brain, volume_interval_ml=prediction.volume_ml["ci95"],
        extra={"volume_median_ml": float(prediction.volume_ml["median"]), "seconds": seconds,
               "flair_present": float(prediction.flair_present),
               "brain_volume_ml": float(prediction.brain_volume_ml)})
    result = {"model": model_row, "bins": model_acc.bins, "prediction": prediction, "truth": truth,
              "geometry": dwi.geometry, "baseline_mask": rule.mask}
    if with_baseline:
        result["baseline"] = M.MetricAccumulator().update(rule.mask.astype(bool), truth, spacing,
                                                          case_id=record.case_id)
    return result


def _fmt(summary: dict, digits: int = 3) -> str:
    if summary["n"] == 0:
        return "n/a"
    undefined = f" [{summary['n_undefined']} undef.]" if summary.get("n_undefined") else ""
    return f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f} ({summary['median']:.{digits}f}){undefined}"


def postprocessing_text(summary: dict) -> str:
    from StrokePredictorLib.postprocess import PostProcessing

    if "postprocessing" in summary:
        return PostProcessing.from_dict(summary["postprocessing"]).describe()
    return f"threshold {summary['threshold']}"


def results_markdown(summary: dict, *, title: str = "Evaluation") -> str:
    """The side-by-side markdown table of ``summary`` (as written to summary.json)."""
    lines = [f"# {title}", "", f"Bundle: `{summary['bundle']['name']}` (task {summary['task']}, "
             f"sha256 {summary['bundle']['sha256'][:12]}), {summary['mc_samples']} MC samples, "
             f"{postprocessing_text(summary)}" + ("" if summary.get("flair", True) else ", FLAIR left out")
             + ".", "",
             "Values: mean ± sd (median) over cases. Dice and lesion F1: both empty = 1 (ISLES 2022); "
             "HD95 undefined when exactly one mask is empty.", ""]
    header = "| Data set | Method | N | " + " | ".join(name for _, name in TABLE_METRICS) + " |"
    lines += [header, "|" + "---|" * (3 + len(TABLE_METRICS))]
    for label, per_method in summary["datasets"].items():
        for method in METHODS:
            if method not in per_method:
                continue
            metrics = per_method[method]["metrics"]
            name = "model" if method == "model" else "classical rule"
            cells = [_fmt(metrics[key]) for key, _ in TABLE_METRICS]
            lines.append(f"| {label} | {name} | {per_method[method]['n_cases']} | " + " | ".join(cells) + " |")
    lines += ["", "## By lesion size", "",
              "Dice: cases grouped by their total lesion volume (cases without lesion left out). Lesion F1 and "
              "precision: pooled over the cases, a true lesion counted in the bin of its own volume (found when any "
              "voxel is predicted), a predicted component touching no true lesion counted as a false positive in "
              "the bin of its own volume. FP volume: mL of such components per case.", "",
              size_table(summary)]
    flags = summary.get("sanity_flags", [])
    lines += ["", "## Sanity flags", ""] + ([f"- {flag}" for flag in flags] or ["None."])
    lines += ["", "## Uncertainty (model)", "",
              "| Data set | ECE (per case) | ECE (pooled) | Error-detection AUROC | 95% volume-interval coverage |",
              "|---|---|---|---|---|"]
    for label, per_method in summary["datasets"].items():
        model = per_method["model"]
        metrics = model["metrics"]
        coverage = model.get("volume_interval_coverage", math.nan)
        lines.append(f"| {label} | {_fmt(metrics['ece'], 4)} | {model.get('pooled_ece', math.nan):.4f} | "
                     f"{_fmt(metrics['error_auroc'])} | {coverage:.2f} |")
    return "\n".join(lines) + "\n"


def size_table(summary: dict) -> str:
    """Markdown table by lesion size: the Dice of the cases grouped by their total lesion volume,
    pooled lesion-wise F1 and precision (with the number of true lesions) per lesion-size bin, and
    the false-positive volume per case (mL of predicted components touching no true lesion)."""
    bins = M.SIZE_BINS
    header = ("| Data set | Method | "
              + " | ".join(f"Dice, cases {label} (n)" for _, label, *_ in bins) + " | "
              + " | ".join(f"Lesion F1 / precision, lesions {label} (n)" for _, label, *_ in bins)
              + " | FP volume per case, mL: mean (median) |")
    lines = [header, "|" + "---|" * (3 + 2 * len(bins))]
    for label, per_method in summary["datasets"].items():
        for method in METHODS:
            result = per_method.get(method) if isinstance(per_method, dict) else None
            if not result or "by_size" not in result:
                continue
            dice_cells = []
            for key, *_ in bins:
                stats = result["dice_by_case_volume"][key]
                dice_cells.append("n/a (0)" if stats["n"] == 0 else f"{stats['mean']:.3f} ({stats['n']})")
            lesion_cells = []
            for key, *_ in bins:
                pooled = result["by_size"][key]
                f1 = "n/a" if math.isnan(pooled["f1"]) else f"{pooled['f1']:.3f}"
                precision = "n/a" if math.isnan(pooled["precision"]) else f"{pooled['precision']:.3f}"
                lesion_cells.append(f"{f1} / {precision} ({pooled['n_true']})")
            fp = result["metrics"]["fp_component_ml"]
            name = "model" if method == "model" else "classical rule"
            lines.append(f"| {label} | {name} | " + " | ".join(dice_cells + lesion_cells)
                         + f" | {fp['mean']:.2f} ({fp['median']:.2f}) |")
    return "\n".join(lines)


#: Sanity bounds of every report (:func:`sanity_flags`).
VOLUME_RATIO = 10.0  # (mean predicted mL + 1) / (mean true mL + 1) above this: implausible volumes
F1_OVER_DICE = 0.3  # mean lesion F1 this far above mean Dice: blobs that touch lesions, not segment them
BRAIN_ML = 1800.0  # no adult brain is larger: an interval reaching beyond it says nothing


def _whole_brain_interval(row: dict) -> bool:
    """The interval's upper bound was capped at the case's brain mask or, brain unknown, lies above :data:`BRAIN_ML`."""
    high = float(row.get("volume_ci_hi_ml") or 0.0)
    brain = float(row.get("brain_volume_ml") or 0.0)
    if brain > 0:
        return interval_capped(high, brain, float(row.get("volume_pred_ml") or 0.0))
    return high > BRAIN_ML


def sanity_flags(rows: list[dict]) -> list[str]:
    """Warnings about results that cannot be right, per data set and method (empty: none).

    Args:
        rows: the per-case rows (``dataset``, ``method``, ``dice``, ``lesion_f1``, ``volume_true_ml``,
            ``volume_pred_ml`` and, for the model, ``volume_ci_hi_ml`` and ``brain_volume_ml``, the case's brain
            mask, where the Predictor caps the interval; 0 or absent: unknown).
    """
    flags = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["method"]), []).append(row)
    for (label, method), group in groups.items():
        name = "model" if method == "model" else "classical rule"
        true = float(np.mean([r["volume_true_ml"] for r in group]))
        pred = float(np.mean([r["volume_pred_ml"] for r in group]))
        if (pred + 1.0) / (true + 1.0) > VOLUME_RATIO:
            flags.append(f"{label}, {name}: mean predicted volume {pred:.1f} mL against {true:.1f} mL true "
                         f"(more than {VOLUME_RATIO:g}x): implausible")
        dice = float(np.mean([r["dice"] for r in group]))
        f1 = float(np.mean([r["lesion_f1"] for r in group]))
        if f1 - dice > F1_OVER_DICE:
            flags.append(f"{label}, {name}: lesion F1 {f1:.3f} far above Dice {dice:.3f} (components that touch "
                         "lesions without segmenting them)")
        wide = [r for r in group if _whole_brain_interval(r)]
        if wide:
            flags.append(f"{label}, {name}: {len(wide)} of {len(group)} volume intervals reach a whole brain (the "
                         f"case's brain mask, where they are capped, or {BRAIN_ML:g} mL)")
    return flags


def _write_csv(rows: list[dict], path: Path) -> None:
    from StrokePredictorLib.io import atomic_path

    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with atomic_path(path, overwrite=True) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def run(config: EvaluateConfig) -> dict:
    """Evaluate; returns the summary dict (also written to ``OUT/summary.json``)."""
    from tqdm import tqdm

    from StrokePredictorLib.bundle import load_bundle, read_metadata
    from StrokePredictorLib.inference import Predictor

    if config.bundle is None or config.out is None:
        raise StrokePredictorError("--bundle and --out are required.")
    out = Path(config.out)
    _check_outputs(out, config.overwrite)
    # the data folders are checked before the bundle's weights are read (model.json alone names the task)
    bundle_task = str(read_metadata(Path(config.bundle) / "model.json").get("task", ""))
    task = config.task or bundle_task
    datasets = collect(config, task)
    bundle = load_bundle(config.bundle)
    if task != bundle.task:
        logger.warning("Evaluating a '%s' bundle on the '%s' task.", bundle.task, task)
    predictor = Predictor(bundle, device=config.device, mc_samples=config.mc_samples, seed=config.seed,
                          threshold=config.threshold)
    rows: list[dict] = []
    summary: dict = {"task": task, "bundle": {**bundle.describe(), "directory": str(bundle.directory)},
                     "mc_samples": config.mc_samples, "threshold": predictor.threshold,
                     "postprocessing": predictor.postprocessing.to_dict(), "seed": config.seed, "flair": config.flair,
                     "device": str(predictor.device), "datasets": {}}
    for dataset in datasets:
        accumulators = {"model": M.MetricAccumulator(n_bins=config.n_bins), "baseline": M.MetricAccumulator()}
        bar = tqdm(dataset.cases, desc=f"evaluate {dataset.label}", unit="case", disable=not config.progress)
        for record in bar:
            truth_path = ground_truth_path(record, dataset.root, task)
            assert truth_path is not None
            result = evaluate_case(predictor, record, truth_path, _clinical_of(record, dataset.clinical),
                                   with_baseline=config.baseline, n_bins=config.n_bins, use_flair=config.flair)
            for method in METHODS:
                if method in result:
                    accumulators[method].rows.append(result[method])
                    rows.append({"dataset": dataset.label, "method": method, **result[method]})
            bins = result["bins"]
            acc = accumulators["model"]
            acc.bins = bins if acc.bins is None else acc.bins.add(bins)
            bar.set_postfix(dice=f"{result['model']['dice']:.3f}")
            if config.save_predictions:
                _save_case(out / "predictions" / dataset.label / record.case_id, result, record, truth_path)
        summary["datasets"][dataset.label] = {
            method: accumulators[method].aggregate() for method in METHODS if accumulators[method].rows}
        summary["datasets"][dataset.label]["root"] = str(dataset.root)
    summary["sanity_flags"] = sanity_flags(rows)
    for flag in summary["sanity_flags"]:
        logger.warning("sanity: %s", flag)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / "per_case.csv")
    write_json(summary, out / "summary.json", overwrite=True)
    (out / "results.md.tmp").write_text(results_markdown(summary))
    (out / "results.md.tmp").replace(out / "results.md")
    config_mod.save(config, out / "evaluate_config.json")
    logger.info("Evaluation written to %s", out)
    return summary


def _save_case(folder: Path, result: dict, record: CaseRecord, truth_path: Path) -> None:
    prediction = result["prediction"]
    geometry = result["geometry"]
    write_volume(prediction.probability.astype(np.float32), geometry, folder / "probability.nii.gz", overwrite=True)
    write_volume(prediction.entropy.astype(np.float32), geometry, folder / "entropy.nii.gz", overwrite=True)
    write_volume(prediction.mask.astype(np.uint8), geometry, folder / "lesion.nii.gz", overwrite=True)
    write_volume(result["baseline_mask"].astype(np.uint8), geometry, folder / "baseline.nii.gz", overwrite=True)
    write_json({"dwi": str(record.dwi), "truth": str(truth_path), "feature_attention": prediction.feature_attention,
                "volume_ml": prediction.volume_ml}, folder / "case.json", overwrite=True)


def main(argv: list[str]) -> int:
    config = config_mod.parse(EvaluateConfig, argv, __doc__.split("\n")[0], prog="python -m Training evaluate")
    summary = run(config)
    for label, per_method in summary["datasets"].items():
        for method in METHODS:
            if method in per_method:
                dice = per_method[method]["metrics"]["dice"]
                logger.info("%s %s: Dice %.3f ± %.3f over %d case(s)", label, method, dice["mean"], dice["sd"],
                            per_method[method]["n_cases"])
    return 0
