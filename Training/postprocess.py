"""``python -m Training postprocess``: choose a bundle's post-processing on validation data.

    python -m Training postprocess --bundle DIR --data VAL1 [--data VAL2 ...] --out OUT [--write]
    python -m Training postprocess --bundle DIR --data ISLES --split split.json --subset val --out OUT

Every case of every ``--data`` folder (ISLES 2022 layout, with ground truth) runs once through
:class:`StrokePredictorLib.inference.Predictor` with and without left-right flip averaging; the
probability on the DWI grid is then thresholded at every ``--thresholds`` value and cleared of
components under every ``--min-components-ml`` value and of components whose median ADC reaches
every ``--max-component-adcs`` value (10^-3 mm^2/s; 0: no ADC gate). Each combination is scored by the mean of
Dice and lesion-wise F1 (the two overlap metrics of ISLES 2022), averaged over the cases of each
folder and then over the folders, so that every validation set counts equally. For the best
combination, the split-conformal margin of the 95% lesion-volume interval is computed over all the
validation cases (:func:`StrokePredictorLib.postprocess.conformal_log_margin`). The result is
written to ``OUT/postprocess.json`` with the whole table (and ``OUT/postprocess.md``) and, with
``--write``, into the bundle's ``model.json`` (``postprocessing``), which every prediction
then uses (:mod:`StrokePredictorLib.postprocess`). The weights and their checksum are not touched.

Use validation cases only: never the test split, the out-of-distribution set or a real validation
case, which must stay unseen for the reported results.
"""

from __future__ import annotations

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
    component_medians,
    conformal_log_margin,
    kept_components,
    label_components,
    select_components,
)
from Training import config as config_mod
from Training import metrics as M
from Training.evaluate import EvaluateConfig, _clinical_of, collect, ground_truth_path, read_case

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PostprocessConfig:
    """Options of ``python -m Training postprocess``."""

    bundle: Path | None = field(default=None, metadata={"help": "model bundle folder (required)"})
    data: tuple[Path, ...] = field(default=(), metadata={"help": "validation folder(s), ISLES 2022 layout"})
    label: tuple[str, ...] = field(default=(), metadata={"help": "one name per --data (default: folder names)"})
    split: Path | None = field(default=None, metadata={"help": "split.json restricting the FIRST --data folder"})
    subset: str = field(default="val", metadata={"help": "subset of --split to search on (train|val|test)"})
    out: Path | None = field(default=None, metadata={"help": "output folder for the table (required)"})
    thresholds: tuple[float, ...] = field(default=(0.3, 0.4, 0.5, 0.6, 0.7),
                                          metadata={"help": "probability thresholds to try"})
    min_components_ml: tuple[float, ...] = field(default=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0),
                                                 metadata={"help": "smallest kept component sizes to try (mL)"})
    flip_tta: tuple[bool, ...] = field(default=(False, True), metadata={"help": "flip averaging off / on"})
    # No gate below 0.85: real acute lesions can be subtle (mean ADC only about 12% below normal), and a
    # cortical lesion 12% below grey matter (0.89-0.91 x10^-3 mm^2/s in real ISLES 2022 scans) lies near 0.8.
    max_component_adcs: tuple[float, ...] = field(
        default=(0.0, 0.85, 0.9, 1.0),
        metadata={"help": "ADC gates to try: components with a median ADC at or above this (10^-3 mm^2/s) "
                          "are removed; 0: no gate"})
    mc_samples: int = field(default=20, metadata={"help": "Monte-Carlo dropout samples"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    max_cases: int = field(default=0, metadata={"help": "at most this many cases per folder (0: all)"})
    write: bool = field(default=False, metadata={"help": "store the best post-processing in the bundle"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier table in --out"})

    def __post_init__(self) -> None:
        for t in self.thresholds:
            if not 0.0 < t < 1.0:
                raise ValueError(f"thresholds must lie strictly between 0 and 1, got {t}")
        for name in ("min_components_ml", "max_component_adcs"):
            for v in getattr(self, name):
                if not v >= 0:
                    raise ValueError(f"{name} must be >= 0, got {v}")
        if not (self.thresholds and self.min_components_ml and self.flip_tta and self.max_component_adcs):
            raise ValueError("give at least one value of thresholds, min_components_ml, flip_tta and "
                             "max_component_adcs")


Key = tuple[float, float, float]  # threshold, smallest component (mL), ADC gate (10^-3 mm^2/s)


def score_case(probability: np.ndarray, truth: np.ndarray, voxel_ml: float, thresholds: tuple[float, ...],
               min_components_ml: tuple[float, ...], adc: np.ndarray | None = None,
               max_component_adcs: tuple[float, ...] = (0.0,)) -> dict[Key, tuple[float, float, float]]:
    """(threshold, smallest component, ADC gate) -> (Dice, lesion F1, predicted volume in mL) of one
    case; ``adc`` (DWI grid, 10^-3 mm^2/s) is needed for gates above 0."""
    scores = {}
    for threshold in thresholds:
        labels, sizes_ml = label_components(probability >= threshold, voxel_ml)  # once per threshold
        medians = component_medians(adc, labels, sizes_ml.size) if any(g > 0 for g in max_component_adcs) else None
        distinct: dict[bytes, tuple[float, float, float]] = {}  # settings that keep the same components
        for min_ml, gate in itertools.product(min_components_ml, max_component_adcs):
            kept = kept_components(sizes_ml, min_ml, medians, gate)
            if kept.tobytes() not in distinct:
                mask = select_components(labels, kept)
                distinct[kept.tobytes()] = (M.dice(mask, truth), M.lesion_f1(mask, truth),
                                            float(mask.sum()) * voxel_ml)
            scores[(threshold, min_ml, gate)] = distinct[kept.tobytes()]
    return scores


def choose(table: list[dict]) -> dict:
    """The row with the highest score; ties go to the simpler setting (no flip, threshold nearer
    0.5, smaller component size, no ADC gate or else the most lenient one)."""
    return max(table, key=lambda r: (round(r["score"], 6), not r["flip_tta"], -abs(r["threshold"] - 0.5),
                                     -r["min_component_ml"], r.get("max_component_adc", 0.0) == 0,
                                     r.get("max_component_adc", 0.0)))


def write_into_bundle(bundle_dir: Path, post: PostProcessing) -> None:
    """Store ``post`` as ``postprocessing`` in the bundle's ``model.json`` (atomic replace)."""
    path = Path(bundle_dir) / "model.json"
    metadata = json.loads(path.read_text())
    metadata["postprocessing"] = post.to_dict()
    write_json(metadata, path, overwrite=True)


def run(config: PostprocessConfig) -> dict:
    """Score every combination; returns ``{"best": ..., "table": [...]}`` (also written to OUT)."""
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
    predictors = {flip: Predictor(bundle, device=config.device, mc_samples=config.mc_samples, threshold=0.5,
                                  min_component_ml=0.0, flip_tta=flip) for flip in config.flip_tta}
    per_set: dict[str, dict[tuple[bool, float, float, float], list[tuple[float, float, float]]]] = {}
    true_by_set: dict[str, list[float]] = {}
    for dataset in datasets:
        true_volumes = true_by_set.setdefault(dataset.label, [])
        scores: dict[tuple[bool, float, float, float], list[tuple[float, float, float]]] = {}
        for record in dataset.cases:
            truth_path = ground_truth_path(record, dataset.root, bundle.task)
            assert truth_path is not None
            dwi, adc, flair, truth = read_case(record, truth_path)
            true_volumes.append(float(truth.sum()) * dwi.geometry.voxel_volume_ml)
            case = preprocess(dwi, adc, flair, grid=bundle.grid, normalization=bundle.normalization)
            clinical_record = _clinical_of(record, dataset.clinical)
            adc_source = (case.mapping.to_source(adc_of(case, bundle.normalization), order=1)  # as the Predictor
                          if any(gate > 0 for gate in config.max_component_adcs) else None)
            for flip, predictor in predictors.items():
                probability = predictor.predict_preprocessed(case, clinical_record).probability
                for key, value in score_case(probability, truth, dwi.geometry.voxel_volume_ml, config.thresholds,
                                             config.min_components_ml, adc_source, config.max_component_adcs).items():
                    scores.setdefault((flip, *key), []).append(value)
            logger.info("%s %s scored", dataset.label, record.case_id)
        per_set[dataset.label] = scores
    table = []
    for flip, threshold, min_ml, gate in itertools.product(config.flip_tta, config.thresholds,
                                                           config.min_components_ml, config.max_component_adcs):
        row: dict = {"flip_tta": flip, "threshold": threshold, "min_component_ml": min_ml, "max_component_adc": gate}
        set_scores = []
        for label, scores in per_set.items():
            values = np.asarray(scores[(flip, threshold, min_ml, gate)])
            row[f"{label}_dice"] = float(values[:, 0].mean())
            row[f"{label}_lesion_f1"] = float(values[:, 1].mean())
            set_scores.append(0.5 * (row[f"{label}_dice"] + row[f"{label}_lesion_f1"]))
            row[f"{label}_abs_volume_diff_ml"] = float(np.abs(values[:, 2] - np.asarray(true_by_set[label])).mean())
        row["score"] = float(np.mean(set_scores))
        table.append(row)
    best = choose(table)
    default = next((r for r in table if r["threshold"] == 0.5 and r["min_component_ml"] == 0 and not r["flip_tta"]
                    and r["max_component_adc"] == 0), None)
    sets = ", ".join(f"{d.label} ({len(d.cases)})" for d in datasets)
    best_key = (best["flip_tta"], best["threshold"], best["min_component_ml"], best["max_component_adc"])
    predicted_volumes = [value[2] for label in per_set for value in per_set[label][best_key]]
    true_volumes = [volume for label in per_set for volume in true_by_set[label]]
    margin = conformal_log_margin(np.asarray(true_volumes), np.asarray(predicted_volumes))
    post = PostProcessing(threshold=best["threshold"], flip_tta=best["flip_tta"],
                          min_component_ml=best["min_component_ml"], max_component_adc=best["max_component_adc"],
                          volume_log_margin=math.ceil(margin * 1e4) / 1e4,
                          selected_on=f"python -m Training postprocess: mean of Dice and lesion F1 on {sets}; "
                                      f"conformal volume margin over the same {len(true_volumes)} cases")
    result = {"bundle": bundle.describe(), "criterion": "mean over sets of (Dice + lesion F1) / 2",
              "datasets": {d.label: {"root": str(d.root), "n_cases": len(d.cases)} for d in datasets},
              "best": best, "default": default, "postprocessing": post.to_dict(), "table": table}
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "postprocess.json", overwrite=True)
    (out / "postprocess.md").write_text(table_markdown(result))
    config_mod.save(config, out / "postprocess_config.json")
    if config.write:
        write_into_bundle(bundle.directory, post)
        logger.info("Stored %s in %s", post.describe(), bundle.directory / "model.json")
    return result


def table_markdown(result: dict, top: int = 10) -> str:
    """The best rows and the plain default (threshold 0.5, nothing else) as a markdown table."""
    labels = list(result["datasets"])
    header = ("| Flip | Threshold | Min. component (mL) | ADC gate (10^-3 mm^2/s) | "
              + " | ".join(f"{name} Dice | {name} lesion F1" for name in labels) + " | Score |")
    lines = [f"# Post-processing of `{result['bundle']['name']}`", "",
             f"Criterion: {result['criterion']}. Validation sets: "
             + ", ".join(f"{k} ({v['n_cases']} cases)" for k, v in result["datasets"].items()) + ".", "",
             header, "|" + "---|" * (5 + 2 * len(labels))]
    rows = sorted(result["table"], key=lambda r: -r["score"])[:top]
    if result.get("default") is not None and result["default"] not in rows:
        rows.append(result["default"])
    for r in rows:
        cells = " | ".join(f"{r[f'{name}_dice']:.3f} | {r[f'{name}_lesion_f1']:.3f}" for name in labels)
        gate = r.get("max_component_adc", 0.0)
        lines.append(f"| {'yes' if r['flip_tta'] else 'no'} | {r['threshold']:g} | {r['min_component_ml']:g} | "
                     f"{f'{gate:g}' if gate else 'off'} | {cells} | {r['score']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    config = config_mod.parse(PostprocessConfig, argv, __doc__.split("\n")[0], prog="python -m Training postprocess")
    result = run(config)
    best, default = result["best"], result["default"]
    print(f"best: flip {best['flip_tta']}, threshold {best['threshold']:g}, smallest component "
          f"{best['min_component_ml']:g} mL, ADC gate {best['max_component_adc']:g}: score {best['score']:.3f}"
          + (f" (threshold 0.5 alone: {default['score']:.3f})" if default else ""))
    return 0
