"""Training/training/export.py: checkpoint -> bundle that StrokePredictorLib loads and predicts with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import TINY_NETWORK, build_test_cache, write_isles_phantom

from StrokePredictorLib.bundle import load_bundle
from StrokePredictorLib.errors import OutputExistsError
from Training.data.dataset import CacheError
from Training.training.export import ExportConfig, export
from Training.training.loop import load_checkpoint
from Training.training.train import TrainConfig, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    data = write_isles_phantom(root / "data", n_cases=4, seed=3)
    cache = build_test_cache(data, root / "cache")
    run(TrainConfig(cache=cache, out=root / "run", network=TINY_NETWORK, task="outcome", device="cpu", workers=0,
                    progress=False, tensorboard=False, epochs=2, steps_per_epoch=2, warmup_steps=1))
    return data, root / "run"


def test_export_writes_a_loadable_bundle_with_metrics(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, run_dir = trained
    bundle_dir = export(ExportConfig(run=run_dir, out=tmp_path / "bundle", name="tiny-outcome"))
    bundle = load_bundle(bundle_dir)
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert bundle.task == "outcome" and bundle.name == "tiny-outcome"
    assert list(bundle.grid.size) == state["grid"]["size"]
    for key, value in state["model"].items():
        assert torch.equal(bundle.model.state_dict()[key].float(), value.float()), key
    metrics = bundle.metadata["metrics"]
    assert metrics["val_dice"] == pytest.approx(state["val_dice"]) and metrics["split"] == "val"
    data = bundle.metadata["data"]
    assert data["dataset_name"] == "test phantom" and data["n_cases"]["val"] == 1
    assert data["training"]["epoch"] == state["epoch"]
    with pytest.raises(OutputExistsError):
        export(ExportConfig(run=run_dir, out=bundle_dir))
    with pytest.raises(CacheError, match="no checkpoint"):
        export(ExportConfig(run=tmp_path / "nothing", out=tmp_path / "other"))


@pytest.mark.slow
def test_prediction_cli_runs_with_the_exported_bundle(trained: tuple[Path, Path], tmp_path: Path,
                                                      repo_root: Path) -> None:
    pytest.importorskip("StrokePredictorLib.predict")
    data, run_dir = trained
    bundle_dir = tmp_path / "bundle"
    command = [sys.executable, "-m", "Training", "export", "--run", str(run_dir), "--out", str(bundle_dir)]
    subprocess.run(command, cwd=repo_root, check=True, capture_output=True)
    assert json.loads((bundle_dir / "export_config.json").read_text())["checkpoint"] == "best"
    case = data / "sub-strokecase0001" / "ses-0001" / "dwi"
    out = tmp_path / "prediction"
    result = subprocess.run(
        [sys.executable, "-m", "StrokePredictorLib.predict", "--dwi", str(next(case.glob("*_dwi.nii.gz"))),
         "--adc", str(next(case.glob("*_adc.nii.gz"))), "--bundle", str(bundle_dir), "--out", str(out),
         "--mc-samples", "3", "--device", "cpu", "--clinical", "nihss=7"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bundle"]["task"] == "outcome" and summary["mc_samples"] == 3
    assert (out / "probability.nii.gz").is_file()


def test_export_overwrite_replaces_only_a_bundle(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Finding 1 of the adversarial review: ``export --overwrite --out FOLDER`` deleted any folder, thesis included."""
    from Training.__main__ import main as training_main

    _, run_dir = trained
    thesis = tmp_path / "thesis"
    (thesis / "figures").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("four years")
    code = training_main(["export", "--run", str(run_dir), "--out", str(thesis), "--overwrite"])
    assert code == 2
    assert (thesis / "thesis.tex").read_text() == "four years" and (thesis / "figures").is_dir()
    assert sorted(p.name for p in thesis.iterdir()) == ["figures", "thesis.tex"]
    bundle_dir = export(ExportConfig(run=run_dir, out=tmp_path / "bundle"))
    (bundle_dir / "README.md").write_text("model card")
    assert training_main(["export", "--run", str(run_dir), "--out", str(bundle_dir), "--overwrite"]) == 0
    assert (bundle_dir / "README.md").read_text() == "model card"
    assert load_bundle(bundle_dir).task == "outcome"
