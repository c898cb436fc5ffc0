"""The module's Qt Designer file matches what the module looks up, and the clinical form is
built from the schema."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UI = REPO / "StrokePredictor" / "Resources" / "UI" / "StrokePredictor.ui"
MODULE = REPO / "StrokePredictor" / "StrokePredictor.py"
PANEL = REPO / "StrokePredictor" / "StrokePredictorSlicer" / "panel.py"


def _widgets() -> dict[str, ElementTree.Element]:
    root = ElementTree.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget") if w.get("name")}


def _parameter_fields() -> set[str]:
    tree = ast.parse(MODULE.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "StrokePredictorParameterNode":
            assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list)
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("StrokePredictorParameterNode not found")


def test_every_widget_the_module_uses_exists():
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", MODULE.read_text()))
    assert len(used) >= 15
    missing = used - set(_widgets())
    assert missing == set(), f"widgets used by the module but absent from the .ui: {sorted(missing)}"


def test_parameter_bindings_name_real_parameters():
    fields = _parameter_fields()
    bound = {}
    for name, widget in _widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert set(bound.values()) <= fields, set(bound.values()) - fields
    assert {"dwi", "adc", "flair", "device", "mcSamples", "threshold", "model", "opacity"} <= set(bound.values())
    assert {"clinicalJson", "bundleFolder", "probability", "segmentation"} <= fields


def test_panel_sections_and_widget_types():
    widgets = _widgets()
    kinds = {name: w.get("class") for name, w in widgets.items()}
    for name in ("dwiSelector", "adcSelector", "flairSelector"):
        assert kinds[name] == "qMRMLNodeComboBox"
        types_ = [s.text for s in widgets[name].iter("string")]
        assert "vtkMRMLScalarVolumeNode" in types_
    none_enabled = {n: [p.find("bool").text for p in widgets[n].findall("property") if p.get("name") == "noneEnabled"]
                    for n in ("adcSelector", "flairSelector")}
    assert none_enabled == {"adcSelector": ["false"], "flairSelector": ["true"]}  # only FLAIR is optional
    assert kinds["clinicalFormContainer"] == "QWidget"
    assert kinds["applyButton"] == kinds["cancelButton"] == "QPushButton"
    assert kinds["progressBar"] == "QProgressBar" and kinds["bundlePathEdit"] == "ctkPathLineEdit"
    for name in ("inputsCollapsibleButton", "clinicalCollapsibleButton", "modelCollapsibleButton",
                 "resultsCollapsibleButton"):
        assert kinds[name] == "ctkCollapsibleButton"


def test_clinical_form_is_built_from_the_schema():
    """The form iterates clinical.FEATURES (in StrokePredictorSlicer.panel) and validates with
    clinical.validate: no copy of the schema in the module (no feature name appears as a literal),
    and the Widget reads each field by the kind the schema gave it, never by probing the widget
    (QComboBox has placeholderText since Qt 5.15)."""
    from StrokePredictorLib import clinical

    panel_source = PANEL.read_text()
    assert "for feature in clinical.FEATURES" in panel_source and "clinical.validate(" in panel_source
    source = MODULE.read_text()
    assert "panel.clinical_fields()" in source
    assert not re.search(r"hasattr\(\s*widget", source) and '"placeholderText"' not in source
    for feature in clinical.FEATURES:
        assert f'"{feature.name}"' not in source, feature.name
        assert f'"{feature.name}"' not in panel_source, feature.name
    assert all(feature.missing_label for feature in clinical.FEATURES)


def test_clinical_fields_follow_the_schema_kinds():
    import sys

    sys.path.insert(0, str(MODULE.parent))
    try:
        from StrokePredictorSlicer import panel
    finally:
        sys.path.remove(str(MODULE.parent))
    from StrokePredictorLib import clinical

    fields = panel.clinical_fields()
    assert [f.name for f in fields] == list(clinical.FEATURE_NAMES)
    for field, feature in zip(fields, clinical.FEATURES, strict=True):
        if feature.kind in ("binary", "categorical"):
            assert field.kind == "choice" and field.items[0] == (feature.missing_label, "")
            assert [value for _, value in field.items[1:]] == list(feature.categories)
            assert field.index_of(feature.categories[-1]) == len(feature.categories)
            assert field.index_of("not a category") == 0 and field.value_at(0) == "" and field.value_at(99) == ""
        else:
            assert field.kind == "text" and field.placeholder == feature.missing_label
        assert feature.label in field.label and feature.describe_range() in field.tooltip


def test_prediction_warnings_are_read_defensively():
    import sys

    sys.path.insert(0, str(MODULE.parent))
    try:
        from StrokePredictorSlicer import panel
    finally:
        sys.path.remove(str(MODULE.parent))

    assert panel.prediction_warnings({}) == []
    assert panel.prediction_warnings({"warnings": []}) == []
    assert panel.prediction_warnings({"warnings": ["ADC looks like x10^-6 mm^2/s", "  ", None, 7]}) == [
        "ADC looks like x10^-6 mm^2/s", "7"]
    assert panel.prediction_warnings({"warnings": "one text"}) == ["one text"]
    assert panel.prediction_warnings({"warnings": [{"message": "lesion larger than half the brain", "code": 3},
                                                   {"code": 4}]}) == [
        "lesion larger than half the brain", '{"code": 4}']
    texts = panel.result_texts({"lesion_volume_ml": {"mask": 3.21, "median": "bad", "ci95": None},
                                "n_components": None, "warnings": ["w1", "w2"]},
                               [{"name": "age", "label": "Age", "weight": 0.7}, {"name": "sex", "weight": "0.3"}])
    assert texts["volume"] == "3.2 mL (MC median nan, 95% interval nan-nan mL), 0 component(s)"
    assert texts["features"] == "Age 0.70, sex 0.30"
    assert texts["warnings"] == "\u26a0 w1\n\u26a0 w2"
    grown = panel.result_texts({"lesion_volume_ml": {"mask": 30.0, "median": 30.0, "ci95": [10.0, 90.0]},
                                "n_components": 1, "growth_seed": {"threshold": 0.3, "flip_tta": True}}, [])
    assert grown["volume"] == ("30.0 mL (MC median 30.0, 95% interval 10.0-90.0 mL), 1 component(s)\n"
                               "Grown from the acute core at probability >= 0.3 (left-right averaged): the outcome "
                               "model's seed block, which may differ from the Acute model's display")
