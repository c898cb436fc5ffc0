"""The clinical verb: sidecars, the fitted NIHSS model, determinism, researcher CSVs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from StrokePredictorLib import clinical
from StrokePredictorLib.errors import ClinicalValueError, OutputExistsError
from Training.clinical import clinical_data, nihss


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from Training.synthesis.generate import write_tiny_dataset

    root = write_tiny_dataset(tmp_path_factory.mktemp("clinical") / "data", n_cases=3, seed=1)
    # Sidecar of case 1: age and sex observed; the other cases have none (removed if present).
    for json_file in root.glob("sub-*/ses-*/*/*.json"):
        data = json.loads(json_file.read_text())
        for key in ("PatientAge", "PatientSex", "age", "sex", "Age", "Sex"):
            data.pop(key, None)
        json_file.write_text(json.dumps(data))
    sidecar = next((root / "sub-strokecase0001").glob("ses-*/dwi/*_dwi.nii.gz"))
    sidecar.with_name(sidecar.name.replace(".nii.gz", ".json")).write_text(
        json.dumps({"PatientAge": "047Y", "PatientSex": "F"}))
    return root


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_simulated_csv_uses_sidecars_and_is_deterministic(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "clinical.csv"
    assert clinical_data.main(["--input", str(dataset), "--output", str(out), "--seed", "5"]) == 0
    rows = {r["case_id"]: r for r in _read(out)}
    assert set(rows) == {"sub-strokecase0001", "sub-strokecase0002", "sub-strokecase0003"}
    assert rows["sub-strokecase0001"]["age"] == "47" and rows["sub-strokecase0001"]["sex"] == "F"
    sources = json.loads((tmp_path / "clinical_sources.json").read_text())["cases"]
    assert sources["sub-strokecase0001"]["sources"]["age"] == "observed"
    assert sources["sub-strokecase0002"]["sources"]["age"] == "simulated"
    assert all(s["sources"]["nihss"] in ("simulated", "missing") for s in sources.values())
    records = clinical.read_csv(out)  # the schema reader accepts it
    assert len(records) == 3
    # Same seed, same CSV; another seed, other values.
    again = tmp_path / "again.csv"
    clinical_data.main(["--input", str(dataset), "--output", str(again), "--seed", "5"])
    assert again.read_text() == out.read_text()
    other = tmp_path / "other.csv"
    clinical_data.main(["--input", str(dataset), "--output", str(other), "--seed", "6"])
    assert other.read_text() != out.read_text()
    with pytest.raises(OutputExistsError):
        clinical_data.main(["--input", str(dataset), "--output", str(out)])
    saved = json.loads((tmp_path / "clinical_config.json").read_text())
    assert saved["seed"] == 5


def test_simulated_nihss_rises_with_volume_as_fitted() -> None:
    model = nihss.load_model()
    assert model.info["pearson_r_test"] > 0.4  # fitted on held-in SOOP rows, R on held-out rows
    assert model.coef[nihss.FEATURE_NAMES.index("log_volume")] > 0
    base = model.mean.copy()
    small, large = base.copy(), base.copy()
    small[0], large[0] = np.log1p(1.0), np.log1p(80.0)  # 1 mL against 80 mL, same location
    expected_small, expected_large = float(model.expected(small)), float(model.expected(large))
    assert expected_large > expected_small
    draws = {}
    for name, features in (("small", small), ("large", large)):
        scores = [clinical_data.simulate_case(f"case{i}", seed=0, model=model, features=features, volume_ml=1.0,
                                              missing_rate_scale=0.0)[0]["nihss"] for i in range(300)]
        draws[name] = np.asarray(scores, dtype=float)
    assert draws["large"].mean() > draws["small"].mean() + 3
    # The sample means follow the model's expectations (negative-binomial noise around them).
    assert draws["small"].mean() == pytest.approx(expected_small, rel=0.2)
    assert draws["large"].mean() == pytest.approx(min(expected_large, 42), rel=0.2)


def test_lesion_features_hemisphere_and_volume() -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -20.0, -20.0]  # RAS: i grows to the right
    brain = np.ones((20, 20, 20), bool)  # [k, j, i]
    center, sd = nihss.brain_reference(brain, affine)
    lesion = np.zeros_like(brain)
    lesion[8:12, 8:12, 2:5] = True  # i < 10: left of the midline
    features = dict(zip(nihss.FEATURE_NAMES, nihss.lesion_features(lesion, affine, center, sd), strict=False))
    assert features["left_fraction"] == 1.0
    assert features["log_volume"] == pytest.approx(np.log1p(48 * 8 / 1000))
    assert features["log_components"] == 0.0
    lesion[:] = False
    lesion[8:12, 8:12, 15:18] = True
    features = dict(zip(nihss.FEATURE_NAMES, nihss.lesion_features(lesion, affine, center, sd), strict=True))
    assert features["left_fraction"] == 0.0


def test_researcher_csv_with_mapping_and_units(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("patient,Age,NIH,BloodSugar,Extra\nP1,70,5,180.16,x\nP2,55,,90.08,y\n")
    mapping = tmp_path / "map.yaml"
    mapping.write_text("id_column: patient\ncolumns:\n  NIH: nihss\n  BloodSugar: glucose\nunits:\n  glucose: mg/dL\n")
    out = tmp_path / "clinical.csv"
    assert clinical_data.main(["--from-csv", str(theirs), "--mapping", str(mapping), "--output", str(out),
                               "--ignore-unknown"]) == 0
    records = clinical.read_csv(out)
    assert records["P1"]["glucose"] == pytest.approx(10.0, abs=0.05)
    assert records["P1"]["nihss"] == 5.0 and records["P2"]["nihss"] is None
    # A flag overrides the mapping file: read glucose as mmol/L -> 180 is out of range.
    with pytest.raises(ClinicalValueError, match=r"row 1, column 'BloodSugar'"):
        clinical_data.main(["--from-csv", str(theirs), "--mapping", str(mapping), "--output", str(tmp_path / "b.csv"),
                            "--ignore-unknown", "--units", "glucose=mmol/L"])


def test_bad_researcher_csv_names_row_and_column(tmp_path: Path) -> None:
    theirs = tmp_path / "bad.csv"
    theirs.write_text("case_id,age,nihss,sex\nA,70,50,F\nB,abc,3,M\nC,60,4,X\n")
    with pytest.raises(ClinicalValueError) as error:
        clinical_data.main(["--from-csv", str(theirs), "--output", str(tmp_path / "out.csv")])
    message = str(error.value)
    assert "row 1, column 'nihss'" in message and "50" in message
    assert "row 2, column 'age'" in message and "abc" in message
    assert "row 3, column 'sex'" in message
    assert not (tmp_path / "out.csv").exists()


def test_real_isles_case_sidecar(isles_case_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "clinical.csv"
    clinical_data.main(["--input", str(isles_case_dir), "--output", str(out), "--missing-rate-scale", "0"])
    record = clinical.read_csv(out)["sub-strokecase0009"]
    assert record["age"] == 60.0 and record["sex"] == "F"  # from the JSON sidecar
    assert record["nihss"] is not None and all(record[name] is not None for name in ("systolic_bp", "glucose"))
    case = json.loads((tmp_path / "clinical_sources.json").read_text())["cases"]["sub-strokecase0009"]
    assert case["lesion_volume_ml"] == pytest.approx(4.184, abs=0.01)


def test_unit_errors_quote_the_files_value_and_unit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from Training.__main__ import main

    theirs = tmp_path / "theirs.csv"
    theirs.write_text("case_id,glucose_mgdl,nihss\nA,900,5\nB,abc,3\nC,100,50\nD,126,4\n")
    code = main(["clinical", "--from-csv", str(theirs), "--output", str(tmp_path / "out.csv"),
                 "--columns", "glucose_mgdl=glucose", "--units", "glucose=mg/dL"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: Clinical CSV") and "3 invalid value(s)" in err
    assert ("row 1, column 'glucose_mgdl': value 900 mg/dL is out of range; expected 18.02 to 720.6 mg/dL "
            "(1 to 40 mmol/L)") in err
    assert "49.9" not in err  # not the converted value
    assert "row 2, column 'glucose_mgdl': value 'abc' is not a number; expected 18.02 to 720.6 mg/dL" in err
    assert "row 3, column 'nihss': value 50 is out of range; expected 0 to 42" in err  # other columns unchanged
    assert not (tmp_path / "out.csv").exists()


def test_a_real_age_outside_the_forms_range_is_left_missing_not_a_crash() -> None:
    import numpy as np

    from Training.synthesis.clinical_sim import simulate_clinical

    for age, expected in ((16, None), (40, 40)):
        record, _ = simulate_clinical(np.random.default_rng(0), kind="soop", volume_ml=5.0, territory=1,
                                      real={"age": age, "sex": "F", "nihss": 3}, missing=False)
        assert record.values.get("age") == expected
