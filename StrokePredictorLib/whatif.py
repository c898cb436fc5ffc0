"""What-if: after one prediction, change clinical values and re-run only what depends on them.

The imaging encoder's output (:meth:`StrokePredictorLib.inference.Predictor.encode`, the larger
part of the network's work that does not see the clinical values) is computed once per case and
kept; each update re-runs the clinical encoder, the cross-attention fusion, the decoder (with its
FiLM conditioning when the bundle has one), the Monte-Carlo tail, the post-processing and the
resampling onto the DWI grid. An update returns a full
:class:`~StrokePredictorLib.inference.Prediction` (probability/outcome map, mask, volume with its
interval, attention), identical to a fresh prediction with the same values.

Scenarios::

    session = WhatIf(predictor, case, record)
    grid = parse_what_if(["onset_to_imaging_h=2,6,12", "treatment=none,thrombectomy"])
    results = session.scenarios(grid)               # 6 scenarios, base record otherwise
    saved = difference_map(results[0].prediction, results[1].prediction)

:func:`what_if_files` renders the table (TSV and JSON, volumes with intervals per scenario) and a
plot of the volume against onset time with one line per treatment.
"""

from __future__ import annotations

import csv
import io as _io
import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from StrokePredictorLib.clinical import FEATURE_NAMES, ClinicalRecord, feature, parse_value
from StrokePredictorLib.errors import ClinicalValueError
from StrokePredictorLib.inference import EncodedCase, Prediction, Predictor
from StrokePredictorLib.preprocess import PreprocessedCase

logger = logging.getLogger(__name__)

#: Most scenarios one ``--what-if`` may ask for (each is one decoder pass and one set of samples).
MAX_SCENARIOS = 64

WHAT_IF_FILES = {"what_if_tsv": "what_if.tsv", "what_if_json": "what_if.json", "what_if_plot": "what_if.png",
                 "what_if_difference": "what_if_difference.nii.gz", "what_if_regions": "what_if_regions.nii.gz"}


@dataclass
class Scenario:
    """One what-if scenario.

    Attributes:
        changes: the fields set by the scenario (name -> canonical value, None = missing).
        record: the full clinical record used (the base record with ``changes`` applied).
        prediction: the result, on the DWI grid.
        seconds: wall time of the update.
    """

    changes: dict[str, float | str | None]
    record: ClinicalRecord
    prediction: Prediction
    seconds: float

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.changes.items()) or "as given"


def _show(value: float | str | None) -> str:
    if value is None:
        return "missing"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_what_if(items: Sequence[str]) -> dict[str, list[float | str | None]]:
    """Parse ``["onset_to_imaging_h=2,6,12", "treatment=none,thrombectomy"]``.

    Each item is ``field=value[,value...]``; a value may be ``unknown`` (missing). Values are
    validated against the clinical schema.

    Returns:
        field name (canonical) -> list of canonical values, in the order given.

    Raises:
        ClinicalValueError: malformed item, unknown field, field given twice, empty or repeated
            value, out-of-range value, or more than :data:`MAX_SCENARIOS` scenarios.
    """
    if not items:
        raise ClinicalValueError("--what-if needs at least one field=value[,value...], e.g. onset_to_imaging_h=2,6,12.")
    grid: dict[str, list[float | str | None]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise ClinicalValueError(
                f"--what-if item '{item}' must be written as field=value[,value...], e.g. treatment=none,thrombectomy."
            )
        feature_ = feature(key.strip())
        if feature_.name in grid:
            raise ClinicalValueError(f"--what-if: field '{feature_.name}' is given twice; list all its values once.")
        values: list[float | str | None] = []
        for raw in text.split(","):
            if not raw.strip():
                raise ClinicalValueError(
                    f"--what-if item '{item}' has an empty value; separate values by single commas."
                )
            value = parse_value(feature_, raw.strip(), where=f"--what-if field '{feature_.name}': ")
            if value in values:
                raise ClinicalValueError(f"--what-if field '{feature_.name}': value '{raw.strip()}' is listed twice.")
            values.append(value)
        grid[feature_.name] = values
    count = int(np.prod([len(v) for v in grid.values()]))
    if count > MAX_SCENARIOS:
        raise ClinicalValueError(f"--what-if asks for {count} scenarios; at most {MAX_SCENARIOS} are allowed.")
    return grid


def scenario_changes(grid: Mapping[str, Sequence[float | str | None]]) -> list[dict[str, float | str | None]]:
    """Every combination of the grid's values (the last field varies fastest)."""
    names = list(grid)
    return [dict(zip(names, combination)) for combination in itertools.product(*(grid[n] for n in names))]  # noqa: B905


class WhatIf:
    """A case whose imaging features are cached, for fast clinical what-if updates.

    Args:
        predictor: the predictor (bundle, device, Monte-Carlo and post-processing settings).
        case: the preprocessed case (:func:`StrokePredictorLib.preprocess.preprocess`).
        clinical: the base clinical record (None: all missing).
        cpu_bf16: on the CPU, run the re-computed part under bfloat16 autocast (about twice as fast
            on CPUs with native bf16; probabilities differ from the fp32 prediction by up to a few
            hundredths, so compare scenarios of one session with each other, not with a fp32
            prediction). Off by default: updates then equal fresh predictions exactly.
    """

    def __init__(self, predictor: Predictor, case: PreprocessedCase | EncodedCase,
                 clinical: ClinicalRecord | None = None, *, cpu_bf16: bool = False) -> None:
        self.predictor = predictor
        self.encoded = case if isinstance(case, EncodedCase) else predictor.encode(case)
        self.base = clinical if clinical is not None else ClinicalRecord()
        self.cpu_bf16 = bool(cpu_bf16) and predictor.device.type == "cpu"

    def _predict(self, record: ClinicalRecord, effects: bool) -> Prediction:
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16):
            return self.predictor.predict_encoded(self.encoded, record, effects=effects)

    def record(self, changes: Mapping[str, object]) -> ClinicalRecord:
        """The base record with ``changes`` (raw or canonical values, validated) applied."""
        values = dict(self.base.values)
        for key, raw in changes.items():
            feature_ = feature(key)
            values[feature_.name] = parse_value(feature_, raw)
        return ClinicalRecord(values)

    def update(self, changes: Mapping[str, object] | None = None, *, effects: bool = False) -> Prediction:
        """Predict with the base record changed by ``changes``; only the clinical-dependent part
        runs. ``effects`` also measures each feature's effect (one decoder pass per given feature)."""
        return self._predict(self.record(changes or {}), effects)

    def predict(self, record: ClinicalRecord) -> Prediction:
        """Predict with a whole clinical ``record`` (canonical values) instead of changes to the base."""
        return self._predict(record, False)

    def scenarios(self, grid: Mapping[str, Sequence[float | str | None]]) -> list[Scenario]:
        """One :class:`Scenario` per combination of ``grid`` (from :func:`parse_what_if`)."""
        results = []
        for changes in scenario_changes(grid):
            tick = time.perf_counter()
            record = self.record(changes)
            prediction = self._predict(record, False)
            results.append(Scenario(dict(changes), record, prediction, time.perf_counter() - tick))
        return results


def difference_map(first: Prediction, second: Prediction) -> np.ndarray:
    """``first.probability - second.probability`` on the DWI grid (float32, -1..1): with ``first``
    the scenario without treatment and ``second`` the one with, positive values are tissue that
    treatment is predicted to save.

    Raises:
        ValueError: the two predictions are not on the same grid.
    """
    if not first.geometry.same_grid(second.geometry, tolerance_mm=1e-6):
        raise ValueError("The two scenarios are not on the same grid.")
    return (first.probability.astype(np.float32) - second.probability.astype(np.float32)).astype(np.float32)


def region_map(first: Prediction, second: Prediction) -> np.ndarray:
    """uint8 on the DWI grid: 1 where only ``first``'s mask has lesion (e.g. tissue saved by the
    treatment of ``second``), 2 only ``second``'s, 3 both, 0 neither."""
    return (first.mask.astype(bool) * 1 + second.mask.astype(bool) * 2).astype(np.uint8)


def saved_volume_ml(first: Prediction, second: Prediction) -> dict[str, float]:
    """Volumes of the two masks and their differences (mL): ``saved`` lies in ``first`` and not in
    ``second``, ``added`` the other way round, ``net`` = first - second."""
    voxel = first.geometry.voxel_volume_ml
    a, b = first.mask.astype(bool), second.mask.astype(bool)
    return {"first": float(a.sum() * voxel), "second": float(b.sum() * voxel),
            "saved": float((a & ~b).sum() * voxel), "added": float((b & ~a).sum() * voxel),
            "net": float((a.sum() - b.sum()) * voxel)}


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------
def scenario_rows(scenarios: Sequence[Scenario], grid: Mapping[str, Sequence[object]]) -> list[dict]:
    """One row per scenario: the varied fields, then the volumes (mL) and the interval."""
    rows = []
    for scenario in scenarios:
        volume = scenario.prediction.volume_ml
        row: dict = {name: scenario.changes.get(name) for name in grid}
        row.update({
            "volume_ml": round(float(volume["mask"]), 3),
            "median_ml": round(float(volume["median"]), 3),
            "ci95_low_ml": round(float(volume["ci95"][0]), 3),
            "ci95_high_ml": round(float(volume["ci95"][1]), 3),
            "mc_ci95_low_ml": round(float(volume.get("mc_ci95", volume["ci95"])[0]), 3),
            "mc_ci95_high_ml": round(float(volume.get("mc_ci95", volume["ci95"])[1]), 3),
            "seconds": round(scenario.seconds, 3),
        })
        rows.append(row)
    return rows


def _numeric_axis(grid: Mapping[str, Sequence[object]]) -> str | None:
    """The field plotted on the x axis: onset time when varied, else the first numeric field."""
    if "onset_to_imaging_h" in grid:
        return "onset_to_imaging_h"
    for name, values in grid.items():
        if feature(name).kind in ("continuous", "ordinal") and any(v is not None for v in values):
            return name
    return None


def render_what_if_plot(scenarios: Sequence[Scenario], grid: Mapping[str, Sequence[object]], *, task: str = "",
                        title: str = "") -> bytes:
    """PNG: predicted volume (with its Monte-Carlo interval) against onset time (or the first
    numeric field), one line per combination of the other fields (e.g. per treatment)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    x_name = _numeric_axis(grid)
    others = [name for name in grid if name != x_name]
    figure = Figure(figsize=(7.5, 4.8), dpi=100)
    axis = figure.add_subplot(1, 1, 1)
    groups: dict[tuple, list[Scenario]] = {}
    for scenario in scenarios:
        groups.setdefault(tuple(scenario.changes.get(n) for n in others), []).append(scenario)
    for number, (key, members) in enumerate(groups.items()):
        label = ", ".join(f"{feature(n).label}: {_show(v)}" for n, v in zip(others, key)) or "volume"  # noqa: B905
        if x_name is None:
            xs = np.arange(len(members)) + 0.1 * number
        else:
            members = [m for m in members if m.changes.get(x_name) is not None]
            xs = np.array([float(m.changes[x_name]) for m in members])  # type: ignore[arg-type]
        if not len(members):
            continue
        volume = np.array([m.prediction.volume_ml["mask"] for m in members])
        low = np.array([m.prediction.volume_ml.get("mc_ci95", m.prediction.volume_ml["ci95"])[0] for m in members])
        high = np.array([m.prediction.volume_ml.get("mc_ci95", m.prediction.volume_ml["ci95"])[1] for m in members])
        line = axis.plot(xs, volume, marker="o", label=label)[0]
        axis.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if x_name is None:
        axis.set_xlabel("scenario")
    else:
        feature_ = feature(x_name)
        axis.set_xlabel(f"{feature_.label} ({feature_.unit})" if feature_.unit else feature_.label)
    what = "final infarct" if task == "outcome" else "lesion"
    axis.set_ylabel(f"predicted {what} volume (mL)")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    if len(groups) > 1 or others:
        axis.legend(fontsize=8)
    axis.set_title(f"{title + ': ' if title else ''}what-if ({task or 'model'}); band: Monte-Carlo 95% interval",
                   fontsize=9)
    figure.tight_layout()
    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def what_if_files(scenarios: Sequence[Scenario], grid: Mapping[str, Sequence[object]], *, base: ClinicalRecord,
                  bundle: dict, title: str = "") -> dict[str, bytes | np.ndarray]:
    """The what-if outputs as file name -> content (:data:`WHAT_IF_FILES`): the TSV and JSON tables
    and the plot; with exactly two scenarios also the comparison: the difference map
    (:func:`difference_map`, first minus second) and the region map (:func:`region_map`) as
    arrays on the DWI grid, and their volumes in the JSON (``comparison``). Written by
    :func:`StrokePredictorLib.outputs.write_outputs` with the rest."""
    rows = scenario_rows(scenarios, grid)
    columns = list(rows[0]) if rows else list(grid)
    text = _io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["unknown" if row[c] is None and c in grid else row[c] for c in columns])
    seconds = [s.seconds for s in scenarios]
    data = {
        "varied": {name: list(values) for name, values in grid.items()},
        "base_clinical": base.to_dict(),
        "scenarios": rows,
        "bundle": bundle,
        "update_seconds_median": float(np.median(seconds)) if seconds else None,
        "description": "volume_ml: thresholded lesion (mask) on the DWI grid; median_ml and mc_ci95: over the "
                       "Monte-Carlo samples; ci95: the prediction's 95% interval (Monte-Carlo interval widened by the "
                       "bundle's conformal margin). Fields not varied keep the base clinical values. Each scenario "
                       "re-runs only the clinical-dependent part of the network (imaging features computed once).",
        "fields": list(FEATURE_NAMES),
    }
    maps: dict[str, bytes | np.ndarray] = {}
    if len(scenarios) == 2:
        first, second = scenarios
        data["comparison"] = {
            "first": first.label, "second": second.label,
            "volumes_ml": saved_volume_ml(first.prediction, second.prediction),
            "difference_file": WHAT_IF_FILES["what_if_difference"], "regions_file": WHAT_IF_FILES["what_if_regions"],
            "description": "difference = probability of the first scenario minus the second; regions: 1 lesion in "
                           "the first only (e.g. tissue saved by the second's treatment), 2 in the second only, 3 both",
        }
        maps = {WHAT_IF_FILES["what_if_difference"]: difference_map(first.prediction, second.prediction),
                WHAT_IF_FILES["what_if_regions"]: region_map(first.prediction, second.prediction)}
    return {
        **maps,
        WHAT_IF_FILES["what_if_tsv"]: text.getvalue().encode(),
        WHAT_IF_FILES["what_if_json"]: (json.dumps(data, indent=2, allow_nan=False) + "\n").encode(),
        WHAT_IF_FILES["what_if_plot"]: render_what_if_plot(scenarios, grid, task=str(bundle.get("task", "")),
                                                           title=title),
    }
