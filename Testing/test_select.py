"""``python -m Training select``: the rule, and every kept checkpoint exported and scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from Training.__main__ import main as training_main
from Training.evaluation.select import checkpoints_of, decide


def _row(step: int, misses: int, effects: tuple[bool, ...], dice: float) -> dict:
    return {"checkpoint": f"step_{step:06d}", "step": step, "growth_misses": misses,
            "effects_pass": {f"case{i}": ok for i, ok in enumerate(effects)}, "dice": dice}


def test_the_rule_takes_the_best_dice_among_checkpoints_with_growth_and_effects() -> None:
    rows = [_row(200, 0, (True, False), 0.60),   # best Dice, one effect case fails
            _row(400, 2, (True, True), 0.55),    # too many growth misses
            _row(600, 1, (True, True), 0.50),
            _row(800, 0, (True, True), 0.52)]
    chosen = decide(rows, max_growth_misses=1)
    assert chosen is not None and chosen["step"] == 800
    assert [row["eligible"] for row in rows] == [False, False, True, True]
    assert decide(rows, max_growth_misses=0)["step"] == 800
    tie = [_row(200, 0, (True,), 0.5), _row(400, 0, (True,), 0.5)]
    assert decide(tie, 0)["step"] == 400  # ties: the later step
    assert decide([_row(200, 3, (True,), 0.9), _row(400, 0, (False,), 0.9)], 1) is None


def _checkpoint(model: object, step: int) -> dict:
    from dataclasses import asdict

    from inference_phantom import TINY_GRID

    from StrokePredictorLib.preprocess import Normalization

    return {"model": model.state_dict(), "network": asdict(model.config), "task": "outcome",  # type: ignore[attr-defined]
            "grid": TINY_GRID.to_dict(), "normalization": Normalization().to_dict(), "config": {"batch_size": 2},
            "data": {"source": "test", "n_cases": {}}, "epoch": 0, "step": step, "val_dice": float("nan"),
            "val_loss": float("nan"), "best_val_dice": float("nan")}


@pytest.mark.slow
def test_every_snapshot_is_exported_with_the_given_postprocessing_and_scored(tmp_path: Path) -> None:
    import torch
    from inference_phantom import tiny_config
    from test_clinical_behaviour import _growth_bundle

    from StrokePredictorLib.network import StrokeNet
    from Training.synthesis.generate import write_tiny_dataset
    from Training.training.loop import save_checkpoint, snapshot_name

    data = write_tiny_dataset(tmp_path / "val", n_cases=2, seed=5)
    run = tmp_path / "run" / "outcome"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    for step, seed in ((2, 1), (4, 2)):
        torch.manual_seed(seed)
        model = StrokeNet(tiny_config(growth=True))
        with torch.no_grad():
            model.head.bias.fill_(0.0)
        save_checkpoint(_checkpoint(model, step), folder / snapshot_name(step))
    save_checkpoint(torch.load(folder / snapshot_name(4), weights_only=False), folder / "last.pt")  # same step
    assert [(name, step) for name, step, _ in checkpoints_of(run)] == [("step_000002", 2), ("step_000004", 4)]

    source = _growth_bundle(tmp_path / "source", growth=True)
    out = tmp_path / "select"
    args = ["select", "--run", str(run), "--data", str(data), "--effect-cases", "sub-strokecase0001",
            "--postprocessing-from", str(source), "--out", str(out), "--points", "2", "--mc-samples", "1"]
    code = training_main(args)
    report = json.loads((out / "selection.json").read_text())
    rows = report["checkpoints"]
    assert [row["step"] for row in rows] == [2, 4]
    expected = json.loads((source / "model.json").read_text())["postprocessing"]
    weights = set()
    for row in rows:
        meta = json.loads((Path(row["bundle"]) / "model.json").read_text())
        assert meta["postprocessing"] == expected and meta["data"]["training"]["step"] == row["step"]
        weights.add(meta["weights"]["sha256"])
        summary = json.loads((out / "evaluate" / row["checkpoint"] / "summary.json").read_text())
        assert row["dice"] == round(summary["datasets"]["validation"]["model"]["metrics"]["dice"]["mean"], 4)
        assert 0 <= row["growth_misses"] <= row["growing_cases"] <= 2
        assert len(row["growth_ratios"]) == row["growing_cases"]
        ratios = [case["ratio"] for case in row["growth_ratios"].values()]
        assert row["growth_median"] == (round(float(np.median(ratios)), 3) if ratios else None)
        assert row["growth_misses"] == sum(r < 1.3 for r in ratios)
        assert row["undetected"] == sum(case["early_ml"] == case["late_ml"] == 0
                                        for case in row["growth_ratios"].values())
        assert set(row["effects_pass"]) == {"sub-strokecase0001"}
    assert len(weights) == 2  # two different states, not one exported twice
    chosen = decide([dict(row) for row in rows], max_growth_misses=1)
    assert report["candidate"] == (chosen["checkpoint"] if chosen else None)
    assert code == (0 if chosen else 1)
    assert "| step_000002 | 2 |" in (out / "selection.md").read_text()

    assert training_main(args) == 2  # an earlier selection is not replaced without --overwrite
    bad = [a if a != "sub-strokecase0001" else "sub-strokecase0009" for a in args] + ["--overwrite"]
    assert training_main(bad) == 2  # an effect case that is not in --data


@pytest.mark.slow
def test_an_imaging_only_run_is_chosen_by_dice_alone(tmp_path: Path) -> None:
    """The ablation's twin has no clinical input: no growth or effect check, the largest Dice wins,
    and --effect-cases is refused for it (and required for a fusion run)."""
    import torch
    from inference_phantom import tiny_config

    from StrokePredictorLib.network import StrokeNet
    from Training.synthesis.generate import write_tiny_dataset
    from Training.training.loop import save_checkpoint, snapshot_name

    data = write_tiny_dataset(tmp_path / "val", n_cases=2, seed=5)
    run = tmp_path / "run" / "outcome-imaging"
    (run / "checkpoints").mkdir(parents=True)
    for step, bias in ((2, -6.0), (4, 0.0)):  # two different states: two different Dice
        torch.manual_seed(step)
        model = StrokeNet(tiny_config(growth=True, imaging_only=True))
        with torch.no_grad():
            model.head.bias.fill_(bias)
        save_checkpoint(_checkpoint(model, step), run / "checkpoints" / snapshot_name(step))
    out = tmp_path / "select"
    base = ["select", "--run", str(run), "--data", str(data), "--out", str(out), "--mc-samples", "1"]
    assert training_main([*base, "--effect-cases", "sub-strokecase0001"]) == 2
    assert not out.exists()
    assert training_main(base) == 0
    report = json.loads((out / "selection.json").read_text())
    rows = report["checkpoints"]
    assert [row["step"] for row in rows] == [2, 4]
    assert all(row["imaging_only"] and row["eligible"] and row["growth_misses"] is None for row in rows)
    assert rows[0]["dice"] != rows[1]["dice"]  # the rule has something to choose
    best = max(rows, key=lambda row: (row["dice"], row["step"]))
    assert report["candidate"] == best["checkpoint"]
    for row in rows:
        summary = json.loads((out / "evaluate" / row["checkpoint"] / "summary.json").read_text())
        assert row["dice"] == round(summary["datasets"]["validation"]["model"]["metrics"]["dice"]["mean"], 4)
    assert "imaging-only run" in (out / "selection.md").read_text()
    fusion = tmp_path / "run" / "outcome"
    (fusion / "checkpoints").mkdir(parents=True)
    save_checkpoint(_checkpoint(StrokeNet(tiny_config(growth=True)), 2), fusion / "checkpoints" / snapshot_name(2))
    assert training_main(["select", "--run", str(fusion), "--data", str(data), "--out", str(tmp_path / "s2")]) == 2
