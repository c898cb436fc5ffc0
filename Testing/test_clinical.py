"""StrokePredictorLib.clinical: one schema, validation messages, encoding, CSV and JSON readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from StrokePredictorLib import clinical
from StrokePredictorLib.errors import ClinicalValueError


def test_schema_has_the_ten_features_with_units_and_ranges() -> None:
    assert clinical.FEATURE_NAMES == (
        "age", "sex", "nihss", "onset_to_imaging_h", "systolic_bp", "glucose",
        "atrial_fibrillation", "prior_stroke", "prestroke_mrs", "treatment",
    )
    nihss = clinical.feature("NIHSS")
    assert (nihss.minimum, nihss.maximum, nihss.kind) == (0, 42, "ordinal")
    assert clinical.feature("onset_to_imaging_h").missing_label.startswith("unknown")
    schema = clinical.schema_dict()
    assert schema["version"] == clinical.SCHEMA_VERSION and len(schema["features"]) == 10


def test_valid_record_and_encoding() -> None:
    record = clinical.validate({
        "age": 71, "sex": "female", "NIHSS": "12", "onset_to_imaging_h": "unknown", "systolic_bp": 160,
        "glucose": 6.1, "atrial_fibrillation": "yes", "prior_stroke": False, "prestroke_mrs": 0,
        "treatment": "Thrombectomy",
    })
    assert record["sex"] == "F" and record["nihss"] == 12.0 and record["onset_to_imaging_h"] is None
    assert record["prior_stroke"] == "no" and record["treatment"] == "thrombectomy"
    values, missing = clinical.encode(record)
    assert values.dtype == np.float32 and values.shape == (10,) and missing.dtype == bool
    assert missing.tolist() == [False, False, False, True, False, False, False, False, False, False]
    assert values[0] == pytest.approx((71 - 70) / 15)
    assert values[2] == pytest.approx((12 - 8) / 8)
    assert values[1] == 0.0 and values[6] == 1.0 and values[7] == 0.0 and values[9] == 2.0
    assert values[3] == 0.0


def test_empty_record_is_all_missing() -> None:
    values, missing = clinical.encode(None)
    assert missing.all() and not values.any()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"nihss": 43}, r"'nihss': value 43 is out of range; expected 0 to 42 points \(integer\)"),
        ({"nihss": 4.5}, r"value 4.5 is not an integer"),
        ({"age": "old"}, r"'age': value 'old' is not a number; expected 18 to 110 years"),
        ({"glucose": float("inf")}, r"'glucose': value inf is not finite"),
        ({"sex": "X"}, r"'sex': value 'X' is not valid; expected one of F, M"),
        ({"treatment": "aspirin"}, r"expected one of none, thrombolysis, thrombectomy, both"),
        ({"heart_rate": 80}, r"Unknown clinical field 'heart_rate'. Valid fields: age, sex, nihss"),
        ({"atrial_fibrillation": 2}, r"value '2' is not valid; expected one of no, yes"),
        ({"systolic_bp": True}, r"value True is not a number"),
    ],
)
def test_validation_messages_name_field_value_and_range(raw: dict, message: str) -> None:
    with pytest.raises(ClinicalValueError, match=message):
        clinical.validate(raw)


def test_key_value_parsing() -> None:
    record = clinical.parse_key_values(["nihss=7", "age = 65", "treatment=both"])
    assert (record["nihss"], record["age"], record["treatment"]) == (7.0, 65.0, "both")
    with pytest.raises(ClinicalValueError, match="must be written as name=value"):
        clinical.parse_key_values(["nihss"])


def test_json_reader(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"nihss": 3, "sex": "M", "case_id": "x"}))
    assert clinical.read_json(path)["nihss"] == 3.0
    path.write_text("{broken")
    with pytest.raises(ClinicalValueError, match="c.json is not valid JSON"):
        clinical.read_json(path)
    path.write_text(json.dumps({"nihss": 99}))
    with pytest.raises(ClinicalValueError, match=r"c.json: clinical field 'nihss': value 99 is out of range"):
        clinical.read_json(path)


def test_csv_round_trip(tmp_path: Path) -> None:
    records = {
        "sub-strokecase0001": clinical.validate({"age": 80, "nihss": 20, "treatment": "none", "sex": "M"}),
        "sub-strokecase0002": clinical.validate({"glucose": 5.5, "onset_to_imaging_h": 2.5}),
    }
    path = clinical.write_csv(records, tmp_path / "clinical.csv")
    again = clinical.read_csv(path)
    assert list(again) == list(records)
    for case_id, record in records.items():
        assert again[case_id].values == record.values


def test_csv_without_case_id(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("subject,nihss\nA,3\n")
    expected = r"bad.csv has no case id column 'case_id' \(columns: subject, nihss\)"
    with pytest.raises(ClinicalValueError, match=expected):
        clinical.read_csv(path)
    assert clinical.read_csv(path, id_column="subject")["A"]["nihss"] == 3.0


def test_csv_reports_every_bad_value_with_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("case_id,nihss,age,glucose\nA,3,70,5\nB,50,70,5\nC,2,abc,5\nA,1,1,1\n")
    with pytest.raises(ClinicalValueError) as error:
        clinical.read_csv(path)
    text = str(error.value)
    assert "has 3 invalid value(s)" in text
    assert "row 2, column 'nihss': value 50 is out of range" in text
    assert "row 3, column 'age': value 'abc' is not a number" in text
    assert "row 4, column 'case_id': case id 'A' repeated" in text


def test_csv_column_mapping_and_units(tmp_path: Path) -> None:
    path = tmp_path / "theirs.csv"
    path.write_text("case_id,NIH_score,glucose_mgdl,comment\nA,4,126,fine\n")
    with pytest.raises(ClinicalValueError, match="column 'NIH_score' is not a clinical field"):
        clinical.read_csv(path)
    records = clinical.read_csv(path, column_map={"NIH_score": "nihss", "glucose_mgdl": "glucose"},
                                units={"glucose": "mg/dL"}, ignore_unknown=True)
    assert records["A"]["nihss"] == 4.0
    assert records["A"]["glucose"] == pytest.approx(126 / 18.016)


# ---- nothing dropped or misread silently, every encoding named -------------------------------
@pytest.mark.parametrize(("items", "message"), [
    (["nihss=12", "nihss=40"], "'nihss' is given twice ('nihss=12' and 'nihss=40')"),
    (["nihss=12", "NIHSS=40"], "'nihss' is given twice ('nihss=12' and 'NIHSS=40')"),
    (["nihss=12", "nihss_admission=40"], "'nihss' is given twice"),
])
def test_repeated_and_alias_keys_are_refused(items: list[str], message: str) -> None:
    with pytest.raises(ClinicalValueError) as error:
        clinical.parse_key_values(items)
    assert message in str(error.value)
    with pytest.raises(ClinicalValueError, match="given twice"):
        clinical.validate({"nihss": 12, "NIHSS": 40})


@pytest.mark.parametrize("text", ["1_50", "١٥٠", "infinity", "0x96", "150 mmHg"])
def test_only_plain_decimal_numbers_are_numbers(text: str) -> None:
    with pytest.raises(ClinicalValueError, match=f"value '{text}' is not a number; expected 60 to 300 mmHg"):
        clinical.parse_value(clinical.feature("systolic_bp"), text)
    assert clinical.parse_value(clinical.feature("systolic_bp"), " 1.5e2 ") == 150.0


def test_json_duplicate_keys_and_non_files(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"nihss": 12, "age": 70, "nihss": 40}')
    with pytest.raises(ClinicalValueError, match="key 'nihss' appears twice"):
        clinical.read_json(path)
    with pytest.raises(ClinicalValueError, match="is a folder"):
        clinical.read_json(tmp_path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ClinicalValueError, match="binary file"):
        clinical.read_json(path)


CSV = "case_id,nihss,sex\nsub-strokecase0001,4,F\nsub-strokecase0002,,M\n"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_csv_with_a_byte_order_mark_is_read(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes(CSV.encode(encoding))
    records = clinical.read_csv(path)
    assert sorted(records) == ["sub-strokecase0001", "sub-strokecase0002"]
    assert records["sub-strokecase0001"]["nihss"] == 4.0


@pytest.mark.parametrize(("data", "message"), [
    ("case_id,sex,_note\nsub-1,F,Müller\n".encode("latin-1"), "not UTF-8 (byte 0xFC on line 2); it looks like "
                                                                "Latin-1/Windows-1252 text"),
    (CSV.encode("utf-16-le"), "NUL bytes: it looks like UTF-16 text without a byte-order mark"),
    (b"\x00\x01\x02\x03" * 40, "NUL bytes: it looks like a binary file"),
    (b"case_id,nihss\x07\n", "control character(s) (U+0007)"),
])
def test_csv_in_another_encoding_is_refused_by_name(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes(data)
    with pytest.raises(ClinicalValueError) as error:
        clinical.read_csv(path, ignore_unknown=True)
    assert message in str(error.value) and str(path) in str(error.value)


def test_csv_columns_holding_one_field_twice_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("case_id,nihss,NIHSS\nsub-1,4,40\n")
    with pytest.raises(ClinicalValueError, match="columns 'nihss' and 'NIHSS' both hold the field 'nihss'"):
        clinical.read_csv(path)
    path.write_text("case_id,nihss,nihss\nsub-1,4,40\n")
    with pytest.raises(ClinicalValueError, match="column.s. nihss appear more than once"):
        clinical.read_csv(path)
    path.write_text("case_id,nihss\nsub-1,4,40\n")
    with pytest.raises(ClinicalValueError, match="row 1: 1 more value.s. than columns"):
        clinical.read_csv(path)


def test_treatment_none_is_a_category_not_a_missing_value() -> None:
    record = clinical.parse_key_values(["treatment=none", "sex=none"])
    assert record.values["treatment"] == "none"  # no reperfusion treatment was given
    assert record.values["sex"] is None  # 'none' is no category of sex: missing
    assert clinical.validate({"treatment": "None"}).values["treatment"] == "none"
    assert clinical.validate({"treatment": "unknown"}).values["treatment"] is None
    values, missing = clinical.encode(clinical.validate({"treatment": "none"}))
    index = clinical.FEATURE_NAMES.index("treatment")
    assert not missing[index] and values[index] == 0.0
