"""What the module panel shows, decided without Qt (so it is tested without Slicer).

* :func:`clinical_fields`: one form field per feature of ``StrokePredictorLib.clinical``; the
  Widget creates a combo box for ``kind == "choice"`` and a line edit for ``kind == "text"`` and
  reads each by that kind (never by probing the widget: QComboBox has ``placeholderText`` too
  since Qt 5.15).
* :func:`check_form`: the per-field problems and the reasons Apply is off.
* :func:`result_texts`: the Results section's texts from a prediction's ``summary.json`` and
  feature attention, including the prediction's warnings (read defensively).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from StrokePredictorLib import clinical
from StrokePredictorLib.errors import StrokePredictorError

DISPLAY_LAYERS = ("probability", "uncertainty", "attention")


@dataclass(frozen=True)
class ClinicalField:
    """One row of the clinical form.

    Attributes:
        name: the schema's feature name (the key in ``clinicalJson``).
        kind: ``choice`` (combo box) or ``text`` (line edit; empty = unknown).
        label: the row label, with unit and valid range.
        tooltip: help text with the valid range.
        items: ``(shown text, value)`` pairs of a choice field; the first is the unknown entry (value "").
        placeholder: what an empty line edit shows (the feature's "unknown" label).
    """

    name: str
    kind: str
    label: str
    tooltip: str
    items: tuple[tuple[str, str], ...] = ()
    placeholder: str = ""

    def index_of(self, value: str) -> int:
        """The combo box index of ``value`` (0, the unknown entry, when it is not a choice)."""
        for index, (_, data) in enumerate(self.items):
            if data == value:
                return index
        return 0

    def value_at(self, index: int) -> str:
        """The value of combo box entry ``index`` ("" for unknown or an index out of range)."""
        return self.items[index][1] if 0 <= index < len(self.items) else ""


def clinical_fields() -> list[ClinicalField]:
    """The clinical form, built from ``clinical.FEATURES`` so it never drifts from the schema."""
    fields = []
    for feature in clinical.FEATURES:
        tip = f"{feature.help} Valid: {feature.describe_range()}. Leave '{feature.missing_label}' if not known."
        unit = f" ({feature.unit}, {feature.describe_range()})" if feature.unit else ""
        label = f"{feature.label}{unit}:"
        if feature.kind in ("binary", "categorical"):
            items = ((feature.missing_label, ""), *((c, c) for c in feature.categories))
            fields.append(ClinicalField(feature.name, "choice", label, tip, items=items))
        else:
            fields.append(ClinicalField(feature.name, "text", label, tip, placeholder=feature.missing_label))
    return fields


def parse_clinical_json(text: str | None) -> dict[str, str]:
    """``{field: raw text}`` from the parameter node's ``clinicalJson`` (bad JSON: empty form)."""
    try:
        raw = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def field_problems(raw: Mapping[str, str]) -> dict[str, str]:
    """``{field: message}`` for every value the schema refuses (an empty value is legal: unknown)."""
    problems = {}
    for name, value in raw.items():
        try:
            clinical.validate({name: value})
        except StrokePredictorError as error:
            problems[name] = str(error)
    return problems


def apply_problems(bad_fields: Mapping[str, str], *, have_dwi: bool, have_adc: bool, model: str,
                   bundle_folder: str) -> list[str]:
    """Why Apply is off: first the inputs, then each refused clinical value (``bad_fields``, from
    :func:`field_problems`); empty: Apply can be on."""
    problems = []
    if not have_dwi or not have_adc:
        problems.append("Select the DWI and ADC volumes.")
    elif model == "bundle folder" and not bundle_folder:
        problems.append("Choose a model bundle folder.")
    problems.extend(bad_fields.values())
    return problems


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def prediction_warnings(summary: Mapping[str, Any]) -> list[str]:
    """The prediction's warnings from ``summary.json`` (``warnings``: strings, or objects with a
    ``message``); anything else there is shown as text rather than dropped."""
    raw = summary.get("warnings", []) if isinstance(summary, Mapping) else []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        return [str(raw)] if raw else []
    warnings = []
    for item in raw:
        if item is None:
            continue
        if isinstance(item, Mapping):
            text = str(item.get("message") or item.get("text") or json.dumps(dict(item), sort_keys=True))
        else:
            text = str(item)
        if text.strip():
            warnings.append(text.strip())
    return warnings


def result_texts(summary: Mapping[str, Any], features: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The Results section's label texts: ``volume``, ``uncertainty``, ``features``, ``warnings``
    (empty when there are none)."""
    volume = summary.get("lesion_volume_ml", {}) or {}
    ci = list(volume.get("ci95") or [math.nan, math.nan]) + [math.nan, math.nan]
    components = _number(summary.get("n_components", 0))
    texts = {
        "volume": (f"{_number(volume.get('mask')):.1f} mL (MC median {_number(volume.get('median')):.1f}, "
                   f"95% interval {_number(ci[0]):.1f}-{_number(ci[1]):.1f} mL), "
                   f"{int(components) if math.isfinite(components) else 0} component(s)"),
        "uncertainty": f"{_number(summary.get('mean_uncertainty_in_lesion')):.3f} bits",
    }
    seed = summary.get("growth_seed")
    if isinstance(seed, Mapping) and seed:  # an outcome grown from the acute core: say which core grew
        texts["volume"] += (f"\nGrown from the acute core at probability >= {_number(seed.get('threshold')):g}"
                            f"{' (left-right averaged)' if seed.get('flip_tta') else ''}: the outcome model's seed "
                            "block, which may differ from the Acute model's display")
    top = sorted(features, key=lambda f: -_number(f.get("weight")))[:3]
    texts["features"] = ", ".join(f"{f.get('label', f.get('name', '?'))} {_number(f.get('weight')):.2f}" for f in top)
    warnings = prediction_warnings(summary)
    texts["warnings"] = "\n".join(f"\u26a0 {w}" for w in warnings)
    return texts


def what_if_fields() -> list[tuple[str, str]]:
    """``(shown label, feature name)`` for the what-if comparison's field selector, in the schema's
    order (built from ``clinical.FEATURES``, like the form)."""
    return [(f"{feature.label} ({feature.describe_range()})", feature.name) for feature in clinical.FEATURES]


def comparison_text(comparison: Mapping[str, Any], scenarios: Sequence[Mapping[str, Any]]) -> str:
    """The two scenarios' volumes side by side and what differs, from a what-if comparison."""
    lines = []
    labels = (comparison.get("first", "first"), comparison.get("second", "second"))
    for scenario, label in zip(scenarios, labels):  # noqa: B905 (Slicer 5.8 runs Python 3.9: no strict=)
        lines.append(f"{label}: {_number(scenario.get('volume_ml')):.1f} mL (95% interval "
                     f"{_number(scenario.get('ci95_low_ml')):.1f}-{_number(scenario.get('ci95_high_ml')):.1f} mL)")
    volumes = comparison.get("volumes_ml", {}) or {}
    lines.append(f"Lesion only in the first: {_number(volumes.get('saved')):.1f} mL; only in the second: "
                 f"{_number(volumes.get('added')):.1f} mL; difference {_number(volumes.get('net')):+.1f} mL")
    return "\n".join(lines)
