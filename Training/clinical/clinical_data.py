"""``python -m Training clinical``: write a clinical CSV in the schema's ten features.

Two modes:

* ``--input ISLES_DIR --output clinical.csv [--seed S]``: one row per case of an ISLES 2022
  folder. Age and sex come from the JSON sidecars where present (marked ``observed``); every
  other value is simulated (marked ``simulated``) consistently with the case's ground-truth
  lesion, and some are left missing at realistic rates (marked ``missing``). The marks go to a
  companion ``<output stem>_sources.json``. The NIHSS is drawn from the model fitted on the
  real SOOP pairs (:mod:`Training.clinical.nihss`, lesion volume and location); the other features follow
  published distributions (sources in :data:`_DISTRIBUTIONS`'s comments). Deterministic for a
  seed: each case has its own random stream seeded by (seed, case id), so adding a case leaves
  the others unchanged.
* ``--from-csv THEIRS.csv --output clinical.csv [--mapping map.yaml] [--id-column ID]
  [--columns their=schema,...] [--units glucose=mg/dL,...]``: convert a researcher's own CSV
  into the schema (column names mapped, units converted); every bad value is reported with its
  row and column. The mapping file (YAML or JSON) holds ``id_column``, ``columns`` (their column
  -> schema field) and ``units`` (schema field -> unit in their file); flags override it.

Every run also writes the effective config as ``<output stem>_config.json``.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib import clinical
from StrokePredictorLib.errors import ClinicalValueError, InputImageError, OutputExistsError
from StrokePredictorLib.io import CaseRecord, discover_isles, read_volume, write_json
from Training import config as config_mod
from Training.clinical import nihss

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClinicalConfig:
    """Options of ``python -m Training clinical``."""

    input: Path | None = field(default=None, metadata={"help": "ISLES 2022 folder to simulate a clinical CSV for"})
    from_csv: Path | None = field(default=None, metadata={"help": "a researcher's clinical CSV to convert instead"})
    output: Path | None = field(default=None, metadata={"help": "clinical CSV to write (required)"})
    seed: int = field(default=0, metadata={"help": "random seed of the simulated values"})
    nihss_model: Path | None = field(default=None, metadata={
        "help": "NIHSS model JSON (default: Training/resources/nihss_model.json)"})
    mask_suffix: str = field(default="msk", metadata={
        "help": "derivative whose lesion drives the NIHSS (msk = acute lesion)"})
    missing_rate_scale: float = field(default=1.0, metadata={
        "help": "multiplies every simulated missingness rate (0 = complete data)"})
    mapping: Path | None = field(default=None, metadata={
        "help": "--from-csv: YAML/JSON with id_column, columns (theirs: schema), units (field: unit)"})
    id_column: str | None = field(default=None, metadata={"help": "--from-csv: case id column (default case_id)"})
    columns: tuple[str, ...] = field(default=(), metadata={
        "help": "--from-csv: column renames their=schema, comma-separated"})
    units: tuple[str, ...] = field(default=(), metadata={
        "help": "--from-csv: units field=unit, comma-separated (e.g. glucose=mg/dL)"})
    ignore_unknown: bool = field(default=False, metadata={"help": "--from-csv: drop columns that are no field"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing outputs"})


# ----------------------------------------------------------------------------------------
# Distributions of the simulated features (per case; rates are probabilities)
# ----------------------------------------------------------------------------------------
_DISTRIBUTIONS = {
    # Age of ischaemic stroke patients: mean about 70 years, SD about 13 (e.g. Get With The
    # Guidelines-Stroke registry, Fonarow et al., Stroke 2010; SOOP participants median 67).
    "age_mean": 70.0, "age_sd": 13.0,
    # Men are slightly over half of ischaemic stroke admissions (Appelros et al., Stroke 2009).
    "male": 0.53,
    # Onset unknown (wake-up or unwitnessed) in about a quarter of strokes (Mackey et al.,
    # Neurology 2011: 14% wake-up; Thomalla et al., Lancet Neurol 2011); otherwise onset-to-MRI
    # log-normal with median about 3.5 h in MRI-first centres (WAKE-UP / SITS-registry reports).
    "onset_unknown": 0.25, "onset_median_h": 3.5, "onset_log_sd": 0.8,
    # Admission systolic BP mean 160, SD 28 mmHg (International Stroke Trial, Leonardi-Bee et al.,
    # Stroke 2002).
    "sbp_mean": 158.0, "sbp_sd": 27.0,
    # Admission glucose: median about 6.6 mmol/L, right-skewed, hyperglycaemia (> 8 mmol/L) in
    # about a third (Capes et al., Stroke 2001), higher in diabetics (~25% of patients).
    "glucose_median": 6.6, "glucose_log_sd": 0.28, "diabetes": 0.25, "diabetes_factor": 1.45,
    # Atrial fibrillation in about 25% of ischaemic strokes, rising steeply with age
    # (Marini et al., Stroke 2005: 24.6%; 40% above 80 years).
    "af_logit_intercept": -1.1, "af_logit_per_decade": 0.55,
    # Prior stroke in about 20-25% (recurrent strokes: AHA Heart Disease and Stroke Statistics).
    "prior_stroke": 0.22,
    # Pre-stroke mRS 0..5 (population-based registries, e.g. Quinn et al., Stroke 2009):
    "prestroke_mrs": (0.58, 0.17, 0.10, 0.09, 0.05, 0.01),
    # Reperfusion: IV thrombolysis for about 40% of eligible (onset <= 4.5 h, NIHSS >= 4)
    # patients; thrombectomy for about half of patients with a large lesion and NIHSS >= 6
    # (overall about 15-25% thrombolysis and 10% thrombectomy, e.g. SITS-ISTR, German registries).
    "ivt_eligible": 0.45, "evt_large": 0.45, "evt_large_volume_ml": 15.0,
    # Missingness in registry data: NIHSS 3%, onset handled above, BP 5%, glucose 8%, AF 5%,
    # prior stroke 6%, pre-stroke mRS 12%, treatment 4% (e.g. SITS-ISTR completeness reports).
    "missing": {"nihss": 0.03, "systolic_bp": 0.05, "glucose": 0.08, "atrial_fibrillation": 0.05,
                "prior_stroke": 0.06, "prestroke_mrs": 0.12, "treatment": 0.04},
}


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """Independent random stream per (seed, case id)."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode())])


def lesion_features_of_case(record: CaseRecord, mask_path: Path) -> tuple[np.ndarray, float]:
    """NIHSS model features of a case's lesion in native space, and its volume in mL."""
    from StrokePredictorLib.preprocess import brain_mask

    dwi = read_volume(record.dwi, role="DWI")
    lesion = read_volume(mask_path, role="lesion mask")
    if not lesion.geometry.same_grid(dwi.geometry):
        raise InputImageError(f"Lesion mask {mask_path} is not on the DWI grid of case {record.case_id}.")
    brain = brain_mask(dwi.array, dwi.geometry.spacing) | (lesion.array > 0.5)
    center, sd = nihss.brain_reference(brain, dwi.geometry.ijk_to_ras)
    mask = lesion.array > 0.5
    volume = float(mask.sum()) * dwi.geometry.voxel_volume_ml
    return nihss.lesion_features(mask, dwi.geometry.ijk_to_ras, center, sd), volume


def simulate_case(
    case_id: str,
    *,
    seed: int,
    model: nihss.NihssModel,
    features: np.ndarray | None,
    volume_ml: float | None,
    age: float | None = None,
    sex: str | None = None,
    missing_rate_scale: float = 1.0,
) -> tuple[clinical.ClinicalRecord, dict[str, str], dict]:
    """Simulate the clinical values of one case.

    Args:
        case_id: the case id (seeds the case's random stream with ``seed``).
        model: the fitted NIHSS model.
        features: NIHSS model features of the ground-truth lesion (None: no mask, NIHSS missing).
        volume_ml: lesion volume (mL), for the thrombectomy rule.
        age, sex: observed values (from sidecars) or None to simulate.
        missing_rate_scale: multiplies every missingness rate.

    Returns:
        (record, sources {feature: observed|simulated|missing}, details {expected_nihss, ...}).
    """
    d = _DISTRIBUTIONS
    rng = case_rng(seed, case_id)
    missing_p = {k: min(1.0, v * missing_rate_scale) for k, v in d["missing"].items()}  # type: ignore[union-attr]
    draws = rng.random(len(missing_p))  # always drawn, so the streams do not depend on the data
    is_missing = dict(zip(missing_p, (draws < np.array(list(missing_p.values()))), strict=False))
    values: dict[str, float | str | None] = {}
    sources: dict[str, str] = {}

    simulated_age = float(np.clip(round(rng.normal(d["age_mean"], d["age_sd"])), 18, 100))
    if age is not None:
        values["age"], sources["age"] = float(age), "observed"
    else:
        values["age"], sources["age"] = simulated_age, "simulated"
    simulated_sex = "M" if rng.random() < d["male"] else "F"
    if sex is not None:
        values["sex"], sources["sex"] = sex, "observed"
    else:
        values["sex"], sources["sex"] = simulated_sex, "simulated"

    details: dict = {}
    nihss_value: int | None = None
    if features is not None:
        details["expected_nihss"] = float(model.expected(features))
        nihss_value = model.sample(features, rng)
    else:
        rng.random()
    values["nihss"] = None if (nihss_value is None or is_missing["nihss"]) else float(nihss_value)

    onset_unknown = rng.random() < d["onset_unknown"] * min(missing_rate_scale, 1 / d["onset_unknown"])
    onset = float(np.clip(rng.lognormal(math.log(d["onset_median_h"]), d["onset_log_sd"]), 0.3, 48.0))
    values["onset_to_imaging_h"] = None if onset_unknown else round(onset, 2)

    values["systolic_bp"] = float(np.clip(round(rng.normal(d["sbp_mean"], d["sbp_sd"])), 80, 260))
    diabetic = rng.random() < d["diabetes"]
    glucose = rng.lognormal(math.log(d["glucose_median"]), d["glucose_log_sd"])
    glucose *= d["diabetes_factor"] if diabetic else 1.0
    values["glucose"] = round(float(np.clip(glucose, 2.5, 30.0)), 1)
    age_now = float(values["age"])  # type: ignore[arg-type]
    logit = d["af_logit_intercept"] + d["af_logit_per_decade"] * (age_now - 70.0) / 10.0
    values["atrial_fibrillation"] = "yes" if rng.random() < 1 / (1 + math.exp(-logit)) else "no"
    values["prior_stroke"] = "yes" if rng.random() < d["prior_stroke"] else "no"
    values["prestroke_mrs"] = float(rng.choice(6, p=np.asarray(d["prestroke_mrs"]) / sum(d["prestroke_mrs"])))

    eligible_ivt = values["onset_to_imaging_h"] is not None and onset <= 4.5 and (nihss_value or 0) >= 4
    ivt = eligible_ivt and rng.random() < d["ivt_eligible"]
    large = (volume_ml or 0.0) >= d["evt_large_volume_ml"] and (nihss_value or 0) >= 6
    evt = large and rng.random() < d["evt_large"]
    values["treatment"] = {(False, False): "none", (True, False): "thrombolysis",
                           (False, True): "thrombectomy", (True, True): "both"}[(bool(ivt), bool(evt))]

    for name in ("systolic_bp", "glucose", "atrial_fibrillation", "prior_stroke", "prestroke_mrs", "treatment"):
        if is_missing[name]:
            values[name] = None
    for name in clinical.FEATURE_NAMES:
        if name not in sources:
            sources[name] = "missing" if values[name] is None else "simulated"
    if values["nihss"] is None and features is None:
        sources["nihss"] = "missing (no lesion mask)"
    record = clinical.validate(values)
    return record, sources, details


def _outcome_or_mask(record: CaseRecord, suffix: str) -> Path | None:
    if suffix == "msk":
        return record.mask
    if record.mask is None:
        return None
    candidate = record.mask.with_name(record.mask.name.replace("_msk", f"_{suffix}"))
    return candidate if candidate.is_file() else None


def simulate_dataset(config: ClinicalConfig) -> tuple[dict[str, clinical.ClinicalRecord], dict]:
    """Records and the sources document for every case of ``config.input``."""
    from tqdm import tqdm

    assert config.input is not None
    model = nihss.load_model(config.nihss_model)
    records: dict[str, clinical.ClinicalRecord] = {}
    cases: dict[str, dict] = {}
    for case in tqdm(discover_isles(config.input), desc="clinical", unit="case"):
        mask_path = _outcome_or_mask(case, config.mask_suffix)
        features, volume = (lesion_features_of_case(case, mask_path) if mask_path is not None else (None, None))
        record, sources, details = simulate_case(
            case.case_id, seed=config.seed, model=model, features=features, volume_ml=volume,
            age=case.age, sex=case.sex, missing_rate_scale=config.missing_rate_scale)
        records[case.case_id] = record
        cases[case.case_id] = {
            "sources": sources,
            "lesion_volume_ml": volume,
            "nihss_features": None if features is None else dict(
                zip(nihss.FEATURE_NAMES, map(float, features), strict=True)),
            **details,
        }
    document = {
        "description": "Provenance of every value in the clinical CSV: observed (JSON sidecar), "
                       "simulated (Training.clinical.clinical_data) or missing.",
        "seed": config.seed,
        "nihss_model": {"path": str(config.nihss_model or "Training/resources/nihss_model.json"),
                        "pearson_r_test": model.info.get("pearson_r_test")},
        "schema_version": clinical.SCHEMA_VERSION,
        "cases": cases,
    }
    return records, document


def _pairs(items: tuple[str, ...], what: str) -> dict[str, str]:
    result = {}
    for item in items:
        if "=" not in item:
            raise ClinicalValueError(f"--{what} entry '{item}' must be written as name=value.")
        key, value = item.split("=", 1)
        result[key.strip()] = value.strip()
    return result


def convert_csv(config: ClinicalConfig) -> dict[str, clinical.ClinicalRecord]:
    """Read a researcher's CSV with the mapping file and flags (flags win)."""
    assert config.from_csv is not None
    mapping: dict = config_mod.load_file(config.mapping) if config.mapping else {}
    unknown = set(mapping) - {"id_column", "columns", "units"}
    if unknown:
        raise ClinicalValueError(f"Mapping file {config.mapping}: unknown key(s) {', '.join(sorted(unknown))}; "
                                 "expected id_column, columns, units.")
    columns = {str(k): str(v) for k, v in (mapping.get("columns") or {}).items()}
    columns.update(_pairs(config.columns, "columns"))
    units = {str(k): str(v) for k, v in (mapping.get("units") or {}).items()}
    units.update(_pairs(config.units, "units"))
    units = {clinical.feature(k).name: v for k, v in units.items()}
    id_column = config.id_column or mapping.get("id_column") or "case_id"
    try:
        return clinical.read_csv(config.from_csv, id_column=id_column, column_map=columns, units=units,
                                 ignore_unknown=config.ignore_unknown)
    except ClinicalValueError as error:
        if not units:
            raise
        raise ClinicalValueError(_in_file_units(str(error), Path(config.from_csv), columns, units)) from None


def _in_file_units(message: str, path: Path, columns: dict[str, str], units: dict[str, str]) -> str:
    """Rewrite the problems of converted columns so that they quote the file's value in the file's
    unit and the valid range in both units (``value 900 mg/dL is out of range; expected 18.0 to
    720.6 mg/dL (1 to 40 mmol/L)``), not the value after conversion."""
    import csv
    import io

    fixed: dict[str, str] = {}
    try:
        rows = list(csv.DictReader(io.StringIO(clinical.read_text(path, "Clinical CSV"), newline="")))
    except (ClinicalValueError, csv.Error):
        return message
    for column in rows[0].keys() if rows else ():
        if column is None:
            continue
        try:
            feature = clinical.feature(columns.get(column, column))
        except ClinicalValueError:
            continue
        unit = units.get(feature.name)
        factor = clinical.UNIT_CONVERSIONS.get(feature.name, {}).get(unit.strip().lower()) if unit else None
        if not factor or feature.minimum is None or feature.maximum is None:
            continue
        in_file = (f"{feature.minimum / factor:.4g} to {feature.maximum / factor:.4g} {unit} "
                   f"({feature.describe_range()})")
        for number, row in enumerate(rows, start=1):
            prefix = f"row {number}, column '{column}': "
            raw = row.get(column)
            try:
                clinical.parse_value(feature, raw, where=prefix, unit=unit)
                continue
            except ClinicalValueError:
                pass
            text = str(raw).strip()
            try:
                value = float(text)
            except ValueError:
                fixed[prefix] = f"{prefix}value '{text}' is not a number; expected {in_file}."
                continue
            problem = "is out of range" if math.isfinite(value) else "is not finite"
            fixed[prefix] = f"{prefix}value {text} {unit} {problem}; expected {in_file}."
    lines = message.split("\n")
    for i, line in enumerate(lines):
        body = line.lstrip()
        for prefix, replacement in fixed.items():
            if body.startswith(prefix):
                lines[i] = line[: len(line) - len(body)] + replacement
                break
    return "\n".join(lines)


def companion(output: Path, name: str) -> Path:
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(f"{stem}_{name}.json")


def run(config: ClinicalConfig) -> Path:
    """Run the verb; returns the written CSV path."""
    if config.output is None:
        raise ClinicalValueError("--output is required (the clinical CSV to write).")
    if (config.input is None) == (config.from_csv is None):
        raise ClinicalValueError("Give exactly one of --input ISLES_DIR (simulate) or --from-csv FILE (convert).")
    output = Path(config.output)
    sources_path, config_path = companion(output, "sources"), companion(output, "config")
    targets = [output, config_path] + ([sources_path] if config.input is not None else [])
    if not config.overwrite:
        for target in targets:
            if target.exists():
                raise OutputExistsError(f"{target} exists already; pass --overwrite to replace it.")
    if config.input is not None:
        records, document = simulate_dataset(config)
        write_json(document, sources_path, overwrite=True)
    else:
        records = convert_csv(config)
    clinical.write_csv(records, output, overwrite=True)
    config_mod.save(config, config_path)
    logger.info("Wrote %d case(s) to %s.", len(records), output)
    return output


def main(argv: list[str]) -> int:
    config = config_mod.parse(ClinicalConfig, argv, __doc__.split("\n")[0], prog="python -m Training clinical")
    run(config)
    return 0
