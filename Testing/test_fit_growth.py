"""fit-growth: only the growth head moves; the rest of the bundle is copied; bad input is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from inference_phantom import TINY_GRID, tiny_config
from test_gpu_synth import _fake_soop

from StrokePredictorLib.bundle import load_bundle, save_bundle
from StrokePredictorLib.errors import StrokePredictorError
from StrokePredictorLib.network import StrokeNet
from StrokePredictorLib.postprocess import PostProcessing
from StrokePredictorLib.preprocess import Normalization
from Training import config as cfg
from Training.synthesis.gpu_synth import build_pack
from Training.training.fit_growth import FitGrowthConfig, fit

pytestmark = pytest.mark.slow


def _bundle(directory: Path, **overrides: object) -> Path:
    torch.manual_seed(0)
    model = StrokeNet(tiny_config(**overrides))
    return save_bundle(directory, model, task="outcome", grid=TINY_GRID, normalization=Normalization(),
                       data={"source": "test"}, metrics={}, postprocessing=PostProcessing(threshold=0.4))


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("soop")
    return build_pack(_fake_soop(root / "soop"), root / "pack.npz", workers=1)


@pytest.mark.parametrize(("imaging_only", "heads"), [(False, False), (True, False), (False, True)])
def test_only_the_growth_head_is_fitted(pack: Path, tmp_path: Path, imaging_only: bool, heads: bool) -> None:
    source = _bundle(tmp_path / "source", growth=True, imaging_only=imaging_only)
    config = FitGrowthConfig(bundle=source, pack=pack, out=tmp_path / "fitted", volumes=2, val_volumes=1,
                             scenarios=1, steps=5, lr=0.05, seed=1, val_subset="train", heads=heads)
    report = fit(config)
    assert set(report["before"]) == set(report["after"]) == {"train", "val"}
    assert report["after"]["train"]["loss"] <= report["before"]["train"]["loss"] + 1e-6
    before, after = load_bundle(source), load_bundle(tmp_path / "fitted")
    old, new = before.model.state_dict(), after.model.state_dict()
    moved = {k for k in old if not torch.equal(old[k], new[k])}
    assert moved and all(k.startswith(("growth.", "head.", "risk.") if heads else "growth.") for k in moved)
    if heads:
        assert {"head.weight", "risk.weight"} <= moved  # the 1x1x1 heads are refit too, nothing else
    if imaging_only:
        assert moved == {"growth.bias"}
    assert after.postprocessing.threshold == 0.4 and after.task == "outcome"
    assert after.metadata["data"]["growth_fit"]["steps"] == 5
    assert json.loads((tmp_path / "fitted" / "fit_growth.json").read_text()) == report
    with pytest.raises(cfg.ConfigError, match="--overwrite"):
        fit(config)


def test_a_bundle_without_growth_head_is_refused(pack: Path, tmp_path: Path) -> None:
    source = _bundle(tmp_path / "plain")
    with pytest.raises(cfg.ConfigError, match="no growth head"):
        fit(FitGrowthConfig(bundle=source, pack=pack, out=tmp_path / "out"))


def test_volume_mode_builds_the_growth_by_volume_pair_from_an_acute_bundle(pack: Path, tmp_path: Path) -> None:
    from Training.training.fit_growth import fit_volume

    torch.manual_seed(0)
    source = save_bundle(tmp_path / "acute", StrokeNet(tiny_config()), task="acute", grid=TINY_GRID,
                         normalization=Normalization(), data={"source": "test"}, metrics={},
                         postprocessing=PostProcessing(threshold=0.4))
    config = FitGrowthConfig(bundle=source, pack=pack, out=tmp_path / "fusion", twin_out=tmp_path / "twin",
                             volume=True, samples=4, val_samples=2, scenarios=1, steps=30, lr=0.05, seed=1,
                             val_subset="train", tissue_adc_max=1.5, seed_probability=0.3)
    reports = fit_volume(config)
    acute = load_bundle(source).model.state_dict()
    for name, blind in (("fusion", False), ("twin", True)):
        bundle = load_bundle(tmp_path / name)
        assert bundle.task == "outcome" and bundle.config.growth_volume and bundle.config.clinical_blind is blind
        assert bundle.model.risk is None
        assert bundle.config.growth_tissue_adc_max == 1.5  # 1.5 x10^-3 mm^2/s in the network's units (x 1000 / 1000)
        assert bundle.config.growth_seed_probability == 0.3
        state = bundle.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in acute.items())  # the acute network is the core, unchanged
        assert {k for k in state if k not in acute} == {k for k in state if k.startswith("growth.")}
        report = reports["twin" if blind else "fusion"]
        assert report["mse_log_ratio_after"]["train"] < report["mse_log_ratio_before"]["train"]
        assert json.loads((tmp_path / name / "fit_growth.json").read_text()) == report
    assert set(load_bundle(tmp_path / "twin").model.state_dict()) - set(acute) == {"growth.bias"}
    assert reports["twin"]["val_correlation"] is None  # a constant
    with pytest.raises(cfg.ConfigError, match="--overwrite"):
        fit_volume(config)


def test_volume_mode_keeps_its_best_step_when_the_rate_overshoots(pack: Path, tmp_path: Path) -> None:
    from Training.training.fit_growth import fit_volume

    torch.manual_seed(0)
    source = save_bundle(tmp_path / "acute", StrokeNet(tiny_config()), task="acute", grid=TINY_GRID,
                         normalization=Normalization(), data={"source": "test"}, metrics={})
    reports = {}
    for lr in (0.05, 50.0):  # a sensible rate, and one that throws the head far past any minimum
        config = FitGrowthConfig(bundle=source, pack=pack, out=tmp_path / f"fusion{lr}", volume=True, samples=4,
                                 val_samples=2, scenarios=1, steps=60, lr=lr, clinical_drop_p=0.0, seed=1,
                                 val_subset="train")
        reports[lr] = fit_volume(config)["fusion"]
    for report in reports.values():
        assert report["mse_log_ratio_after"]["train"] <= report["mse_log_ratio_before"]["train"]
        assert 0 <= report["best_step"] <= 60
    assert reports[50.0]["best_step"] < 60  # it overshot, and an earlier step was kept


def test_volume_samples_hold_the_log_growth_of_every_scenario(pack: Path) -> None:
    import numpy as np

    from Training.synthesis.gpu_synth import Pack
    from Training.training.fit_growth import volume_samples

    data = volume_samples(Pack.load(pack), "train", 3, 2, seed=4)
    assert data["values"].shape == (9, 10) and data["missing"].shape == (9, 10)
    assert (data["log_ratio"] >= 0).all() and np.isfinite(data["log_ratio"]).all()
    assert len(set(np.round(data["log_ratio"], 5))) > 1  # the scenarios differ


def test_volume_mode_can_seed_from_the_core_the_source_bundle_reports(pack: Path, tmp_path: Path) -> None:
    from Training.training.fit_growth import fit_volume, main

    torch.manual_seed(0)
    acute_block = PostProcessing(threshold=0.3, flip_tta=True, min_component_ml=0.5, max_component_adc=0.85,
                                 volume_log_margin=1.7)
    source = save_bundle(tmp_path / "acute", StrokeNet(tiny_config()), task="acute", grid=TINY_GRID,
                         normalization=Normalization(), data={"source": "test"}, metrics={},
                         postprocessing=acute_block)
    config = FitGrowthConfig(bundle=source, pack=pack, out=tmp_path / "fusion", volume=True, samples=3,
                             val_samples=2, scenarios=1, steps=5, seed=1, val_subset="train", seed_reported=True)
    report = fit_volume(config)["fusion"]
    seeded = load_bundle(tmp_path / "fusion")
    # the acute block is the seed (its volume interval aside); the outcome block starts as a copy, to be searched
    assert seeded.growth_seed == acute_block.replace(volume_log_margin=0.0, selected_on=seeded.growth_seed.selected_on)
    assert "the growth seeds from the core it reports" in seeded.growth_seed.selected_on
    assert report["seed_reported"] is True and seeded.postprocessing.threshold == 0.3
    with pytest.raises(cfg.ConfigError, match="leave --seed-probability"):
        fit_volume(FitGrowthConfig(bundle=source, pack=pack, out=tmp_path / "other", volume=True,
                                   seed_reported=True, seed_probability=0.3))
    with pytest.raises(cfg.ConfigError, match="--seed-reported is a setting of --volume"):
        main(["--bundle", str(source), "--pack", str(pack), "--out", str(tmp_path / "third"), "--seed-reported"])
    # another block for the seed (a searched postprocess.json), and the grown core alone as the outcome
    other = PostProcessing(threshold=0.45, flip_tta=True, min_component_ml=0.2, min_component_probability=0.7,
                           volume_log_margin=1.2)
    (tmp_path / "postprocess.json").write_text(json.dumps({"postprocessing": other.to_dict(), "table": []}))
    alone = fit_volume(FitGrowthConfig(
        bundle=source, pack=pack, out=tmp_path / "alone", twin_out=tmp_path / "alone_twin", volume=True, samples=3,
        val_samples=2, scenarios=1, steps=5, seed=1, val_subset="train", seed_reported=True,
        seed_block=tmp_path / "postprocess.json", alone=True))
    for name in ("alone", "alone_twin"):
        bundle = load_bundle(tmp_path / name)
        assert bundle.config.growth_alone is True
        assert bundle.growth_seed == other.replace(volume_log_margin=0.0, selected_on=bundle.growth_seed.selected_on)
        assert "postprocess.json" in bundle.growth_seed.selected_on
        assert bundle.postprocessing.threshold == 0.3  # the outcome block is still the source's, to be searched
    assert alone["fusion"]["alone"] is True and alone["fusion"]["seed_block"].endswith("postprocess.json")
    assert seeded.config.growth_alone is False  # the default: the core head's samples beside the grown core
    with pytest.raises(cfg.ConfigError, match="--seed-block is a setting of --seed-reported"):
        fit_volume(FitGrowthConfig(bundle=source, pack=pack, out=tmp_path / "fourth", volume=True,
                                   seed_block=tmp_path / "postprocess.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(StrokePredictorError, match="--seed-block .*bad.json: expected a JSON object with a "
                                                   "'postprocessing' block"):
        fit_volume(FitGrowthConfig(bundle=source, pack=pack, out=tmp_path / "fifth", volume=True,
                                   seed_reported=True, seed_block=tmp_path / "bad.json"))
    with pytest.raises(cfg.ConfigError, match="--alone is a setting of --volume"):
        main(["--bundle", str(source), "--pack", str(pack), "--out", str(tmp_path / "sixth"), "--alone"])


def test_volume_mode_fits_the_same_head_whatever_ran_before(pack: Path, tmp_path: Path) -> None:
    """The growth head's initial weights come from --seed, not from the process's random state (label
    sampling draws from it a varying amount), so the same command gives the same bundle."""
    from safetensors.torch import load_file

    from Training.training.fit_growth import fit_volume

    torch.manual_seed(0)
    source = save_bundle(tmp_path / "acute", StrokeNet(tiny_config()), task="acute", grid=TINY_GRID,
                         normalization=Normalization(), data={"source": "test"}, metrics={})
    weights = []
    for run, noise in enumerate((1, 2)):
        torch.manual_seed(noise)  # a different random state before each run
        fit_volume(FitGrowthConfig(bundle=source, pack=pack, out=tmp_path / f"run{run}", volume=True, samples=3,
                                   val_samples=2, scenarios=1, steps=20, lr=0.05, seed=1, val_subset="train"))
        weights.append(load_file(str(tmp_path / f"run{run}" / "weights.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
