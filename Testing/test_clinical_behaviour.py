"""Behaviour checks (Training/evaluation/clinical_behaviour.py) on controllable fake predictors,
and the acute bundle's stability on the sample case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from StrokePredictorLib.clinical import ClinicalRecord, validate
from Training.__main__ import main as training_main
from Training.evaluation.clinical_behaviour import check_behaviour, sweep_values

BASE = validate({"age": 70, "sex": "F", "nihss": 12, "onset_to_imaging_h": 4, "systolic_bp": 150, "glucose": 7,
                 "atrial_fibrillation": "no", "prior_stroke": "no", "prestroke_mrs": 0})
FACTOR = {"none": 1.0, "thrombolysis": 0.8, "thrombectomy": 0.5, "both": 0.45, None: 0.75}


def follows(record: ClinicalRecord) -> float:
    """Core plus a penumbra that infarcts with time, less with treatment, more with NIHSS."""
    onset = record.values["onset_to_imaging_h"]
    growth = 1.0 - 0.9 * 2.0 ** (-(6.0 if onset is None else onset) / 6.0)
    nihss = record.values["nihss"]
    severity = 1.0 + 0.03 * (12.0 if nihss is None else nihss)
    age = record.values["age"]
    return 10.0 + 40.0 * growth * FACTOR[record.values["treatment"]] * severity + 0.001 * (age or 70.0)


def ignores(record: ClinicalRecord) -> float:
    """The shipped outcome model's behaviour: the volume hardly moves, and not with onset or treatment."""
    glucose = record.values["glucose"]
    return 48.0 + 0.05 * (7.0 if glucose is None else glucose)


def _by_name(results: list) -> dict:
    return {r.name: r for r in results}


def test_a_predictor_that_follows_onset_and_treatment_passes() -> None:
    results = _by_name(check_behaviour(follows, BASE, "outcome"))
    assert set(results) == {"onset_monotone", "treatment_not_larger", "missing_between", "effects_top3", "growth"}
    failed = [(r.name, r.detail) for r in results.values() if not r.passed]
    assert not failed, failed
    assert results["growth"].value > 1.3
    effects = results["effects_top3"].volumes["effects_ml"]
    assert list(effects)[:3] != [] and set(list(effects)[:3]) == {"onset_to_imaging_h", "treatment", "nihss"}


def test_a_predictor_that_ignores_them_fails_the_effect_checks() -> None:
    results = _by_name(check_behaviour(ignores, BASE, "outcome"))
    assert not results["effects_top3"].passed and "glucose" in results["effects_top3"].value
    assert not results["growth"].passed and results["growth"].value == pytest.approx(1.0)
    # a constant in onset and treatment violates no ordering: those checks alone cannot catch it
    assert results["onset_monotone"].passed and results["treatment_not_larger"].passed


def test_each_ordering_check_catches_its_violation() -> None:
    def shrinks_with_time(record: ClinicalRecord) -> float:
        return 100.0 - follows(record)

    def treatment_harms(record: ClinicalRecord) -> float:
        return follows(record) * (2.0 if record.values["treatment"] == "thrombectomy" else 1.0)

    def missing_outside(record: ClinicalRecord) -> float:
        return follows(record) + (30.0 if record.values["treatment"] is None else 0.0)

    assert not _by_name(check_behaviour(shrinks_with_time, BASE, "outcome"))["onset_monotone"].passed
    harmed = _by_name(check_behaviour(treatment_harms, BASE, "outcome"))
    assert not harmed["treatment_not_larger"].passed and "thrombectomy" in harmed["treatment_not_larger"].detail
    outside = _by_name(check_behaviour(missing_outside, BASE, "outcome"))
    assert not outside["missing_between"].passed and outside["missing_between"].value == 5
    # within the tolerance, a voxel-sized wobble is not a violation
    wobble = _by_name(check_behaviour(lambda r: follows(r) - (0.05 if r.values["onset_to_imaging_h"] == 24 else 0),
                                      BASE, "outcome"))
    assert wobble["onset_monotone"].passed


def test_acute_stability_limit() -> None:
    stable = check_behaviour(lambda r: 30.0 + 0.02 * (r.values["nihss"] or 0), BASE, "acute")
    assert len(stable) == 1 and stable[0].name == "stable" and stable[0].passed
    assert stable[0].value == pytest.approx(0.02 * 42 / (30.0 + 0.02 * 12), rel=1e-3)
    swinging = check_behaviour(lambda r: 30.0 * (1.2 if r.values["treatment"] == "both" else 1.0), BASE, "acute")
    assert not swinging[0].passed and swinging[0].value == pytest.approx(0.2)
    with pytest.raises(ValueError, match="task"):
        check_behaviour(follows, BASE, "chronic")


def test_sweeps_cover_each_whole_range_and_missing() -> None:
    assert sweep_values("nihss") == [0.0, 10.0, 21.0, 32.0, 42.0, None]
    assert sweep_values("treatment") == ["none", "thrombolysis", "thrombectomy", "both", None]
    assert sweep_values("onset_to_imaging_h")[0] == 0.0 and sweep_values("onset_to_imaging_h")[-2] == 48.0


def test_verb_is_registered_and_refuses_bad_input(capsys: pytest.CaptureFixture) -> None:
    assert training_main(["behaviour", "--task", "chronic", "--bundle", "x"]) == 2
    assert "error:" in capsys.readouterr().err
    assert training_main(["behaviour"]) == 2
    assert "--bundle is required" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_shipped_acute_bundle_is_stable_across_the_clinical_range(tmp_path: Path) -> None:
    """the acute volume moves by at most 10% across the whole clinical range (sample case)."""
    out = tmp_path / "acute.json"
    code = training_main(["behaviour", "--bundle", str(REPO / "StrokePredictor/Resources/Models/acute"),
                          "--points", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    check = report["checks"][0]
    assert check["name"] == "stable" and report["task"] == "acute"
    assert code == 0 and check["passed"] and check["value"] <= 0.10, check


# ----------------------------------------------------------------------------------------
# Growth on simulated cases (--data)
# ----------------------------------------------------------------------------------------
def _growing(factor: float):
    """A volume function whose none-at-20-h volume is ``factor`` times its thrombectomy-at-1-h volume."""
    def volume(record: ClinicalRecord) -> float:
        return 10.0 * (factor if record.values["treatment"] == "none" else 1.0)
    return volume


def test_growth_check_asks_only_cases_that_grow_in_the_simulation() -> None:
    from Training.evaluation.clinical_behaviour import check_simulated_growth

    def never(record: ClinicalRecord) -> float:
        raise AssertionError("a case whose simulated infarct barely grows must not be predicted")

    cases = [("a", 2.0, _growing(1.6), BASE), ("b", 1.8, _growing(1.35), BASE), ("c", 1.2, never, BASE)]
    result = check_simulated_growth(iter(cases), "outcome")[0]
    assert result.name == "growth_cases" and result.passed and result.value == "2/2"
    assert set(result.volumes) == {"a", "b"} and result.volumes["a"]["ratio"] == pytest.approx(1.6)
    failing = check_simulated_growth([("a", 2.0, _growing(1.6), BASE), ("b", 1.9, _growing(1.1), BASE)], "outcome")[0]
    assert not failing.passed and failing.value == "1/2"
    assert not check_simulated_growth([("c", 1.2, never, BASE)], "outcome")[0].passed  # nothing checked: no pass
    assert not failing.volumes["b"]["undetected"] and "not segmented" not in failing.detail
    missed = check_simulated_growth([("a", 2.0, _growing(1.6), BASE), ("d", 2.5, lambda record: 0.0, BASE)],
                                    "outcome")[0]
    assert not missed.passed and missed.value == "1/2"  # a detection failure is a growth miss ...
    assert missed.volumes["d"]["undetected"] and not missed.volumes["a"]["undetected"]
    assert "1 not segmented in either scenario" in missed.detail  # ... named as such


def test_growth_check_names_growing_cases_whose_prediction_misses_the_lesion() -> None:
    """Where the volume function knows the case's acute lesion (``touches``), the report says whether the
    grown prediction reaches it: growth elsewhere passes the ratio but is named, not hidden."""
    from Training.evaluation.clinical_behaviour import check_simulated_growth

    def aimed(factor: float, hits: bool):
        volume = _growing(factor)
        volume.touches = lambda record: hits
        return volume

    result = check_simulated_growth([("a", 2.0, aimed(1.6, True), BASE), ("b", 2.0, aimed(2.0, False), BASE),
                                     ("c", 2.0, _growing(1.5), BASE)], "outcome")[0]
    assert result.passed and result.value == "3/3"  # informative only: the check is unchanged
    assert result.volumes["a"]["touches_lesion"] is True and result.volumes["b"]["touches_lesion"] is False
    assert "touches_lesion" not in result.volumes["c"]
    assert "touches the acute lesion in 1 of 2 (1 growing case(s) grow something else: b)" in result.detail
    plain = check_simulated_growth([("c", 2.0, _growing(1.5), BASE)], "outcome")[0]
    assert "touches" not in plain.detail


def test_growth_check_of_an_acute_bundle_asks_for_stability() -> None:
    from Training.evaluation.clinical_behaviour import check_simulated_growth

    stable = check_simulated_growth([("a", 1.0, _growing(1.05), BASE), ("b", 3.0, _growing(0.97), BASE)], "acute")[0]
    assert stable.name == "stable_cases" and stable.passed
    moved = check_simulated_growth([("a", 2.0, _growing(1.25), BASE)], "acute")[0]
    assert not moved.passed and moved.volumes["a"]["ratio"] == pytest.approx(0.2)


def test_generated_cases_record_their_simulated_growth(tmp_path: Path) -> None:
    """The generator records the two scenarios' simulated infarcts, and --data reads them end to end."""
    from inference_phantom import write_tiny_bundle

    from Training.synthesis.generate import write_tiny_dataset
    from Training.synthesis.outcome import GROWTH_SCENARIOS

    folder = write_tiny_dataset(tmp_path / "tiny", n_cases=2, seed=3)
    for meta in json.loads((folder / "dataset.json").read_text())["cases"]:
        scenarios = meta["outcome"]["scenarios_template_ml"]
        early, late = (scenarios[name] for name in GROWTH_SCENARIOS)
        assert late >= early > 0 and scenarios["growth"] == pytest.approx(late / early)
    bundle = write_tiny_bundle(tmp_path / "bundle")
    out = tmp_path / "growth.json"
    code = training_main(["behaviour", "--bundle", str(bundle), "--data", str(folder), "--task", "acute",
                          "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["checks"][0]["name"] == "stable_cases" and set(report["checks"][0]["volumes"]) == {
        "sub-strokecase0001", "sub-strokecase0002"}
    assert code == (0 if report["passed"] else 1)
    training_main(["behaviour", "--bundle", str(bundle), "--data", str(folder), "--task", "outcome",
                   "--min-simulated-growth", "1.0", "--out", str(out)])
    rows = json.loads(out.read_text())["checks"][0]["volumes"]
    assert len(rows) == 2 and all(isinstance(row["touches_lesion"], bool) for row in rows.values())
    assert training_main(["behaviour", "--bundle", str(bundle), "--data", str(tmp_path)]) == 2  # not generated


@pytest.fixture(scope="module")
def shipped_outcome_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict]:
    """``behaviour`` of the shipped outcome bundle on the (simulated) sample case: exit code and report."""
    out = tmp_path_factory.mktemp("behaviour") / "outcome.json"
    code = training_main(["behaviour", "--bundle", str(REPO / "StrokePredictor/Resources/Models/outcome"),
                          "--points", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["task"] == "outcome"
    return code, report


@pytest.mark.slow
def test_shipped_outcome_bundle_follows_onset_time_and_treatment(shipped_outcome_report: tuple[int, dict]) -> None:
    """On the sample case, the shipped outcome bundle: a later onset never gives a smaller final infarct
    (same treatment), treatment never a larger one than none (same onset), a missing treatment lies
    between none and thrombectomy, and no treatment at 20 h gives at least 1.3x the volume of
    thrombectomy at 1 h."""
    _, report = shipped_outcome_report
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"onset_monotone", "treatment_not_larger", "missing_between", "effects_top3", "growth"}
    failed = {name: (c["value"], c["detail"]) for name, c in checks.items()
              if name != "effects_top3" and not c["passed"]}
    assert not failed, failed
    assert checks["growth"]["value"] >= 1.3


@pytest.mark.slow
def test_shipped_outcome_bundle_gives_onset_treatment_and_nihss_the_largest_effects(
        shipped_outcome_report: tuple[int, dict]) -> None:
    """On the sample case, onset time, treatment and NIHSS have the shipped outcome bundle's three
    largest range effects, and ``behaviour`` exits 0 (every check passes)."""
    code, report = shipped_outcome_report
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["effects_top3"]["passed"], checks["effects_top3"]["detail"]
    assert code == 0


# ----------------------------------------------------------------------------------------
# Effects by path (--paths)
# ----------------------------------------------------------------------------------------
def _growth_bundle(directory: Path, **overrides: object) -> Path:
    import torch
    from inference_phantom import TINY_GRID, tiny_config

    from StrokePredictorLib.bundle import save_bundle
    from StrokePredictorLib.network import StrokeNet
    from StrokePredictorLib.postprocess import PostProcessing
    from StrokePredictorLib.preprocess import Normalization

    torch.manual_seed(4)
    model = StrokeNet(tiny_config(**overrides))
    return save_bundle(directory, model, task="outcome", grid=TINY_GRID, normalization=Normalization(),
                       data={"source": "test"}, metrics={}, postprocessing=PostProcessing(threshold=0.5,
                                                                                          min_component_ml=0.0))


def test_frozen_growth_inputs_hold_the_offset_and_let_go_after(tmp_path: Path) -> None:
    import torch

    from StrokePredictorLib.bundle import load_bundle
    from StrokePredictorLib.clinical import encode
    from Training.evaluation.clinical_behaviour import growth_inputs_frozen

    model = load_bundle(_growth_bundle(tmp_path / "b", growth=True)).model
    with torch.no_grad():
        for parameter in model.growth.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    image = torch.rand(1, 3, 16, 16, 16)
    flair = torch.tensor([True])

    def offset(record: ClinicalRecord) -> float:
        values, missing = (torch.from_numpy(a)[None] for a in encode(record))
        with torch.no_grad():
            return float(model.features(image, values, missing, flair)["features"][0, -1, 0, 0, 0])

    other = validate({**BASE.values, "sex": "M", "onset_to_imaging_h": 20, "treatment": "none"})
    free = (offset(BASE), offset(other))
    assert free[0] != free[1]
    with growth_inputs_frozen(model, BASE):
        assert offset(other) == pytest.approx(free[0], abs=1e-6)
    assert offset(other) == pytest.approx(free[1], abs=1e-6)  # the class's forward again


def test_paths_split_each_effect_and_refuse_a_network_without_growth(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "paths.json"
    bundle = _growth_bundle(tmp_path / "growth", growth=True)
    training_main(["behaviour", "--bundle", str(bundle), "--points", "2", "--paths", "--out", str(out)])
    split = json.loads(out.read_text())["effects_by_path"]
    assert len(split) == 10 and "through the cross-attention" in capsys.readouterr().out
    # onset time and treatment reach a growth network only through the offset: nothing on the core path
    assert split["onset_to_imaging_h"]["all_ml"] > 1.0  # the random growth head does move the volume
    assert split["onset_to_imaging_h"]["core_path_ml"] == 0 and split["treatment"]["core_path_ml"] == 0
    plain = _growth_bundle(tmp_path / "plain")
    assert training_main(["behaviour", "--bundle", str(plain), "--points", "2", "--paths"]) == 2
    assert "--paths needs an outcome bundle with a growth head" in capsys.readouterr().err


def test_the_checks_can_predict_as_the_product_does(tmp_path: Path) -> None:
    """``--mc-samples 1`` (the default) predicts with dropout off; ``--mc-samples 20`` with the product's
    Monte-Carlo mean (seed 0); anything outside 1-100 is refused with exit status 2."""
    from Training.evaluation.clinical_behaviour import BehaviourConfig, behaviour_predictor

    bundle = _growth_bundle(tmp_path / "bundle", growth=True)
    one, many = behaviour_predictor(bundle), behaviour_predictor(bundle, mc_samples=20)
    assert one.deterministic and one.mc_samples == 1
    assert not many.deterministic and many.mc_samples == 20 and many.seed == 0
    assert BehaviourConfig(mc_samples=20).mc_samples == 20
    with pytest.raises(ValueError, match="mc_samples must lie between 1 and 100"):
        BehaviourConfig(mc_samples=0)
    assert training_main(["behaviour", "--bundle", str(bundle), "--mc-samples", "101"]) == 2
