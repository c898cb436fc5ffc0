"""Training/evaluation/ablate.py: honest verdicts ("no difference" when the interval includes 0), steps and
cases beside every figure, sanity flags, and tasks without targets refused before any training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from training_fixtures import build_test_cache, write_isles_phantom

from StrokePredictorLib.errors import StrokePredictorError
from Training.evaluation import ablate


def _stats(mean: float, lo: float, hi: float, fusion: float = 0.5, imaging: float = 0.45) -> dict:
    return {"mean": mean, "sd": 0.1, "ci_lo": lo, "ci_hi": hi, "n": 12, "sd_over_seeds": math.nan,
            "fusion_mean": fusion, "imaging_only_mean": imaging}


def test_verdict_says_no_difference_when_the_interval_includes_zero() -> None:
    # a reported case: +0.056 [+0.000, +0.159] after 4 steps was declared "Better: fusion"
    assert ablate.verdict(_stats(0.056, 0.00004, 0.159), higher_better=True) == "no difference"
    assert ablate.verdict(_stats(0.056, 0.0, 0.159), higher_better=True) == "no difference"
    assert ablate.verdict(_stats(-0.02, -0.06, 0.02), higher_better=True) == "no difference"
    assert ablate.verdict(_stats(0.05, 0.002, 0.1), higher_better=True) == "fusion"
    assert ablate.verdict(_stats(-0.05, -0.1, -0.002), higher_better=True) == "imaging only"
    # volume error: lower is better, so a negative difference favours fusion
    assert ablate.verdict(_stats(-3.0, -5.0, -1.0), higher_better=False) == "fusion"
    assert ablate.verdict(_stats(0.1, math.nan, math.nan), higher_better=True).startswith("n/a")


def test_paired_statistics_by_hand() -> None:
    stats = ablate.paired_statistics(np.array([0.1, 0.3, -0.1, 0.1]), n_bootstrap=500)
    assert stats["mean"] == pytest.approx(0.1) and stats["n"] == 4
    assert stats["sd"] == pytest.approx(np.std([0.1, 0.3, -0.1, 0.1], ddof=1))
    assert -0.1 <= stats["ci_lo"] <= 0.1 <= stats["ci_hi"] <= 0.3


def _task_result(steps: int, n_cases: int, dice: tuple[float, float], f1: tuple[float, float],
                 volumes: tuple[float, float]) -> dict:
    result = {
        "dice": _stats(dice[0] - dice[1], -0.01, 0.2, *dice),
        "lesion_f1": _stats(f1[0] - f1[1], -0.01, 0.2, *f1),
        "abs_volume_diff_ml": _stats(-1.0, -3.0, 0.5, 5.0, 6.0),
        "steps": {"fusion": {0: steps}, "imaging_only": {0: steps}},
        "n_cases": n_cases,
        "volumes_ml": {"fusion": {"pred": volumes[0], "true": volumes[1]},
                       "imaging_only": {"pred": volumes[1], "true": volumes[1]}},
    }
    result["flags"] = ablate.sanity_flags(result)
    return result


def test_report_shows_steps_and_cases_beside_every_figure_and_flags_what_is_unreliable() -> None:
    bad = _task_result(4, 3, (0.049, 0.04), (1.0, 0.2), (1851.0, 6.7))
    good = _task_result(2000, 40, (0.6, 0.58), (0.55, 0.5), (7.0, 6.7))
    assert good["flags"] == []
    flags = " | ".join(bad["flags"])
    for words in ("only 4 training steps per arm", "only 3 evaluated case(s)", "neither arm has learnt",
                  "fusion: lesion F1 1.000 far above Dice 0.049", "fusion: mean predicted volume 1851.0 mL"):
        assert words in flags, words
    assert "imaging only: mean predicted volume" not in flags
    text = ablate.ablation_markdown({"acute": bad, "outcome": good}, (0,))
    rows = [line for line in text.splitlines() if line.startswith("| acute") or line.startswith("| outcome")]
    assert len(rows) == 6
    assert all(row.split(" | ")[2:4] == ["4", "3"] for row in rows if row.startswith("| acute"))
    assert all(row.split(" | ")[2:4] == ["2000", "40"] for row in rows if row.startswith("| outcome"))
    assert all(row.rstrip(" |").endswith("no difference") for row in rows)
    tuned = {**_task_result(300, 40, (0.6, 0.58), (0.55, 0.5), (7.0, 6.7)),
             "initialised_from": {"fusion": None, "imaging_only": {"bundle": "strokepredictor-outcome",
                                                                   "sha256": "759367d327ac" + "0" * 52, "step": 800}}}
    flags = ablate.sanity_flags(tuned)
    assert len(flags) == 1 and "since the weights they started from" in flags[0]
    assert "imaging only: strokepredictor-outcome (sha256 759367d327ac, step 800)" in flags[0]
    assert "mostly reflects the initialisation" in " ".join(ablate.sanity_flags({**tuned, "initialised_from": {}}))
    assert "Better" not in text and "- **acute**: only 4 training steps per arm" in text
    assert "- **outcome**" not in text


def test_tasks_without_targets_are_refused_before_any_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = write_isles_phantom(tmp_path / "data", n_cases=6, seed=1, outcome=False)  # like ISLES 2022
    cache = build_test_cache(data, tmp_path / "cache")

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started before the targets were checked")

    import Training.training.train

    monkeypatch.setattr(Training.training.train, "run", no_training)
    from Training.__main__ import main

    code = main(["ablate", "--cache", str(cache), "--data", str(data), "--out", str(tmp_path / "ablation"),
                 "--tasks", "acute,outcome"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: Cannot ablate:") and "'outcome': 0 training" in err
    assert "--tasks acute" in err and "Traceback" not in err
    assert not (tmp_path / "ablation").exists()
    counts = ablate.check_targets(ablate.AblateConfig(cache=cache, data=data, out=tmp_path / "x", tasks=("acute",)))
    assert counts["acute"]["train"] >= 1 and counts["acute"]["test"] >= 1


def test_trained_twins_are_compared_without_training(tmp_path: Path) -> None:
    """--bundles evaluates a fusion bundle and its imaging-only twin on every case of --data, paired."""
    import json

    from inference_phantom import tiny_config, write_tiny_bundle

    from Training.evaluation.ablate import AblateConfig, run
    from Training.synthesis.generate import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", n_cases=2, seed=0)
    fusion = write_tiny_bundle(tmp_path / "fusion", seed=1)
    imaging = write_tiny_bundle(tmp_path / "imaging", seed=2, config=tiny_config(imaging_only=True))
    metadata = json.loads((imaging / "model.json").read_text())  # a twin fine-tuned from trained weights
    metadata["data"]["initialised_from"] = {"bundle": "tiny-start", "sha256": "ab" * 32, "step": 700}
    (imaging / "model.json").write_text(json.dumps(metadata))
    out = tmp_path / "ablation"
    results = run(AblateConfig(bundles=(fusion, imaging), data=data, out=out, device="cpu", mc_samples=2,
                               bootstrap=100))
    acute = results["acute"]
    assert acute["n_cases"] == 2 and acute["dice"]["n"] == 2
    assert acute["steps"] == {"fusion": {0: 0}, "imaging_only": {0: 0}}
    assert any("training steps" in flag for flag in acute["flags"])  # a random bundle is flagged, not trusted
    assert "imaging only: tiny-start (sha256 abababababab, step 700)" in " ".join(acute["flags"])
    assert acute["initialised_from"]["imaging_only"]["step"] == 700
    assert "(fusion)" in (out / "ablation.md").read_text() and json.loads((out / "ablation.json").read_text())
    with pytest.raises(StrokePredictorError, match="fusion bundle first"):
        run(AblateConfig(bundles=(imaging, fusion), data=data, out=tmp_path / "again", device="cpu"))
    blind = write_tiny_bundle(tmp_path / "blind", seed=1, config=tiny_config(clinical_blind=True))
    results = run(AblateConfig(bundles=(fusion, blind), data=data, out=tmp_path / "blind_ablation", device="cpu",
                               mc_samples=2, bootstrap=100))  # the fusion weights, blind: a twin too
    assert results["acute"]["dice"]["n"] == 2
    with pytest.raises(StrokePredictorError, match="fusion bundle first"):
        run(AblateConfig(bundles=(blind, fusion), data=data, out=tmp_path / "again2", device="cpu"))
