"""Does the prediction follow the clinical values as it should? Behaviour checks.

``python -m Training behaviour --bundle B [--dwi D --adc A [--flair F] --clinical C.json] [--out R.json]``
``python -m Training behaviour --bundle B --data GENERATED_FOLDER [--max-cases N] [--out R.json]``

Runs one case (by default the bundled sample case) through a bundle, keeps its imaging features
(:class:`StrokePredictorLib.whatif.WhatIf`) and re-predicts the lesion volume under many clinical
scenarios. Checks, by task:

* **outcome** (final infarct)
    * ``onset_monotone``: for every treatment (and a missing one), a later onset never gives a
      smaller volume (beyond ``tolerance_ml``);
    * ``treatment_not_larger``: at every onset, no treatment gives a larger volume than none;
    * ``missing_between``: at every onset, a missing treatment lies between none and thrombectomy;
    * ``effects_top3``: onset time, treatment and NIHSS have the three largest effects, where a
      feature's effect is the range (largest minus smallest volume) over its whole valid range
      and "missing", the other features as in the case's record;
    * ``growth``: volume with no treatment at 20 h over that with thrombectomy at 1 h (NIHSS 16
      in both) at least ``min_growth`` (1.3; asked of cases whose simulated final
      infarct grows by 1.5x or more between those two scenarios).
* **acute** (lesion on the acute DWI)
    * ``stable``: over every feature's whole range, "missing" and the extreme joint scenarios,
      the volume moves by at most ``max_acute_change`` (10%) of the case's own volume
      (largest minus smallest).

**Simulated growth** (``--data``, a folder written by ``python -m Training generate``, whose
``dataset.json`` holds each case's simulated final infarct under the two growth scenarios,
:data:`Training.synthesis.outcome.GROWTH_SCENARIOS`): on every case whose simulated infarct grows by
``min_simulated_growth`` (1.5x) or more from thrombectomy at 1 h to no treatment at 20 h (NIHSS 16 in
both, the case's other clinical values as recorded), an outcome bundle's predicted volume must grow
by ``min_growth`` (1.3x) or more (``growth_cases``: every such case, the median beside it); an acute
bundle's volume must move by at most ``max_acute_change`` between the same two scenarios
(``stable_cases``). Beside each outcome case the report says whether the no-treatment prediction
touches the case's acute lesion (``touches_lesion``; every simulated final infarct holds it): a
prediction that grows somewhere else passes the ratio, and is named in the detail, not hidden.

**Effects by path** (``--paths``, an outcome bundle with a growth head, one case): each feature's
range effect again with the growth offset's inputs held at the case's own record
(:func:`growth_inputs_frozen`), so that the swept value reaches the prediction only through the
cross-attention and the decoder ("core path"); the rest of the effect is the growth offset's.

Every scenario uses canonical clinical values (treatment ``"none"`` is the category *none*, not
"missing"). :func:`check_behaviour` takes any ``record -> volume`` function, so the checks are
tested on controllable fake predictors and run unchanged on the next model. Prints one line per
check; exit status 0 when all pass, 1 when any fails, 2 on bad input.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib.clinical import FEATURES, ClinicalRecord, read_json
from StrokePredictorLib.errors import StrokePredictorError
from Training import config as config_mod

logger = logging.getLogger(__name__)

VolumeFunction = Callable[[ClinicalRecord], float]

ONSETS_H = (1.0, 3.0, 6.0, 12.0, 24.0)
TREATMENTS = ("none", "thrombolysis", "thrombectomy", "both")
EXPECTED_TOP = ("onset_to_imaging_h", "treatment", "nihss")
SWEEP_POINTS = 5


@dataclass
class CheckResult:
    """One check: its name, whether it passed, the measured value, the limit and what was seen."""

    name: str
    passed: bool
    value: float | str
    limit: str
    detail: str = ""
    volumes: dict = field(default_factory=dict)


def _with(record: ClinicalRecord, **values: float | str | None) -> ClinicalRecord:
    return ClinicalRecord({**record.values, **values})


def sweep_values(name: str, points: int = SWEEP_POINTS) -> list[float | str | None]:
    """A feature's whole valid range (``points`` evenly spaced values, integral for ordinal
    features, every category for categorical ones) and missing (None)."""
    feature_ = next(f for f in FEATURES if f.name == name)
    if feature_.kind in ("binary", "categorical"):
        return [*feature_.categories, None]
    assert feature_.minimum is not None and feature_.maximum is not None
    values = np.linspace(feature_.minimum, feature_.maximum, points)
    if feature_.kind == "ordinal":
        values = np.unique(np.round(values))
    return [float(v) for v in values] + [None]


def feature_effects(volume: VolumeFunction, base: ClinicalRecord, points: int = SWEEP_POINTS
                    ) -> tuple[dict[str, float], dict[str, dict]]:
    """Each feature's range effect: largest minus smallest volume as it sweeps
    :func:`sweep_values`, the others as in ``base``. Returns the effects and the volumes seen."""
    effects, seen = {}, {}
    for feature_ in FEATURES:
        volumes = {("missing" if v is None else str(v)): float(volume(_with(base, **{feature_.name: v})))
                   for v in sweep_values(feature_.name, points)}
        effects[feature_.name] = max(volumes.values()) - min(volumes.values())
        seen[feature_.name] = volumes
    return effects, seen


def effects_check(volume: VolumeFunction, base: ClinicalRecord, points: int = SWEEP_POINTS) -> CheckResult:
    """``effects_top3``: onset time, treatment and NIHSS carry the three largest range effects
    (:func:`feature_effects`), each of them non-zero."""
    effects, seen = feature_effects(volume, base, points)
    ranked = sorted(effects, key=lambda n: -effects[n])
    top = ranked[:3]
    return CheckResult(
        "effects_top3", set(top) == set(EXPECTED_TOP) and effects[top[2]] > 0, ", ".join(top),
        "onset_to_imaging_h, treatment, nihss (any order), each with a non-zero effect",
        "range effects (mL): " + ", ".join(f"{n} {effects[n]:.2f}" for n in ranked),
        {"effects_ml": {n: round(effects[n], 3) for n in ranked}, "sweeps": seen})


def _outcome_checks(volume: VolumeFunction, base: ClinicalRecord, tolerance_ml: float, min_growth: float,
                    onsets: Sequence[float], points: int) -> list[CheckResult]:
    results = []
    grid: dict[str, dict[float, float]] = {}
    for treatment in (*TREATMENTS, None):
        key = "missing" if treatment is None else treatment
        grid[key] = {h: float(volume(_with(base, onset_to_imaging_h=h, treatment=treatment))) for h in onsets}
    table = {t: {f"{h:g} h": round(v, 3) for h, v in row.items()} for t, row in grid.items()}

    drops = [(t, a, b, row[a] - row[b]) for t, row in grid.items() for a, b in zip(onsets, onsets[1:])  # noqa: B905
             if row[b] < row[a] - tolerance_ml]
    worst = max((d[3] for d in drops), default=0.0)
    results.append(CheckResult(
        "onset_monotone", not drops, round(worst, 3), f"no drop larger than {tolerance_ml} mL",
        "; ".join(f"{t}: {a:g} h -> {b:g} h falls {d:.2f} mL" for t, a, b, d in drops[:4]) or
        "a later onset never gives a smaller volume", table))

    larger = [(t, h, grid[t][h] - grid["none"][h]) for t in TREATMENTS[1:] for h in onsets
              if grid[t][h] > grid["none"][h] + tolerance_ml]
    results.append(CheckResult(
        "treatment_not_larger", not larger, round(max((d for *_, d in larger), default=0.0), 3),
        f"no treatment more than {tolerance_ml} mL above none",
        "; ".join(f"{t} at {h:g} h is {d:.2f} mL above none" for t, h, d in larger[:4]) or
        "no treatment gives a larger volume than none", table))

    outside = []
    for h in onsets:
        low, high = sorted((grid["none"][h], grid["thrombectomy"][h]))
        if not low - tolerance_ml <= grid["missing"][h] <= high + tolerance_ml:
            outside.append((h, grid["missing"][h], low, high))
    results.append(CheckResult(
        "missing_between", not outside, len(outside), "missing treatment within [thrombectomy, none] at every onset",
        "; ".join(f"{h:g} h: {m:.2f} mL outside {lo:.2f}-{hi:.2f}" for h, m, lo, hi in outside[:4]) or
        "a missing treatment lies between none and thrombectomy", table))

    results.append(effects_check(volume, base, points))

    early = float(volume(_with(base, onset_to_imaging_h=1.0, treatment="thrombectomy", nihss=16.0)))
    late = float(volume(_with(base, onset_to_imaging_h=20.0, treatment="none", nihss=16.0)))
    ratio = (late + 1e-9) / (early + 1e-9) if early > 0 or late > 0 else 1.0
    results.append(CheckResult(
        "growth", ratio >= min_growth, round(ratio, 3), f">= {min_growth}x (none at 20 h over thrombectomy at 1 h)",
        f"thrombectomy 1 h: {early:.2f} mL, none 20 h: {late:.2f} mL (NIHSS 16 in both)",
        {"thrombectomy_1h": round(early, 3), "none_20h": round(late, 3)}))
    return results


def _acute_checks(volume: VolumeFunction, base: ClinicalRecord, max_change: float, points: int) -> list[CheckResult]:
    reference = float(volume(base))
    _, seen = feature_effects(volume, base, points)
    extremes = {
        "thrombectomy 1 h, NIHSS 5": _with(base, onset_to_imaging_h=1.0, treatment="thrombectomy", nihss=5.0),
        "none 20 h, NIHSS 20": _with(base, onset_to_imaging_h=20.0, treatment="none", nihss=20.0),
        "all missing": ClinicalRecord(),
        "none 48 h, NIHSS 42, age 110": _with(base, onset_to_imaging_h=48.0, treatment="none", nihss=42.0, age=110.0),
        "both 0 h, NIHSS 0, age 18": _with(base, onset_to_imaging_h=0.0, treatment="both", nihss=0.0, age=18.0),
    }
    joint = {label: float(volume(record)) for label, record in extremes.items()}
    every = [reference, *joint.values(), *(v for sweep in seen.values() for v in sweep.values())]
    spread = max(every) - min(every)
    relative = spread / reference if reference > 0 else (0.0 if spread == 0 else math.inf)
    return [CheckResult(
        "stable", relative <= max_change, round(relative, 4), f"<= {max_change:.0%} of the case's volume",
        f"case volume {reference:.2f} mL; {len(every)} scenarios range {min(every):.2f}-{max(every):.2f} mL",
        {"reference_ml": round(reference, 3), "joint": {k: round(v, 3) for k, v in joint.items()}, "sweeps": seen})]


def check_behaviour(volume: VolumeFunction, base: ClinicalRecord, task: str, *, tolerance_ml: float = 0.1,
                    min_growth: float = 1.3, max_acute_change: float = 0.10, onsets: Sequence[float] = ONSETS_H,
                    points: int = SWEEP_POINTS) -> list[CheckResult]:
    """Run the checks of ``task`` (``outcome`` or ``acute``) on a ``record -> volume (mL)`` function.

    Args:
        volume: predicted lesion volume for a clinical record (canonical values).
        base: the case's own record; scenarios change some of its fields.
        task: ``outcome`` or ``acute``.
        tolerance_ml: slack of the outcome orderings (thresholded volumes move in voxel steps).
        min_growth: smallest ratio none-at-20-h over thrombectomy-at-1-h.
        max_acute_change: largest relative range of the acute volume.
        onsets: onset times (h) of the outcome orderings, increasing.
        points: values per numeric feature in the sweeps.

    Raises:
        ValueError: unknown task or onsets not increasing.
    """
    if task not in ("outcome", "acute"):
        raise ValueError(f"task must be outcome or acute, got {task!r}")
    if list(onsets) != sorted(set(onsets)) or len(onsets) < 2:
        raise ValueError("onsets must be at least two increasing times")
    if task == "acute":
        return _acute_checks(volume, base, max_acute_change, points)
    return _outcome_checks(volume, base, tolerance_ml, min_growth, onsets, points)


def _growth_parts(model: object) -> tuple:
    """The network's growth head and clinical encoder; StrokePredictorError when it has no growth head with
    clinical input."""
    head = getattr(model, "growth", None)
    clinical = getattr(model, "clinical", None)
    if head is None or clinical is None or not head.clinical:
        raise StrokePredictorError("--paths needs an outcome bundle with a growth head and clinical input "
                                   "(train-synth --growth).")
    return head, clinical


@contextmanager
def growth_inputs_frozen(model: object, record: ClinicalRecord) -> Iterator[None]:
    """Inside the block, ``model``'s growth offset is computed from ``record`` whatever clinical values
    the prediction gets, so those values act only through the cross-attention and the decoder.

    Raises:
        StrokePredictorError: the network has no growth head with clinical input.
    """
    import torch

    from StrokePredictorLib.clinical import encode

    head, clinical = _growth_parts(model)
    values, missing = (torch.from_numpy(a)[None] for a in encode(record))
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    values, missing = values.to(device), missing.to(device)
    with torch.no_grad():
        tokens = clinical(values, missing)
    original = head.forward

    def frozen(_tokens: object, given: torch.Tensor, _missing: object) -> torch.Tensor:
        batch = given.shape[0]
        return original(tokens.expand(batch, -1, -1), values.expand(batch, -1), missing.expand(batch, -1))

    head.forward = frozen
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def behaviour_predictor(bundle: str | Path, device: str = "cpu", mc_samples: int = 1) -> object:
    """The :class:`~StrokePredictorLib.inference.Predictor` the checks use: dropout off with one
    sample (the default: fast, and every ordering exact), or ``mc_samples`` Monte-Carlo samples with
    seed 0, as the product predicts (20 by default there). The same seed draws the same dropout masks
    in every scenario, so the scenarios still differ in the clinical values alone."""
    from StrokePredictorLib.inference import Predictor

    return Predictor(bundle, device=device, mc_samples=mc_samples, seed=0, deterministic=mc_samples == 1)


def bundle_volume_function(bundle: str | Path | object, dwi: str | Path, adc: str | Path, flair: str | Path | None,
                           base: ClinicalRecord, *, cpu_bf16: bool = False, device: str = "cpu", mc_samples: int = 1,
                           lesion: str | Path | None = None) -> tuple[VolumeFunction, str, dict]:
    """``record -> volume`` of a bundle on one case (imaging features computed once; dropout off
    unless ``mc_samples`` > 1 (:func:`behaviour_predictor`), the bundle's post-processing; the
    thresholded volume on the DWI grid). ``bundle`` is a bundle folder or a
    :class:`~StrokePredictorLib.inference.Predictor` (reused over cases). With ``lesion`` (the
    case's acute lesion mask on the DWI grid) the function also has ``touches(record) -> bool``:
    whether that prediction's mask overlaps the lesion (every simulated final infarct holds its acute
    lesion, so a growing prediction that never touches it grows something else).
    Returns the function, the bundle's task and its description."""
    from StrokePredictorLib.inference import Predictor
    from StrokePredictorLib.io import read_volume
    from StrokePredictorLib.preprocess import preprocess
    from StrokePredictorLib.whatif import WhatIf

    predictor = bundle if isinstance(bundle, Predictor) else behaviour_predictor(bundle, device, mc_samples)
    case = preprocess(read_volume(dwi, role="DWI"), read_volume(adc, role="ADC"),
                      read_volume(flair, role="FLAIR") if flair else None,
                      grid=predictor.bundle.grid, normalization=predictor.bundle.normalization)
    session = WhatIf(predictor, case, base, cpu_bf16=cpu_bf16)
    target = read_volume(lesion, role="lesion mask").array > 0 if lesion is not None else None
    cache: dict[tuple, tuple[float, bool]] = {}

    def predicted(record: ClinicalRecord) -> tuple[float, bool]:
        key = tuple(record.values[f.name] for f in FEATURES)
        if key not in cache:
            prediction = session.predict(record)
            mask = prediction.mask.astype(bool)
            if target is not None and target.shape != mask.shape:
                raise StrokePredictorError(f"Lesion mask {lesion}: shape {target.shape}, expected the DWI's "
                                           f"{mask.shape}.")
            cache[key] = (float(prediction.volume_ml["mask"]), target is not None and bool((mask & target).any()))
        return cache[key]

    def volume(record: ClinicalRecord) -> float:
        return predicted(record)[0]

    if target is not None:
        volume.touches = lambda record: predicted(record)[1]  # type: ignore[attr-defined]
    return volume, predictor.bundle.task, predictor.bundle.describe()


def scenario_record(base: ClinicalRecord, scenario: dict) -> ClinicalRecord:
    """``base`` with a growth scenario's NIHSS, onset time and treatment."""
    return _with(base, nihss=float(scenario["nihss"]), onset_to_imaging_h=float(scenario["onset_h"]),
                 treatment=str(scenario["treatment"]))


def check_simulated_growth(cases: Iterable[tuple[str, float, VolumeFunction, ClinicalRecord]], task: str, *,
                           min_simulated_growth: float = 1.5, min_growth: float = 1.3,
                           max_acute_change: float = 0.10) -> list[CheckResult]:
    """The growth check over simulated cases (module docstring).

    Args:
        cases: ``(case id, simulated growth, record -> volume, the case's record)`` per case (consumed
            one at a time: a volume function is called only for the cases that are checked).
        task: ``outcome`` (``growth_cases``) or ``acute`` (``stable_cases``).
    """
    from Training.synthesis.outcome import GROWTH_SCENARIOS

    early_scenario, late_scenario = GROWTH_SCENARIOS.values()
    rows, ratios = {}, []
    for case_id, simulated, volume, base in cases:
        if task == "outcome" and not simulated >= min_simulated_growth:
            continue
        early = float(volume(scenario_record(base, early_scenario)))
        late = float(volume(scenario_record(base, late_scenario)))
        if task == "outcome":
            ratio = late / early if early > 0 else (math.inf if late > 0 else 1.0)
        else:
            reference = max(early, late)
            ratio = abs(late - early) / reference if reference > 0 else 0.0
        ratios.append(ratio)
        rows[case_id] = {"simulated_growth": round(simulated, 3), "early_ml": round(early, 3),
                         "late_ml": round(late, 3), "ratio": round(ratio, 4)}
        if task == "outcome":  # a detection failure counts as a growth miss, and is named as such
            rows[case_id]["undetected"] = early == 0 and late == 0
            touches = getattr(volume, "touches", None)
            if touches is not None:  # informative, not a condition: does the grown prediction reach the lesion?
                rows[case_id]["touches_lesion"] = touches(scenario_record(base, late_scenario))
    if not rows:
        return [CheckResult("growth_cases" if task == "outcome" else "stable_cases", False, "no case",
                            f"cases whose simulated infarct grows >= {min_simulated_growth}x",
                            "no case qualifies: nothing was checked", {})]
    median = float(np.median(ratios))
    if task == "outcome":
        passing = sum(r >= min_growth for r in ratios)
        undetected = sum(row["undetected"] for row in rows.values())
        touched = [row for row in rows.values() if row.get("touches_lesion") is not None]
        off_target = [case_id for case_id, row in rows.items()
                      if row.get("touches_lesion") is False and row["ratio"] >= min_growth]
        return [CheckResult(
            "growth_cases", passing == len(ratios), f"{passing}/{len(ratios)}",
            f"every case >= {min_growth}x (simulated growth >= {min_simulated_growth}x)",
            f"predicted growth none 20 h / thrombectomy 1 h: median {median:.2f}x, "
            f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} case(s)"
            + (f"; {undetected} not segmented in either scenario (counted as misses)" if undetected else "")
            + (f"; the no-treatment prediction touches the acute lesion in "
               f"{sum(bool(row['touches_lesion']) for row in touched)} of {len(touched)}" if touched else "")
            + (f" ({len(off_target)} growing case(s) grow something else: {', '.join(off_target)})"
               if off_target else ""),
            rows)]
    passing = sum(r <= max_acute_change for r in ratios)
    return [CheckResult(
        "stable_cases", passing == len(ratios), f"{passing}/{len(ratios)}",
        f"every case within {max_acute_change:.0%} between the two scenarios",
        f"relative change median {median:.1%}, largest {max(ratios):.1%} over {len(ratios)} case(s)", rows)]


def dataset_cases(bundle: str | Path, folder: str | Path, *, max_cases: int = 0, cpu_bf16: bool = False,
                  device: str = "cpu", mc_samples: int = 1
                  ) -> tuple[Iterator[tuple[str, float, VolumeFunction, ClinicalRecord]], int, str, dict]:
    """The cases of a generated folder for :func:`check_simulated_growth` (lazily: a case is read and
    encoded only when its volume is first asked for), their number, the bundle's task and description.

    Raises:
        StrokePredictorError: not a generated folder, or one written before the scenarios were recorded.
    """
    import json

    from StrokePredictorLib.clinical import read_csv
    from Training.synthesis.generate import case_paths

    folder = Path(folder)
    description = folder / "dataset.json"
    if not description.is_file() or not (folder / "clinical.csv").is_file():
        raise StrokePredictorError(f"--data {folder}: not a folder written by 'python -m Training generate' "
                                   "(dataset.json and clinical.csv expected).")
    metadata = json.loads(description.read_text())
    records = read_csv(folder / "clinical.csv")
    cases = metadata.get("cases", [])
    if cases and "scenarios_template_ml" not in cases[0].get("outcome", {}):
        raise StrokePredictorError(f"--data {folder}: its dataset.json has no simulated growth scenarios (written by "
                                   "an older generator); generate it again with the same seed.")
    predictor = behaviour_predictor(bundle, device, mc_samples)
    chosen = cases[: max_cases or None]

    def lazy(paths: dict[str, Path], base: ClinicalRecord) -> VolumeFunction:
        made: list[VolumeFunction] = []

        def volume(record: ClinicalRecord) -> float:
            if not made:
                made.append(bundle_volume_function(predictor, paths["dwi"], paths["adc"],
                                                   paths["flair"] if paths["flair"].is_file() else None, base,
                                                   cpu_bf16=cpu_bf16,
                                                   lesion=paths["mask"] if paths["mask"].is_file() else None)[0])
            return made[0](record)

        def touches(record: ClinicalRecord) -> bool | None:
            volume(record)
            return made[0].touches(record) if hasattr(made[0], "touches") else None

        volume.touches = touches  # type: ignore[attr-defined]
        return volume

    def generate() -> Iterator[tuple[str, float, VolumeFunction, ClinicalRecord]]:
        for meta in chosen:
            base = records.get(meta["case_id"], ClinicalRecord())
            yield (meta["case_id"], float(meta["outcome"]["scenarios_template_ml"]["growth"]),
                   lazy(case_paths(folder, meta["case_id"]), base), base)

    return generate(), len(chosen), predictor.bundle.task, predictor.bundle.describe()


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
SAMPLE = Path(__file__).resolve().parents[2] / "StrokePredictor" / "Resources" / "SampleData"


@dataclass(frozen=True)
class BehaviourConfig:
    """Options of ``python -m Training behaviour``."""

    bundle: Path | None = field(default=None, metadata={"help": "bundle folder to check (required)"})
    dwi: Path | None = field(default=None, metadata={"help": "DWI of the case (default: the bundled sample case)"})
    adc: Path | None = field(default=None, metadata={"help": "ADC of the case (with --dwi)"})
    flair: Path | None = field(default=None, metadata={"help": "optional FLAIR of the case"})
    clinical: Path | None = field(default=None, metadata={"help": "clinical JSON of the case (default: the "
                                                                  "sample case's; none: all missing)"})
    task: str = field(default="", metadata={"help": "outcome or acute checks (default: the bundle's task)"})
    tolerance_ml: float = field(default=0.1, metadata={"help": "slack of the outcome orderings, mL"})
    min_growth: float = field(default=1.3, metadata={"help": "outcome: smallest ratio none 20 h / thrombectomy 1 h"})
    max_acute_change: float = field(default=0.10, metadata={"help": "acute: largest relative range of the volume"})
    points: int = field(default=SWEEP_POINTS, metadata={"help": "values per numeric feature in the sweeps"})
    cpu_bf16: bool = field(default=False, metadata={"help": "re-run the decoder under bf16 autocast (faster)"})
    out: Path | None = field(default=None, metadata={"help": "write the full results (every volume) as JSON"})
    data: Path | None = field(default=None, metadata={
        "help": "a generated folder (python -m Training generate): check the growth between the two scenarios on "
                "its simulated cases instead of the sweeps on one case"})
    max_cases: int = field(default=0, metadata={"help": "with --data: at most this many cases (0: all)"})
    paths: bool = field(default=False, metadata={
        "help": "outcome bundle with a growth head, one case: also split each feature's effect into the part "
                "through the cross-attention and decoder and the part through the growth offset"})
    min_simulated_growth: float = field(default=1.5, metadata={
        "help": "with --data: outcome cases whose simulated infarct grows at least this much are checked"})
    mc_samples: int = field(default=1, metadata={
        "help": "Monte-Carlo samples of every prediction: 1 predicts with dropout off; 20 (seed 0) as the product "
                "does"})

    def __post_init__(self) -> None:
        if self.task not in ("", "outcome", "acute"):
            raise ValueError(f"task must be outcome or acute, got {self.task!r}")
        if self.tolerance_ml < 0 or self.min_growth <= 0 or not 0 < self.max_acute_change < 10:
            raise ValueError("tolerance_ml must be >= 0, min_growth > 0 and max_acute_change in (0, 10)")
        if not 1 <= self.mc_samples <= 100:
            raise ValueError(f"mc_samples must lie between 1 and 100, got {self.mc_samples}")
        if not 2 <= self.points <= 50:
            raise ValueError(f"points must lie between 2 and 50, got {self.points}")


def run(config: BehaviourConfig) -> tuple[list[CheckResult], dict]:
    """Run the checks the command line asks for; returns the results and the report."""
    if config.bundle is None:
        raise StrokePredictorError("--bundle is required (a bundle folder).")
    if config.data is not None:
        if config.dwi is not None or config.clinical is not None:
            raise StrokePredictorError("--data checks a generated folder: give no --dwi, --adc or --clinical with it.")
        cases, count, task, described = dataset_cases(config.bundle, config.data, max_cases=config.max_cases,
                                                      cpu_bf16=config.cpu_bf16, mc_samples=config.mc_samples)
        task = config.task or task
        results = check_simulated_growth(cases, task, min_simulated_growth=config.min_simulated_growth,
                                         min_growth=config.min_growth, max_acute_change=config.max_acute_change)
        report = {"bundle": described, "task": task, "case": {"dwi": f"{config.data} ({count} cases)"},
                  "passed": all(r.passed for r in results), "checks": [asdict(r) for r in results],
                  "settings": config_mod.to_dict(config)}
        return results, report
    if (config.dwi is None) != (config.adc is None):
        raise StrokePredictorError("--dwi and --adc go together (or give neither for the sample case).")
    sample = config.dwi is None
    dwi = config.dwi or SAMPLE / "StrokePredictorSample_dwi.nii.gz"
    adc = config.adc or SAMPLE / "StrokePredictorSample_adc.nii.gz"
    flair = config.flair or (SAMPLE / "StrokePredictorSample_flair.nii.gz" if sample else None)
    clinical_path = config.clinical or (SAMPLE / "StrokePredictorSample_clinical.json" if sample else None)
    base = read_json(clinical_path) if clinical_path else ClinicalRecord()
    bundle: object = config.bundle
    if config.paths:
        bundle = behaviour_predictor(config.bundle, "cpu", config.mc_samples)
        _growth_parts(bundle.bundle.model)  # refuse a network without a growth head before the sweeps
    volume, task, described = bundle_volume_function(bundle, dwi, adc, flair, base, cpu_bf16=config.cpu_bf16,
                                                     mc_samples=config.mc_samples)
    task = config.task or task
    results = check_behaviour(volume, base, task, tolerance_ml=config.tolerance_ml, min_growth=config.min_growth,
                              max_acute_change=config.max_acute_change, points=config.points)
    report = {"bundle": described, "task": task, "case": {"dwi": str(dwi), "clinical": base.to_dict()},
              "passed": all(r.passed for r in results), "checks": [asdict(r) for r in results],
              "settings": config_mod.to_dict(config)}
    if config.paths:
        every, _ = feature_effects(volume, base, config.points)
        core_volume = bundle_volume_function(bundle, dwi, adc, flair, base, cpu_bf16=config.cpu_bf16)[0]
        with growth_inputs_frozen(bundle.bundle.model, base):  # type: ignore[attr-defined]
            core, _ = feature_effects(core_volume, base, config.points)
        report["effects_by_path"] = {name: {"all_ml": round(every[name], 3), "core_path_ml": round(core[name], 3)}
                                     for name in sorted(every, key=lambda n: -every[n])}
    return results, report


def main(argv: list[str]) -> int:
    config = config_mod.parse(BehaviourConfig, argv, __doc__.split("\n")[0], prog="python -m Training behaviour")
    results, report = run(config)
    width = max(len(r.name) for r in results)
    print(f"{report['bundle'].get('name', '')} ({report['task']}), {report['case']['dwi']}")
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.name:<{width}}  {r.value}  (limit: {r.limit})  {r.detail}")
    if "effects_by_path" in report:
        print("range effects (mL): all paths / through the cross-attention and decoder alone (the rest: growth offset)")
        for name, split in report["effects_by_path"].items():
            print(f"  {name:<20}  {split['all_ml']:9.2f}  {split['core_path_ml']:9.2f}")
    if config.out:
        from StrokePredictorLib.io import write_json

        write_json(report, config.out, overwrite=True)
    return 0 if report["passed"] else 1
