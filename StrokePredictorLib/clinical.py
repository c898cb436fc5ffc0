"""The clinical schema: one definition used by the model, the Slicer form, the CLI and the CSV reader.

Ten features describe the patient at imaging time. Every feature may be missing (the network
is trained with random feature drop-out and has a learned "missing" embedding per feature); a
malformed or out-of-range value is an error naming the field, the value and the valid range.

Encoding (:func:`encode`): each feature becomes one number plus a missing flag, so that the
network can give every feature its own token.

* ``continuous`` and ``ordinal`` features: ``(value - center) / scale``;
* ``binary`` features: 0 or 1;
* ``categorical`` features: the category index (0, 1, ...), to be embedded by the network.

Missing features are encoded as 0 with ``missing = True``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib.errors import ClinicalValueError

SCHEMA_VERSION = "1.0"

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}
_MISSING = {"", "na", "n/a", "nan", "none", "null", "unknown", "missing", "?", "-"}
# A plain decimal number in ASCII digits. Python's float() also takes "1_50" (150), "infinity" and
# non-ASCII digits, which a clinical value written by hand should never silently become.
_NUMBER = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")
#: Largest clinical file read (a CSV of a million cases is about 100 MB; this is far above any real one).
MAX_TEXT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Feature:
    """One clinical feature.

    Attributes:
        name: machine name (CSV column, JSON key, CLI ``key=value``).
        label: human label for forms and figures.
        kind: ``continuous``, ``ordinal``, ``binary`` or ``categorical``.
        unit: unit of the value ("" when none).
        minimum, maximum: valid closed range for numeric kinds.
        center, scale: encoding ``(value - center) / scale`` for numeric kinds.
        categories: allowed values for ``categorical`` and ``binary`` kinds (index = code).
        missing_label: what "missing" means to the user (shown in the Slicer form).
        aliases: other accepted column or key names (lower case).
        help: one line of guidance.
    """

    name: str
    label: str
    kind: str
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    center: float = 0.0
    scale: float = 1.0
    categories: tuple[str, ...] = ()
    missing_label: str = "unknown"
    aliases: tuple[str, ...] = ()
    help: str = ""

    def describe_range(self) -> str:
        if self.kind in ("binary", "categorical"):
            return "one of " + ", ".join(self.categories)
        unit = f" {self.unit}" if self.unit else ""
        integer = " (integer)" if self.kind == "ordinal" else ""
        return f"{_fmt(self.minimum)} to {_fmt(self.maximum)}{unit}{integer}"


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


FEATURES: tuple[Feature, ...] = (
    Feature("age", "Age", "continuous", "years", 18, 110, 70.0, 15.0, aliases=("patientage", "age_years"),
            help="Age at stroke onset."),
    Feature("sex", "Sex", "binary", categories=("F", "M"), aliases=("patientsex", "gender"),
            help="Biological sex: F or M."),
    Feature("nihss", "NIHSS", "ordinal", "points", 0, 42, 8.0, 8.0, missing_label="not assessed",
            aliases=("nihss_admission", "nih_stroke_scale"), help="Admission NIH Stroke Scale, 0-42."),
    Feature("onset_to_imaging_h", "Onset to imaging", "continuous", "h", 0, 48, 4.0, 4.0,
            missing_label="unknown (wake-up stroke)", aliases=("onset_hours", "time_since_onset", "onset"),
            help="Hours from symptom onset (or last seen well) to the MRI."),
    Feature("systolic_bp", "Systolic blood pressure", "continuous", "mmHg", 60, 300, 150.0, 25.0,
            aliases=("sbp", "systolic"), help="Systolic blood pressure at admission."),
    Feature("glucose", "Blood glucose", "continuous", "mmol/L", 1, 40, 7.0, 2.5,
            aliases=("blood_glucose", "glucose_mmol"), help="Blood glucose at admission (mmol/L)."),
    Feature("atrial_fibrillation", "Atrial fibrillation", "binary", categories=("no", "yes"),
            aliases=("afib", "af"), help="Known or newly detected atrial fibrillation."),
    Feature("prior_stroke", "Prior stroke", "binary", categories=("no", "yes"),
            aliases=("priorstroke", "previous_stroke"), help="History of stroke before this event."),
    Feature("prestroke_mrs", "Pre-stroke mRS", "ordinal", "points", 0, 5, 1.0, 1.5,
            aliases=("premorbid_mrs", "mrs_pre"), help="Modified Rankin Scale before the stroke, 0-5."),
    Feature("treatment", "Reperfusion treatment", "categorical",
            categories=("none", "thrombolysis", "thrombectomy", "both"), missing_label="unknown",
            aliases=("reperfusion", "therapy"),
            help="Thrombolysis (IV alteplase/tenecteplase), thrombectomy, both, or none."),
)

FEATURE_NAMES: tuple[str, ...] = tuple(feature.name for feature in FEATURES)
N_FEATURES = len(FEATURES)
_BY_NAME: dict[str, Feature] = {}
for _feature in FEATURES:
    for _key in (_feature.name, *_feature.aliases):
        _BY_NAME[_key.lower()] = _feature

# Unit conversions the readers accept, to the schema's unit: {feature: {unit: factor}}.
UNIT_CONVERSIONS: dict[str, dict[str, float]] = {
    "glucose": {"mmol/l": 1.0, "mg/dl": 1.0 / 18.016},
    "onset_to_imaging_h": {"h": 1.0, "min": 1.0 / 60.0},
    "systolic_bp": {"mmhg": 1.0, "kpa": 7.50062},
}


def feature(name: str) -> Feature:
    """Look a feature up by name or alias (case-insensitive)."""
    try:
        return _BY_NAME[name.strip().lower()]
    except KeyError:
        raise ClinicalValueError(
            f"Unknown clinical field '{name}'. Valid fields: {', '.join(FEATURE_NAMES)}."
        ) from None


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING


def parse_value(feature_: Feature, value: object, *, where: str = "", unit: str | None = None) -> float | str | None:
    """Validate one raw value and return it in the schema's canonical form.

    Numbers come back as float (ordinal as an integral float), binary/categorical values as the
    category string, missing values as ``None``.

    Args:
        feature_: the feature.
        value: raw value (number, string, bool or None).
        where: location prefix for the error message (e.g. "row 3, column 'nihss': ").
        unit: unit of ``value`` when it is not the schema's (see :data:`UNIT_CONVERSIONS`).

    Raises:
        ClinicalValueError: malformed or out of range, with the field, value and valid range.
    """
    if feature_.kind in ("binary", "categorical") and isinstance(value, str):
        for category in feature_.categories:  # a category first: treatment "none" is a value, not a missing one
            if value.strip().lower() == category.lower():
                return category
    if _is_missing(value):
        return None
    prefix = where or f"Clinical field '{feature_.name}': "
    if feature_.kind in ("binary", "categorical"):
        text = str(value).strip()
        lowered = text.lower()
        for category in feature_.categories:
            if lowered == category.lower():
                return category
        if feature_.name == "sex" and lowered in ("female", "male"):
            return lowered[0].upper()
        if feature_.categories == ("no", "yes"):
            if lowered in ("1.0", "0.0"):
                lowered = lowered[0]
            if lowered in _TRUE | _FALSE:
                return feature_.categories[int(lowered in _TRUE)]
        raise ClinicalValueError(f"{prefix}value '{text}' is not valid; expected {feature_.describe_range()}.")
    if isinstance(value, bool):
        raise ClinicalValueError(f"{prefix}value {value} is not a number; expected {feature_.describe_range()}.")
    try:
        if isinstance(value, str):
            text = value.strip()
            if not _NUMBER.match(text):
                raise ValueError(text)
            number = float(text)
        else:
            number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ClinicalValueError(
            f"{prefix}value '{value}' is not a number; expected {feature_.describe_range()}."
        ) from None
    if not math.isfinite(number):
        raise ClinicalValueError(f"{prefix}value {value} is not finite; expected {feature_.describe_range()}.")
    if unit is not None:
        factors = UNIT_CONVERSIONS.get(feature_.name, {})
        factor = factors.get(unit.strip().lower())
        if factor is None:
            known = ", ".join(factors) or feature_.unit or "none"
            raise ClinicalValueError(f"{prefix}unit '{unit}' cannot be converted; known units: {known}.")
        number *= factor
    if feature_.kind == "ordinal" and not float(number).is_integer():
        raise ClinicalValueError(f"{prefix}value {value} is not an integer; expected {feature_.describe_range()}.")
    assert feature_.minimum is not None and feature_.maximum is not None
    if not feature_.minimum <= number <= feature_.maximum:
        raise ClinicalValueError(
            f"{prefix}value {_fmt(number)} is out of range; expected {feature_.describe_range()}."
        )
    return float(number)


@dataclass(frozen=True)
class ClinicalRecord:
    """Validated clinical values of one patient; absent features are missing (``None``)."""

    values: Mapping[str, float | str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        complete = {name: None for name in FEATURE_NAMES}
        complete.update(self.values)
        object.__setattr__(self, "values", complete)

    def __getitem__(self, name: str) -> float | str | None:
        return self.values[feature(name).name]

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(name for name in FEATURE_NAMES if self.values[name] is None)

    def to_dict(self) -> dict[str, float | str | None]:
        return dict(self.values)


def validate(raw: Mapping[str, object], *, units: Mapping[str, str] | None = None, where: str = "") -> ClinicalRecord:
    """Validate a mapping of field name (or alias) to raw value.

    Raises:
        ClinicalValueError: unknown field, malformed or out-of-range value, or a field given twice.
    """
    units = {feature(k).name: v for k, v in (units or {}).items()}
    values: dict[str, float | str | None] = {}
    for key, value in raw.items():
        feature_ = feature(key)
        if feature_.name in values:
            raise ClinicalValueError(
                f"{where}clinical field '{feature_.name}' is given twice (again as '{key}'); give each field once."
            )
        prefix = f"{where}clinical field '{key}': " if where else ""
        values[feature_.name] = parse_value(feature_, value, where=prefix, unit=units.get(feature_.name))
    return ClinicalRecord(values)


def encode(record: ClinicalRecord | Mapping[str, object] | None) -> tuple[np.ndarray, np.ndarray]:
    """Encode a clinical record for the network.

    Returns:
        values: float32 array of shape (10,), in :data:`FEATURE_NAMES` order.
        missing: bool array of shape (10,), True where the feature is missing.
    """
    if record is None:
        record = ClinicalRecord()
    elif not isinstance(record, ClinicalRecord):
        record = validate(record)
    values = np.zeros(N_FEATURES, dtype=np.float32)
    missing = np.zeros(N_FEATURES, dtype=bool)
    for index, feature_ in enumerate(FEATURES):
        value = record.values[feature_.name]
        if value is None:
            missing[index] = True
        elif feature_.kind in ("binary", "categorical"):
            values[index] = float(feature_.categories.index(str(value)))
        else:
            values[index] = (float(value) - feature_.center) / feature_.scale
    return values, missing


def parse_key_values(items: Iterable[str]) -> ClinicalRecord:
    """Parse ``["nihss=12", "age=71", "onset_to_imaging_h=unknown"]`` into a record."""
    raw: dict[str, str] = {}
    seen: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ClinicalValueError(f"Clinical value '{item}' must be written as name=value, e.g. nihss=12.")
        key, value = item.split("=", 1)
        name = feature(key).name
        if name in seen:
            raise ClinicalValueError(
                f"Clinical field '{name}' is given twice ('{seen[name]}' and '{item}'); give each field once."
            )
        seen[name] = item
        raw[key.strip()] = value.strip()
    return validate(raw)


def read_text(path: str | os.PathLike, what: str = "Clinical file") -> str:
    """Read a small text file written by a person or a spreadsheet, refusing what is not one.

    UTF-8 (with or without a byte-order mark) and UTF-16/UTF-32 with a byte-order mark are read;
    anything else is refused with its likely encoding named (Latin-1/Windows-1252, UTF-16 without
    a byte-order mark) or as binary. Folders, devices, FIFOs and files over
    :data:`MAX_TEXT_BYTES` are refused before anything is read.

    Raises:
        ClinicalValueError: the path is missing, not a regular file, too large, or not text.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ClinicalValueError(f"{what} {path} does not exist.") from None
    except OSError as error:
        raise ClinicalValueError(f"{what} {path} cannot be read: {error.strerror or error}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise ClinicalValueError(f"{what} {path} is a folder; pass the file itself.")
    if not stat.S_ISREG(info.st_mode):
        raise ClinicalValueError(f"{what} {path} is not a regular file (a device, FIFO or socket).")
    if info.st_size > MAX_TEXT_BYTES:
        raise ClinicalValueError(
            f"{what} {path} is {info.st_size / 2**20:.0f} MB, more than the {MAX_TEXT_BYTES // 2**20} MB a clinical "
            "file can be; is it the right file?"
        )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ClinicalValueError(f"{what} {path} cannot be read: {error.strerror or error}.") from None
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                raise ClinicalValueError(
                    f"{what} {path} starts with a {encoding.upper().replace('-SIG', '')} byte-order mark but is not "
                    "valid text in that encoding; save it as UTF-8."
                ) from None
            break
    else:
        if b"\x00" in data:
            even = data[0::2].count(0) + data[1::2].count(0)
            hint = ("it looks like UTF-16 text without a byte-order mark" if even >= len(data) // 3
                    else "it looks like a binary file, not text")
            raise ClinicalValueError(f"{what} {path} contains NUL bytes: {hint}. Save it as UTF-8 text (CSV or JSON).")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            byte = data[error.start]
            try:
                data.decode("cp1252")
                guess = "it looks like Latin-1/Windows-1252 text"
            except UnicodeDecodeError:
                guess = "it is not text in a known encoding"
            raise ClinicalValueError(
                f"{what} {path} is not UTF-8 (byte 0x{byte:02X} on line {line}); {guess}. Save it as UTF-8 "
                "(e.g. in a spreadsheet: 'CSV UTF-8')."
            ) from None
    bad = [c for c in text if ord(c) < 32 and c not in "\t\r\n"]
    if bad:
        raise ClinicalValueError(
            f"{what} {path} contains control character(s) (U+{ord(bad[0]):04X}); it looks like a binary file, not text."
        )
    return text


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise ClinicalValueError(f"key '{key}' appears twice")
        result[key] = value
    return result


def read_json(path: str | os.PathLike) -> ClinicalRecord:
    """Read one patient's clinical values from a JSON object ``{"nihss": 12, ...}``."""
    path = Path(path)
    text = read_text(path, "Clinical file")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as error:
        raise ClinicalValueError(f"Clinical file {path} is not valid JSON: {error}.") from None
    except ClinicalValueError as error:
        raise ClinicalValueError(f"Clinical file {path}: {error}; give each field once.") from None
    except RecursionError:
        raise ClinicalValueError(f"Clinical file {path} is nested too deeply to be a clinical record.") from None
    if not isinstance(data, dict):
        raise ClinicalValueError(f"Clinical file {path} must hold a JSON object of field: value pairs.")
    data = data.get("clinical", data) if isinstance(data.get("clinical"), dict) else data
    data = {k: v for k, v in data.items() if not k.startswith("_") and k not in ("case_id", "schema_version")}
    return validate(data, where=f"{path}: ")


def read_csv(
    path: str | os.PathLike,
    *,
    id_column: str = "case_id",
    column_map: Mapping[str, str] | None = None,
    units: Mapping[str, str] | None = None,
    ignore_unknown: bool = False,
) -> dict[str, ClinicalRecord]:
    """Read a clinical CSV with one row per case.

    Args:
        path: the CSV file.
        id_column: column holding the case id.
        column_map: CSV column name -> schema field name, for datasets with other names.
        units: schema field name -> unit used in the CSV (e.g. ``{"glucose": "mg/dL"}``).
        ignore_unknown: skip columns that are not schema fields (otherwise an error).

    Raises:
        ClinicalValueError: no id column, duplicate ids, unknown columns, or bad values. The
            message lists every bad value with its row number (1 = first data row) and column.
    """
    path = Path(path)
    column_map = {k: v for k, v in (column_map or {}).items()}
    handle = io.StringIO(read_text(path, "Clinical CSV"), newline="")
    with handle:
        reader = csv.DictReader(handle)
        try:
            columns = reader.fieldnames or []
        except csv.Error as error:
            raise ClinicalValueError(f"Clinical CSV {path} cannot be parsed as CSV: {error}.") from None
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise ClinicalValueError(f"Clinical CSV {path}: column(s) {', '.join(repeated)} appear more than once.")
        if id_column not in columns:
            raise ClinicalValueError(
                f"Clinical CSV {path} has no case id column '{id_column}' (columns: {', '.join(columns) or 'none'})."
            )
        mapping: dict[str, str] = {}
        for column in columns:
            if column == id_column or column.endswith("_source"):
                continue
            target = column_map.get(column, column)
            try:
                name = feature(target).name
            except ClinicalValueError:
                if ignore_unknown:
                    continue
                raise ClinicalValueError(
                    f"Clinical CSV {path}: column '{column}' is not a clinical field "
                    f"(valid: {', '.join(FEATURE_NAMES)}); map it with a column mapping or drop it."
                ) from None
            other = next((c for c, n in mapping.items() if n == name), None)
            if other is not None:
                raise ClinicalValueError(
                    f"Clinical CSV {path}: columns '{other}' and '{column}' both hold the field '{name}'; keep one."
                )
            mapping[column] = name
        records: dict[str, ClinicalRecord] = {}
        problems: list[str] = []
        try:
            rows = list(reader)
        except csv.Error as error:
            raise ClinicalValueError(f"Clinical CSV {path} cannot be parsed as CSV (line {reader.line_num}): "
                                     f"{error}.") from None
        for row_number, row in enumerate(rows, start=1):
            if row.get(None):  # type: ignore[call-overload]
                problems.append(f"row {row_number}: {len(row[None])} more value(s) than columns")  # type: ignore[index]
                continue
            case_id = (row.get(id_column) or "").strip()
            if not case_id:
                problems.append(f"row {row_number}, column '{id_column}': empty case id")
                continue
            if case_id in records:
                problems.append(f"row {row_number}, column '{id_column}': case id '{case_id}' repeated")
                continue
            values: dict[str, float | str | None] = {}
            for column, name in mapping.items():
                try:
                    values[name] = parse_value(
                        feature(name), row.get(column), where=f"row {row_number}, column '{column}': ",
                        unit=(units or {}).get(name),
                    )
                except ClinicalValueError as error:
                    problems.append(str(error))
            records[case_id] = ClinicalRecord(values)
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise ClinicalValueError(f"Clinical CSV {path} has {len(problems)} invalid value(s):\n  {shown}{more}")
    return records


def write_csv(records: Mapping[str, ClinicalRecord], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write records as a clinical CSV (``case_id`` plus the ten fields, empty = missing)."""
    from StrokePredictorLib.io import atomic_path

    path = Path(path)
    with atomic_path(path, overwrite) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", *FEATURE_NAMES])
        for case_id, record in records.items():
            row = []
            for name in FEATURE_NAMES:
                value = record.values[name]
                row.append("" if value is None else (_fmt(value) if isinstance(value, float) else value))
            writer.writerow([case_id, *row])
    return path


def schema_dict() -> dict:
    """The schema as JSON-serialisable data (stored in model bundles and used by the Slicer form)."""
    return {
        "version": SCHEMA_VERSION,
        "features": [
            {
                "name": f.name, "label": f.label, "kind": f.kind, "unit": f.unit, "minimum": f.minimum,
                "maximum": f.maximum, "center": f.center, "scale": f.scale, "categories": list(f.categories),
                "missing_label": f.missing_label, "help": f.help,
            }
            for f in FEATURES
        ],
    }
