"""Evaluation end to end: a tiny generated dataset, a tiny random bundle, the classical rule."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from StrokePredictorLib.io import read_volume  # noqa: E402
from Training.evaluation import ablate, baseline, evaluate  # noqa: E402
from Training.evaluation import metrics as M  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from inference_phantom import write_tiny_bundle

    from Training.synthesis.generate import write_tiny_dataset

    root = tmp_path_factory.mktemp("evaluate")
    data = write_tiny_dataset(root / "data", n_cases=2, seed=0)
    bundle = write_tiny_bundle(root / "bundle")
    return {"root": root, "data": data, "bundle": bundle}


def test_robust_z_and_rule_on_a_toy_volume() -> None:
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    z = baseline.robust_z(values, np.ones(5, bool))
    # median 3, MAD = median(|-2,-1,0,1,97|) = 1 -> z = (x - 3) / 1.4826
    assert np.allclose(z, (values - 3.0) / 1.4826)


@pytest.mark.slow
def test_evaluate_end_to_end(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "eval"
    split = tiny["root"] / "split.json"
    split.write_text(json.dumps({"train": [], "val": [], "test": ["sub-strokecase0002"]}))
    argv = ["--bundle", str(tiny["bundle"]), "--data", str(tiny["data"]), "--data", str(tiny["data"]),
            "--label", "id_test", "--label", "all", "--split", str(split), "--out", str(out),
            "--mc-samples", "3", "--device", "cpu", "--no-progress"]
    assert evaluate.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["datasets"]["id_test"]["model"]["n_cases"] == 1  # the split restricts the first folder
    assert summary["datasets"]["all"]["model"]["n_cases"] == 2
    with (out / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["dataset"], r["method"]) for r in rows} == {
        ("id_test", "model"), ("id_test", "baseline"), ("all", "model"), ("all", "baseline")}
    # The stored per-case metrics agree with metrics recomputed from the written prediction.
    row = next(r for r in rows if r["dataset"] == "id_test" and r["method"] == "model")
    folder = out / "predictions" / "id_test" / "sub-strokecase0002"
    lesion = read_volume(folder / "lesion.nii.gz")
    truth = read_volume(json.loads((folder / "case.json").read_text())["truth"]).array > 0.5
    assert float(row["dice"]) == pytest.approx(M.dice(lesion.array > 0.5, truth), abs=1e-5)
    assert float(row["volume_true_ml"]) == pytest.approx(truth.sum() * lesion.geometry.voxel_volume_ml, rel=1e-5)
    base = next(r for r in rows if r["dataset"] == "id_test" and r["method"] == "baseline")
    assert float(base["dice"]) == pytest.approx(M.dice(read_volume(folder / "baseline.nii.gz").array > 0.5, truth),
                                                abs=1e-5)
    table = (out / "results.md").read_text()
    assert "| id_test | model | 1 |" in table and "| all | classical rule | 2 |" in table
    assert "## By lesion size" in table and "FP volume per case" in table
    by_size = summary["datasets"]["all"]["model"]["by_size"]
    n_true = sum(int(r["lesions_lt1ml_tp"]) + int(r["lesions_lt1ml_fn"]) for r in rows
                 if r["dataset"] == "all" and r["method"] == "model")
    assert by_size["lt1ml"]["n_true"] == n_true
    assert float(row["fp_component_ml"]) == pytest.approx(
        M.lesion_detection_by_size(lesion.array > 0.5, truth, lesion.geometry.voxel_volume_ml)[1], abs=1e-5)
    assert json.loads((out / "evaluate_config.json").read_text())["mc_samples"] == 3
    # Existing outputs are not overwritten without --overwrite.
    from StrokePredictorLib.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        evaluate.main(argv)
    # Figures from the evaluation.
    from Training.evaluation import visualize

    figures = visualize.run(visualize.VisualizeConfig(eval=out, out=tiny["root"] / "fig"))
    names = {p.name for p in figures}
    assert {"reliability_id_test.png", "attention_all.png", "overlay_all_sub-strokecase0001.png"} <= names
    assert all(p.stat().st_size > 1000 for p in figures)
    # the report and the model card carry the sanity flags (an untrained tiny model earns some)
    from Training.evaluation import model_card

    assert "## Sanity flags" in (out / "results.md").read_text()
    card = model_card.build(model_card.CardConfig(bundle=tiny["bundle"], eval=out))
    expected = "; ".join(summary["sanity_flags"]) or "none"
    assert f"intervals beyond a whole brain): {expected}." in card


def test_evaluate_without_flair(tiny: dict[str, Path]) -> None:
    flags = {}
    for name, extra in (("with", []), ("without", ["--no-flair"])):
        out = tiny["root"] / f"eval_flair_{name}"
        argv = ["--bundle", str(tiny["bundle"]), "--data", str(tiny["data"]), "--out", str(out), "--mc-samples", "2",
                "--device", "cpu", "--no-progress", "--no-baseline", "--no-save-predictions", *extra]
        assert evaluate.main(argv) == 0
        with (out / "per_case.csv").open() as handle:
            flags[name] = [float(r["flair_present"]) for r in csv.DictReader(handle)]
        assert json.loads((out / "summary.json").read_text())["flair"] == (name == "with")
    assert any(flags["with"]) and not any(flags["without"])  # the tiny cases have a FLAIR; --no-flair leaves it out
    assert "FLAIR left out" in (tiny["root"] / "eval_flair_without" / "results.md").read_text()


def test_paired_statistics() -> None:
    stats = ablate.paired_statistics(np.array([0.1, 0.3, 0.2, np.nan]), n_bootstrap=500)
    assert stats["n"] == 3
    assert stats["mean"] == pytest.approx(0.2)
    assert stats["sd"] == pytest.approx(0.1)
    assert 0.1 <= stats["ci_lo"] <= 0.2 <= stats["ci_hi"] <= 0.3
    constant = ablate.paired_statistics(np.full(5, -0.05), np.array(list("aabbc")))
    assert constant["ci_lo"] == pytest.approx(-0.05) and constant["ci_hi"] == pytest.approx(-0.05)


def test_ablation_compare_pairs_cases() -> None:
    per_arm = {
        "fusion": {0: {"a": {"dice": 0.8, "lesion_f1": 1.0, "abs_volume_diff_ml": 1.0},
                       "b": {"dice": 0.6, "lesion_f1": 0.5, "abs_volume_diff_ml": 2.0}}},
        "imaging_only": {0: {"a": {"dice": 0.7, "lesion_f1": 1.0, "abs_volume_diff_ml": 3.0},
                             "b": {"dice": 0.4, "lesion_f1": 0.5, "abs_volume_diff_ml": 2.0}}},
    }
    result = ablate.compare(per_arm, n_bootstrap=200)
    assert result["dice"]["mean"] == pytest.approx(0.15)
    assert result["dice"]["fusion_mean"] == pytest.approx(0.7)
    assert result["abs_volume_diff_ml"]["mean"] == pytest.approx(-1.0)
    # steps and cases per arm (n/a here: not given) precede the means since ablate gained them
    assert "| acute | Dice | n/a | n/a | 0.700 | 0.550 | +0.150" in ablate.ablation_markdown({"acute": result}, (0,))


@pytest.mark.slow
def test_ablation_end_to_end(tmp_path: Path) -> None:
    from training_fixtures import TINY_NETWORK, build_test_cache, write_isles_phantom

    data = write_isles_phantom(tmp_path / "data", n_cases=7)
    build_test_cache(data, tmp_path / "cache")
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"network": TINY_NETWORK, "batch_size": 2, "workers": 0, "tensorboard": False,
                                 "progress": False, "epochs": 1}))
    out = tmp_path / "ablation"
    assert ablate.main(["--cache", str(tmp_path / "cache"), "--data", str(data), "--out", str(out), "--tasks", "acute",
                        "--train-config", str(train), "--max-steps", "1", "--device", "cpu", "--mc-samples", "2",
                        "--subset", "val", "--bootstrap", "100"]) == 0
    result = json.loads((out / "ablation.json").read_text())["results"]["acute"]
    test_cases = json.loads((tmp_path / "cache" / "split.json").read_text())["val"]
    assert result["dice"]["n"] == len(test_cases)
    for arm in ("fusion", "imaging_only"):
        assert json.loads((out / "bundles" / f"acute_seed0_{arm}" / "model.json").read_text())
    fusion = _model_rows(out / "eval" / "acute_seed0_fusion" / "per_case.csv")
    imaging = _model_rows(out / "eval" / "acute_seed0_imaging_only" / "per_case.csv")
    expected = np.mean([fusion[c] - imaging[c] for c in fusion])
    assert result["dice"]["mean"] == pytest.approx(expected, abs=1e-5)
    assert "| acute | Dice |" in (out / "ablation.md").read_text()


def _model_rows(path: Path) -> dict[str, float]:
    with path.open() as handle:
        return {r["case_id"]: float(r["dice"]) for r in csv.DictReader(handle) if r["method"] == "model"}


def test_data_folders_are_checked_before_the_weights_are_read(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import StrokePredictorLib.bundle as bundle_module
    from StrokePredictorLib.bundle import default_bundle_dir
    from StrokePredictorLib.errors import StrokePredictorError

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the bundle was loaded before the data folders were checked")

    monkeypatch.setattr(bundle_module, "load_bundle", refuse)
    config = evaluate.EvaluateConfig(bundle=default_bundle_dir("acute"), data=(tmp_path / "missing",),
                                     out=tmp_path / "eval")
    with pytest.raises(StrokePredictorError, match="missing"):
        evaluate.run(config)


def test_sanity_flags_name_impossible_results() -> None:
    def row(dataset: str, dice: float, f1: float, true: float, pred: float, hi: float | None) -> dict:
        return {"dataset": dataset, "method": "model", "dice": dice, "lesion_f1": f1, "volume_true_ml": true,
                "volume_pred_ml": pred, "volume_ci_hi_ml": hi}

    sound = [row("good", 0.6, 0.7, 10.0, 12.0, 40.0), row("good", 0.5, 0.5, 5.0, 4.0, 20.0)]
    assert evaluate.sanity_flags(sound) == []
    blob = [row("blob", 0.01, 1.0, 5.0, 1900.0, 851_629.0), row("blob", 0.02, 1.0, 8.0, 1850.0, 3000.0)]
    flags = evaluate.sanity_flags(sound + blob)
    assert len(flags) == 3 and all(flag.startswith("blob, model") for flag in flags)
    assert "implausible" in flags[0] and "far above Dice" in flags[1] and "2 of 2 volume intervals" in flags[2]
    # with the case's brain mask known, an interval capped there is flagged; one below it is not, whatever 1800 mL says
    capped = {**row("capped", 0.5, 0.5, 20.0, 25.0, 1970.0), "brain_volume_ml": 1970.0}
    below = {**row("below", 0.5, 0.5, 20.0, 25.0, 1900.0), "brain_volume_ml": 1970.0}
    brain_flags = evaluate.sanity_flags([capped, below])
    assert len(brain_flags) == 1 and brain_flags[0].startswith("capped, model: 1 of 1 volume intervals reach a whole")
    text = evaluate.results_markdown({"bundle": {"name": "b", "sha256": "0" * 64}, "task": "acute", "mc_samples": 1,
                                      "postprocessing": {"threshold": 0.5}, "datasets": {}, "sanity_flags": flags})
    assert "## Sanity flags" in text and "- blob, model: lesion F1 1.000 far above Dice 0.015" in text
