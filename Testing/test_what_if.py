"""What-if: cached imaging features, updates identical to fresh predictions, measured
feature effects, the --what-if command line and its files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from inference_phantom import tiny_config, write_case, write_tiny_bundle

from StrokePredictorLib.bundle import load_bundle
from StrokePredictorLib.clinical import FEATURE_NAMES, ClinicalRecord, validate
from StrokePredictorLib.errors import ClinicalValueError
from StrokePredictorLib.inference import Predictor
from StrokePredictorLib.io import MARKER_FILE, read_volume
from StrokePredictorLib.outputs import OPTIONAL_FILES, OUTPUT_FILES
from StrokePredictorLib.predict import main
from StrokePredictorLib.preprocess import preprocess
from StrokePredictorLib.whatif import (
    MAX_SCENARIOS,
    WhatIf,
    difference_map,
    parse_what_if,
    saved_volume_ml,
    scenario_changes,
)

CLINICAL = validate({"age": 64, "sex": "M", "nihss": 9, "onset_to_imaging_h": 3.5, "treatment": "none"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("whatif")
    paths = write_case(root / "case", flair=False)
    bundle_dir = write_tiny_bundle(root / "bundle", seed=1, config=tiny_config(film=True))
    bundle = load_bundle(bundle_dir)
    dwi, adc = read_volume(paths["dwi"], role="DWI"), read_volume(paths["adc"], role="ADC")
    case = preprocess(dwi, adc, None, grid=bundle.grid, normalization=bundle.normalization)
    return {"root": root, "paths": paths, "bundle_dir": bundle_dir, "bundle": bundle, "case": case, "dwi": dwi}


def test_parse_what_if_validates_every_value() -> None:
    grid = parse_what_if(["onset=2,6,12", "treatment=thrombolysis,Thrombectomy,unknown"])
    assert grid == {"onset_to_imaging_h": [2.0, 6.0, 12.0], "treatment": ["thrombolysis", "thrombectomy", None]}
    changes = scenario_changes(grid)
    assert len(changes) == 9 and changes[0] == {"onset_to_imaging_h": 2.0, "treatment": "thrombolysis"}
    assert changes[1] == {"onset_to_imaging_h": 2.0, "treatment": "thrombectomy"}
    for items, message in (
        ([], "at least one"),
        (["onset_to_imaging_h"], "field=value"),
        (["onset_to_imaging_h="], "field=value"),
        (["onset_to_imaging_h=2,,6"], "empty value"),
        (["colour=red"], "colour"),
        (["onset_to_imaging_h=2", "onset=3"], "given twice"),
        (["onset_to_imaging_h=2,2"], "listed twice"),
        (["onset_to_imaging_h=99"], "out of range"),
        (["treatment=surgery"], "surgery"),
        (["age=" + ",".join(str(a) for a in range(20, 20 + MAX_SCENARIOS + 1))], "at most"),
    ):
        with pytest.raises(ClinicalValueError, match=message):
            parse_what_if(items)


@pytest.mark.parametrize("flip", [False, True])
def test_update_equals_a_fresh_prediction(setup: dict, flip: bool) -> None:
    predictor = Predictor(setup["bundle"], device="cpu", mc_samples=5, seed=3, flip_tta=flip)
    session = WhatIf(predictor, setup["case"], CLINICAL)
    changes = {"onset_to_imaging_h": 12, "treatment": "thrombectomy", "nihss": None}
    updated = session.update(changes)
    fresh = predictor.predict_preprocessed(
        setup["case"], validate({**{k: v for k, v in CLINICAL.values.items() if v is not None},
                                 "onset_to_imaging_h": 12, "treatment": "thrombectomy", "nihss": None}))
    np.testing.assert_array_equal(updated.probability, fresh.probability)
    np.testing.assert_array_equal(updated.mask, fresh.mask)
    np.testing.assert_array_equal(updated.samples_volume_ml, fresh.samples_volume_ml)
    assert updated.feature_attention == fresh.feature_attention
    assert updated.clinical.values["onset_to_imaging_h"] == 12.0 and updated.clinical.values["nihss"] is None
    base = session.update()
    assert not np.array_equal(base.probability, updated.probability)  # the clinical values reach the output
    assert base.feature_attention != updated.feature_attention
    assert updated.timings["decode_s"] > 0 and updated.geometry.same_grid(setup["dwi"].geometry)


@pytest.mark.parametrize(("flip", "reach"), [(False, 0), (True, 2)])
def test_offset_feature_changes_keep_the_decoder_and_equal_fresh_predictions(
        setup: dict, tmp_path: Path, flip: bool, reach: int) -> None:
    """In a growth bundle onset time and treatment act through the growth offset alone: a what-if
    change of only those re-runs the offset, not the decoder, with the same result as a fresh
    prediction; any other change (NIHSS) re-runs the decoder."""
    bundle_dir = write_tiny_bundle(tmp_path / "bundle", seed=4, config=tiny_config(growth=True, growth_reach=reach))
    predictor = Predictor(bundle_dir, device="cpu", mc_samples=4, seed=2, flip_tta=flip)
    model = predictor.bundle.model
    calls = []
    original = model.decode
    model.decode = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)  # type: ignore[method-assign]
    session = WhatIf(predictor, setup["case"], CLINICAL)
    views = 2 if flip else 1
    session.update()
    assert len(calls) == views
    fresh_predictor = Predictor(bundle_dir, device="cpu", mc_samples=4, seed=2, flip_tta=flip)
    volumes = set()
    for changes, decoded in (({"onset_to_imaging_h": 20, "treatment": "none"}, 0), ({"treatment": None}, 0),
                             ({"onset_to_imaging_h": 1, "treatment": "thrombectomy"}, 0),
                             ({"nihss": 22, "onset_to_imaging_h": 1}, views), ({"nihss": 22}, 0), ({}, views)):
        before = len(calls)
        updated = session.update(changes)
        assert len(calls) - before == decoded, changes
        fresh = fresh_predictor.predict_preprocessed(setup["case"], session.record(changes))
        np.testing.assert_array_equal(updated.probability, fresh.probability)
        np.testing.assert_array_equal(updated.std, fresh.std)
        np.testing.assert_array_equal(updated.samples_volume_ml, fresh.samples_volume_ml)
        assert updated.feature_attention == fresh.feature_attention
        volumes.add(float(updated.probability.sum()))
    assert len(volumes) >= 4  # the offset changes reached the output


def test_scenarios_difference_map_and_saved_volume(setup: dict) -> None:
    predictor = Predictor(setup["bundle"], device="cpu", mc_samples=4)
    session = WhatIf(predictor, setup["case"], CLINICAL)
    grid = parse_what_if(["treatment=thrombolysis,thrombectomy"])
    none, treated = (s.prediction for s in session.scenarios(grid))
    difference = difference_map(none, treated)
    assert difference.dtype == np.float32 and difference.shape == none.probability.shape
    np.testing.assert_allclose(difference, none.probability - treated.probability, atol=0)
    assert float(np.abs(difference).max()) > 0
    volumes = saved_volume_ml(none, treated)
    voxel = none.geometry.voxel_volume_ml
    assert volumes["first"] == pytest.approx(none.mask.sum() * voxel)
    assert volumes["second"] == pytest.approx(treated.mask.sum() * voxel)
    assert volumes["net"] == pytest.approx(volumes["saved"] - volumes["added"])
    assert saved_volume_ml(none, none)["saved"] == 0.0


def test_feature_effects_are_the_volume_change_when_set_to_missing(setup: dict) -> None:
    """Each effect equals an independently computed difference of dropout-free volumes (unmirrored
    view: the prediction itself averages both views)."""
    kwargs = dict(device="cpu", min_component_ml=0.2)
    prediction = Predictor(setup["bundle"], mc_samples=3, feature_effects=True, flip_tta=True,
                           **kwargs).predict_preprocessed(setup["case"], CLINICAL)
    effects = prediction.feature_effects
    assert list(effects) == list(FEATURE_NAMES)
    exact = Predictor(setup["bundle"], mc_samples=1, deterministic=True, flip_tta=False, **kwargs)
    given = exact.predict_preprocessed(setup["case"], CLINICAL).samples_volume_ml[0]
    for name in FEATURE_NAMES:
        if CLINICAL.values[name] is None:
            assert effects[name] is None, name
            continue
        without = exact.predict_preprocessed(setup["case"], ClinicalRecord({**CLINICAL.values, name: None}))
        assert effects[name] == pytest.approx(without.samples_volume_ml[0] - given, abs=1e-9), name
    assert any(abs(v) > 0 for v in effects.values() if v is not None)
    assert "effects_s" in prediction.timings
    assert Predictor(setup["bundle"], device="cpu", mc_samples=2).predict_preprocessed(
        setup["case"], CLINICAL).feature_effects == {}


def _cli(setup: dict, out: Path, *extra: str) -> list[str]:
    return [str(a) for a in ("--dwi", setup["paths"]["dwi"], "--adc", setup["paths"]["adc"], "--bundle",
                             setup["bundle_dir"], "--out", out, "--device", "cpu", "--mc-samples", "4",
                             "--clinical", "nihss=9", "age=64", "onset_to_imaging_h=3.5", *extra)]


def test_cli_what_if_table_plot_and_effects(setup: dict, capsys: pytest.CaptureFixture) -> None:
    out = setup["root"] / "out"
    code = main(_cli(setup, out, "--what-if", "onset_to_imaging_h=2,6,12", "treatment=thrombolysis,thrombectomy",
                    "--effects"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES.values(), "what_if.tsv", "what_if.json",
                                                           "what_if.png", MARKER_FILE])
    with (out / "what_if.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["onset_to_imaging_h"], r["treatment"]) for r in rows] == [
        ("2.0", "thrombolysis"), ("2.0", "thrombectomy"), ("6.0", "thrombolysis"), ("6.0", "thrombectomy"),
        ("12.0", "thrombolysis"), ("12.0", "thrombectomy")]
    data = json.loads((out / "what_if.json").read_text())
    assert len(data["scenarios"]) == 6 and data["base_clinical"]["nihss"] == 9.0
    # every row is what a fresh prediction with those values gives
    predictor = Predictor(setup["bundle_dir"], device="cpu", mc_samples=4)
    for row in (rows[0], rows[5]):
        record = validate({"nihss": 9, "age": 64, "onset_to_imaging_h": row["onset_to_imaging_h"],
                           "treatment": row["treatment"]})
        fresh = predictor.predict(read_volume(setup["paths"]["dwi"]), read_volume(setup["paths"]["adc"]), None, record)
        assert float(row["volume_ml"]) == pytest.approx(fresh.volume_ml["mask"], abs=1e-3)
        assert float(row["ci95_low_ml"]) == pytest.approx(fresh.volume_ml["ci95"][0], abs=1e-3)
        assert float(row["ci95_high_ml"]) == pytest.approx(fresh.volume_ml["ci95"][1], abs=1e-3)
        assert float(row["median_ml"]) == pytest.approx(fresh.volume_ml["median"], abs=1e-3)
    assert (out / "what_if.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"]["what_if_tsv"] == "what_if.tsv"
    attention = json.loads((out / "attention.json").read_text())
    by_name = {f["name"]: f for f in attention["features"]}
    assert by_name["treatment"]["effect_ml"] is None and isinstance(by_name["nihss"]["effect_ml"], float)
    assert "set to missing" in attention["effect_description"]
    with (out / "attention.tsv").open() as handle:
        tsv = {r["name"]: r for r in csv.DictReader(handle, delimiter="\t")}
    assert tsv["treatment"]["effect_ml"] == "" and float(tsv["nihss"]["effect_ml"]) == pytest.approx(
        by_name["nihss"]["effect_ml"], abs=1e-3)
    # an overwrite without --what-if removes the earlier table: it would not match the new prediction;
    # without --effects (the default: a prediction stays within 10 s) no effect is measured
    code = main(_cli(setup, out, "--overwrite"))
    assert code == 0, capsys.readouterr().err
    assert not any((out / name).exists() for name in OPTIONAL_FILES.values())
    assert "effect_ml" not in json.loads((out / "attention.json").read_text())["features"][0]


@pytest.mark.parametrize(("what_if", "message"), [
    (["onset_to_imaging_h=2;6"], "onset_to_imaging_h"),
    (["onset_to_imaging_h"], "field=value"),
    (["treatment=thrombolysis,laser"], "laser"),
    (["onset_to_imaging_h=-1"], "out of range"),
])
def test_cli_malformed_what_if_is_one_error_line_and_nothing_written(
        setup: dict, capsys: pytest.CaptureFixture, what_if: list[str], message: str) -> None:
    out = setup["root"] / "bad"
    code = main(_cli(setup, out, "--what-if", *what_if))
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and "Traceback" not in captured.err
    assert "RESULT" not in captured.out and not out.exists()


def test_cli_what_if_is_refused_for_batches(setup: dict, capsys: pytest.CaptureFixture) -> None:
    code = main(["--isles", str(setup["root"]), "--out", str(setup["root"] / "b"), "--what-if", "treatment=none"])
    captured = capsys.readouterr()
    assert code == 2 and "single case" in captured.err and captured.err.count("\n") == 1


def test_sample_volumes_in_the_lesion_box_equal_the_whole_grid(setup: dict) -> None:
    """The Monte-Carlo volumes label components only around the lesions: same result as the whole grid."""
    import torch

    from StrokePredictorLib.postprocess import filter_components

    predictor = Predictor(setup["bundle"], device="cpu", min_component_ml=0.004, max_component_adc=0.9)
    shape = (12, 14, 16)
    rng = np.random.default_rng(0)
    brain = np.zeros(shape, dtype=bool)
    brain[1:11, 1:13, 2:15] = True
    index = torch.from_numpy(np.flatnonzero(brain))
    probs = torch.from_numpy(rng.random((7, index.numel())).astype(np.float32) ** 3)  # sparse, many components
    adc = rng.uniform(0.4, 1.2, shape).astype(np.float32)
    voxel_ml = 0.001
    volumes = predictor._sample_volumes(probs, index, shape, voxel_ml, adc)
    expected = []
    for row in (probs >= predictor.threshold).numpy():
        grid = np.zeros(brain.size, dtype=bool)
        grid[index.numpy()[row]] = True
        expected.append(filter_components(grid.reshape(shape), voxel_ml, 0.004, adc, 0.9).sum() * voxel_ml)
    np.testing.assert_array_equal(volumes, expected)
    assert 0 < min(expected) < max(expected)
    nothing = predictor._sample_volumes(torch.zeros_like(probs), index, shape, voxel_ml, adc)
    np.testing.assert_array_equal(nothing, np.zeros(7))



def test_sample_volumes_apply_the_combined_component_rules(setup: dict) -> None:
    """Mean probability and the small-component ADC gate act on every Monte-Carlo sample as on the mask:
    each sample's volume equals ``PostProcessing.apply`` of that sample on the whole grid."""
    import torch

    from StrokePredictorLib import inference

    assert inference.COMPONENT_RULE
    predictor = Predictor(setup["bundle"], device="cpu")
    predictor.postprocessing = predictor.postprocessing.replace(
        threshold=0.3, min_component_ml=0.0, max_component_adc=0.0, min_component_probability=0.6,
        small_component_ml=0.003, small_component_adc=0.8)
    shape = (12, 14, 16)
    rng = np.random.default_rng(1)
    brain = np.zeros(shape, dtype=bool)
    brain[1:11, 1:13, 2:15] = True
    index = torch.from_numpy(np.flatnonzero(brain))
    probs = torch.from_numpy(rng.random((5, index.numel())).astype(np.float32) ** 16)  # sparse components
    adc = rng.uniform(0.4, 1.2, shape).astype(np.float32)
    voxel_ml = 0.001
    volumes = predictor._sample_volumes(probs, index, shape, voxel_ml, adc)
    expected, thresholded = [], []
    for row in probs.numpy():
        grid = np.zeros(brain.size, dtype=np.float32)
        grid[index.numpy()] = row
        expected.append(predictor.postprocessing.apply(grid.reshape(shape), voxel_ml, adc).sum() * voxel_ml)
        thresholded.append((grid >= 0.3).sum() * voxel_ml)
    np.testing.assert_allclose(volumes, expected)
    assert all(e < t for e, t in zip(expected, thresholded, strict=True))  # the rules removed something in every sample


def test_cpu_bf16_session_is_close_to_fp32(setup: dict) -> None:
    predictor = Predictor(setup["bundle"], device="cpu", mc_samples=3)
    exact = WhatIf(predictor, setup["case"], CLINICAL).update({"treatment": "thrombectomy"})
    fast_session = WhatIf(predictor, setup["case"], CLINICAL, cpu_bf16=True)
    fast = fast_session.update({"treatment": "thrombectomy"})
    assert fast_session.cpu_bf16 and not np.array_equal(fast.probability, exact.probability)  # bf16 really ran
    assert float(np.abs(fast.probability - exact.probability).max()) < 0.1


def test_cli_two_scenarios_write_the_comparison_maps(setup: dict, capsys: pytest.CaptureFixture) -> None:
    out = setup["root"] / "compare"
    code = main(_cli(setup, out, "--what-if", "treatment=thrombolysis,thrombectomy", "--no-effects"))
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES.values(), *OPTIONAL_FILES.values(),
                                                           MARKER_FILE])
    dwi = read_volume(setup["paths"]["dwi"])
    difference = read_volume(out / "what_if_difference.nii.gz")
    regions = read_volume(out / "what_if_regions.nii.gz")
    for volume in (difference, regions):
        assert volume.geometry.same_grid(dwi.geometry)
    comparison = json.loads((out / "what_if.json").read_text())["comparison"]
    assert comparison["first"] == "treatment=thrombolysis" and comparison["second"] == "treatment=thrombectomy"
    voxel = dwi.geometry.voxel_volume_ml
    volumes = comparison["volumes_ml"]
    assert volumes["saved"] == pytest.approx((regions.array == 1).sum() * voxel)
    assert volumes["added"] == pytest.approx((regions.array == 2).sum() * voxel)
    assert volumes["first"] == pytest.approx(np.isin(regions.array, (1, 3)).sum() * voxel)
    rows = json.loads((out / "what_if.json").read_text())["scenarios"]
    assert volumes["first"] == pytest.approx(rows[0]["volume_ml"], abs=1e-3)
    assert volumes["second"] == pytest.approx(rows[1]["volume_ml"], abs=1e-3)
    assert float(np.abs(difference.array).max()) > 0 and float(np.abs(difference.array).max()) <= 1.0


def test_growth_bundle_marks_the_features_that_act_through_the_offset(setup: dict, tmp_path: Path) -> None:
    """In a growth bundle onset time and treatment act through the growth offset alone: their
    attention weights do not move with their values, and the outputs say so."""
    bundle_dir = write_tiny_bundle(tmp_path / "bundle", seed=2, config=tiny_config(growth=True))
    out = tmp_path / "out"
    assert main([str(a) for a in ("--dwi", setup["paths"]["dwi"], "--adc", setup["paths"]["adc"], "--bundle",
                                  bundle_dir, "--out", out, "--device", "cpu", "--mc-samples", "2", "--clinical",
                                  "nihss=9", "onset_to_imaging_h=3.5", "treatment=none", "--effects")]) == 0
    attention = json.loads((out / "attention.json").read_text())
    paths = {f["name"]: f["acts_through"] for f in attention["features"]}
    assert {n for n, p in paths.items() if p == "growth offset"} == {"onset_to_imaging_h", "treatment"}
    assert set(paths.values()) == {"growth offset", "cross-attention"}
    assert "missing token" in attention["acts_through_description"]
    with (out / "attention.tsv").open() as handle:
        assert {r["name"]: r["acts_through"] for r in csv.DictReader(handle, delimiter="\t")} == paths
    predictor = Predictor(bundle_dir, device="cpu", mc_samples=2)
    dwi, adc = read_volume(setup["paths"]["dwi"]), read_volume(setup["paths"]["adc"])
    early, late = (predictor.predict(dwi, adc, None, validate({"nihss": 9, "onset_to_imaging_h": h,
                                                               "treatment": t}))
                   for h, t in ((1.0, "thrombectomy"), (20.0, "none")))
    assert early.offset_features == ("onset_to_imaging_h", "treatment")
    assert early.feature_attention == pytest.approx(late.feature_attention, abs=1e-9)
    # in the film bundle every feature acts through the cross-attention
    plain = Predictor(setup["bundle_dir"], device="cpu", mc_samples=2)
    assert plain.predict(dwi, adc, None, validate({"nihss": 9})).offset_features == ()
