"""train-synth on the CPU from the pre-rendered pool: patches, time-stamped checkpoints, resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_gpu_synth import _fake_soop

from Training import config as cfg
from Training.synthesis.gpu_synth import build_pack
from Training.training.loop import LOG_COLUMNS
from Training.training.train_synth import SynthTrainConfig, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("soop")
    return build_pack(_fake_soop(root / "soop"), root / "pack.npz", workers=1)


def _config(pack: Path, out: Path, **changes: object) -> SynthTrainConfig:
    values = dict(pack=pack, out=out, variants=("acute",), grid_size=(48, 64, 48), patch=(32, 32, 32),
                  batch_size=2, max_steps=3, val_every=2, val_samples=1, pool_size=2, workers=0, device="cpu",
                  source="pool", threads=2, val_subset="train",
                  # fp32 whatever the CPU: with --precision auto a CPU with native bf16 trains the random tiny
                  # network in bf16, where a step can overflow and be skipped (seen in CI), which these tests
                  # of the recipe's plumbing must not depend on
                  precision="fp32")
    values.update(changes)
    return SynthTrainConfig(**values)


def test_pool_run_checkpoints_and_resumes_with_its_own_config(pack_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run(_config(pack_path, out))["acute"]
    assert first["steps"] == 3 and 0 < first["network_share"] <= 1
    last = torch.load(out / "acute" / "checkpoints" / "last.pt", weights_only=False)
    assert last["step"] == 3 and last["optimizer"] is not None and last["elapsed_s"] > 0
    assert last["config"]["source"] == "pool" and "pool" in last["data"]["source"]
    # the checkpoint format of train (one loop): epochs are --val-every steps, validated at 2 and 3
    assert {"scaler", "rng", "epoch", "best_epoch", "bad_epochs", "epoch_loss_sum", "epoch_steps", "val_loss",
            "world_size", "network", "grid", "normalization"} <= set(last)
    assert last["epoch"] == 2 and last["world_size"] == 1
    best = torch.load(out / "acute" / "checkpoints" / "best.pt", weights_only=False)
    assert best["optimizer"] is not None and best["val_dice"] == last["best_val_dice"]

    # resume: the saved config wins; only the budget may grow, and time and steps add up
    resumed = run(_config(pack_path, out, resume=True, max_steps=5, patch=(), grid_size=()))["acute"]
    assert resumed["steps"] == 5 and resumed["seconds"] > last["elapsed_s"]
    rows = list(csv.DictReader((out / "acute" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 5]
    assert tuple(rows[0]) == LOG_COLUMNS and [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["elapsed_s"]) > float(rows[1]["elapsed_s"]) >= last["elapsed_s"] - 1.0
    assert json.loads((out / "acute" / "train_synth_config.json").read_text())["max_steps"] == 5

    # a copy of the run folder continues in the copy (its saved config names the original), and without
    # --variants the run's own variants are found
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert run(SynthTrainConfig(out=copy, resume=True, max_steps=6))["acute"]["steps"] == 6
    assert torch.load(out / "acute" / "checkpoints" / "last.pt", weights_only=False)["step"] == 5
    assert torch.load(copy / "acute" / "checkpoints" / "last.pt", weights_only=False)["step"] == 6

    with pytest.raises(cfg.ConfigError, match="extend"):
        run(_config(pack_path, out, resume=True, max_steps=4))
    with pytest.raises(cfg.ConfigError, match="--lr cannot change"):
        run(_config(pack_path, out, resume=True, max_steps=6, lr=5e-4))
    with pytest.raises(cfg.ConfigError, match="--resume to continue it or --overwrite"):
        run(_config(pack_path, out))


def test_patch_must_fit_the_network(pack_path: Path, tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="multiples of 16"):
        run(_config(pack_path, tmp_path / "bad", patch=(24, 32, 32)))


def test_grid_noise_reaches_the_pool_and_bad_values_are_refused(pack_path: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from Training.synthesis.gpu_synth import SynthConfig
    from Training.synthesis.pool import SynthPool

    seen = []
    original = SynthPool.__init__

    def recording(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(kwargs.get("synth"))
        original(self, *args, **{**kwargs, "background": False})

    monkeypatch.setattr(SynthPool, "__init__", recording)
    run(_config(pack_path, tmp_path / "noisy", max_steps=1, val_every=100, grid_noise=(0.05, 0.11)))
    assert seen == [SynthConfig(grid_noise=(0.05, 0.11))]
    saved = json.loads((tmp_path / "noisy" / "acute" / "train_synth_config.json").read_text())
    assert saved["grid_noise"] == [0.05, 0.11]
    for bad in ((0.2, 0.1), (0.1,), (-0.1, 0.1)):
        with pytest.raises(cfg.ConfigError, match="--grid-noise"):
            run(_config(pack_path, tmp_path / "bad_noise", grid_noise=bad))


def test_non_finite_steps_never_reach_the_weights(pack_path: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from Training.synthesis.pool import SynthPool

    original = SynthPool.batch

    def poisoned(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        batch = original(self, *args, **kwargs)
        batch["image"][:, 0] = float("nan")
        return batch

    monkeypatch.setattr(SynthPool, "batch", poisoned)
    result = run(_config(pack_path, tmp_path / "nan", max_steps=2, val_every=100))["acute"]
    assert result["skipped_steps"] == 2
    weights = torch.load(tmp_path / "nan" / "acute" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_validation_on_preprocessed_fixed_sets(pack_path: Path, tmp_path: Path) -> None:
    """--val-cache: checkpoints are chosen on the fixed sets' cases (every case of each cache, any split),
    with hard-negative patches in the batches; a cache on another grid is refused by name."""
    from training_fixtures import TEST_GRID_SIZE, build_test_cache, write_isles_phantom

    from Training.data.cache import CacheConfig, build_cache
    from Training.data.dataset import CacheError

    data = write_isles_phantom(tmp_path / "fixed", n_cases=3)
    cache = tmp_path / "cache"
    build_cache(CacheConfig(data=data, out=cache, grid_size=(48, 64, 48), grid_spacing=(4.0, 4.0, 4.0),
                            progress=False))
    out = tmp_path / "run"
    result = run(_config(pack_path, out, variants=("acute", "outcome"), val_cache=(cache,),
                         mimic_fraction=0.5, max_steps=2, val_every=2))
    assert set(result) == {"acute", "outcome"}
    data_meta = torch.load(out / "acute" / "checkpoints" / "last.pt", weights_only=False)["data"]
    assert data_meta["n_cases"]["val"] == 3 and data_meta["validation"] == "fixed sets cache"
    assert all(0.0 <= r["best_val_dice"] <= 1.0 for r in result.values())
    other = build_test_cache(data, tmp_path / "small")
    assert tuple(json.loads((other / "index.json").read_text())["grid"]["size"]) == TEST_GRID_SIZE
    with pytest.raises(CacheError, match="grid"):
        run(_config(pack_path, tmp_path / "run2", val_cache=(other,)))
    acute_only = tmp_path / "acute_only"
    build_cache(CacheConfig(data=write_isles_phantom(tmp_path / "no_outcome", n_cases=2, outcome=False),
                            out=acute_only, grid_size=(48, 64, 48), grid_spacing=(4.0, 4.0, 4.0), progress=False))
    with pytest.raises(CacheError, match="no 'outcome' target"):
        run(_config(pack_path, tmp_path / "run3", variants=("outcome",), val_cache=(acute_only,)))


@pytest.mark.parametrize("bad", [{"growth_l2": -0.1, "growth": True}, {"growth_l2": 0.01}])
def test_the_growth_penalty_needs_a_growth_head_and_a_non_negative_weight(pack_path: Path, tmp_path: Path,
                                                                          bad: dict) -> None:
    with pytest.raises(cfg.ConfigError, match="--growth-l2"):
        run(_config(pack_path, tmp_path / "bad", **bad))


def test_a_negative_lesion_loss_weight_is_refused(pack_path: Path, tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="--lesion-loss"):
        run(_config(pack_path, tmp_path / "bad", lesion_loss=-0.5))


def test_snapshots_keep_the_state_of_every_nth_step_and_export(pack_path: Path, tmp_path: Path) -> None:
    from Training.training.export import ExportConfig, export

    out = tmp_path / "run"
    run(_config(pack_path, out, max_steps=4, snapshot_every=2))
    folder = out / "acute" / "checkpoints"
    assert sorted(p.name for p in folder.glob("step_*.pt")) == ["step_000002.pt", "step_000004.pt"]
    second = torch.load(folder / "step_000002.pt", weights_only=False)
    last = torch.load(folder / "last.pt", weights_only=False)
    assert second["step"] == 2 and last["step"] == 4
    assert any(not torch.equal(second["model"][k], last["model"][k]) for k in last["model"])  # a real earlier state
    bundle = export(ExportConfig(run=out / "acute", out=tmp_path / "bundle", checkpoint="checkpoints/step_000002.pt"))
    exported = json.loads((bundle / "model.json").read_text())
    assert exported["data"]["training"]["step"] == 2
    # taken between validations, before the first: no validation metrics (not the loop's starting -1)
    assert exported["metrics"]["val_dice"] is None and exported["metrics"]["best_val_dice"] is None
    with pytest.raises(cfg.ConfigError, match="--snapshot-every"):
        run(_config(pack_path, tmp_path / "bad", snapshot_every=-1))


def test_the_lesion_loss_reaches_every_training_step(pack_path: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from Training.training import losses

    calls: list[float] = []
    original = losses.lesion_dice_loss

    def spy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = original(logits, target)
        calls.append(float(value.detach()))
        return value
    monkeypatch.setattr(losses, "lesion_dice_loss", spy)
    out = tmp_path / "run"
    assert run(_config(pack_path, out, lesion_loss=0.5))["acute"]["steps"] == 3
    assert len(calls) >= 3 and all(0.0 <= c <= 1.0 for c in calls)
    assert json.loads((out / "acute" / "train_synth_config.json").read_text())["lesion_loss"] == 0.5
    calls.clear()
    run(_config(pack_path, tmp_path / "plain"))
    assert calls == []


def test_resume_finds_the_runs_own_variants_and_keeps_the_folder_given(tmp_path: Path) -> None:
    from Training.training.train_synth import _resume_config

    (tmp_path / "copy" / "outcome").mkdir(parents=True)
    cfg.save(SynthTrainConfig(variants=("outcome", "outcome-imaging"), out=tmp_path / "original", lr=3e-4,
                              workers=1, threads=2, val_every=1000),
             tmp_path / "copy" / "outcome" / "train_synth_config.json")
    resumed = _resume_config(SynthTrainConfig(out=tmp_path / "copy", resume=True, time_limit=600.0))
    assert resumed.variants == ("outcome", "outcome-imaging") and resumed.lr == 3e-4
    assert (resumed.workers, resumed.threads, resumed.val_every) == (1, 2, 1000)  # not reset to the defaults
    assert _resume_config(SynthTrainConfig(out=tmp_path / "copy", resume=True, time_limit=600.0,
                                           workers=2)).workers == 2  # given: changed
    assert Path(resumed.out) == tmp_path / "copy" and resumed.time_limit == 600.0 and resumed.resume
    with pytest.raises(cfg.ConfigError, match="Cannot resume"):
        _resume_config(SynthTrainConfig(out=tmp_path / "copy", resume=True, variants=("acute",)))


def test_resume_from_the_command_line_takes_a_typed_default_and_keeps_what_was_not_typed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from Training.training import train_synth

    out = tmp_path / "run"
    (out / "outcome").mkdir(parents=True)
    cfg.save(SynthTrainConfig(variants=("outcome",), out=out, workers=1, threads=2, val_every=1000, lr=3e-4),
             out / "outcome" / "train_synth_config.json")
    seen: list[SynthTrainConfig] = []

    def fake_run(config: SynthTrainConfig, given: frozenset[str] | None = None) -> dict:
        seen.append(train_synth._resume_config(config, given))
        return {}
    monkeypatch.setattr(train_synth, "run", fake_run)
    default_workers = SynthTrainConfig().workers
    assert train_synth.main(["--out", str(out), "--resume", "--time-limit", "900",
                             "--workers", str(default_workers)]) == 0
    assert seen[-1].workers == default_workers  # typed, though equal to the default: a change
    assert (seen[-1].threads, seen[-1].val_every, seen[-1].lr) == (2, 1000, 3e-4)  # not typed: the run's own
    with pytest.raises(cfg.ConfigError, match="--lr cannot change"):
        train_synth.main(["--out", str(out), "--resume", "--lr", str(SynthTrainConfig().lr)])


def test_patience_ends_a_run_that_stops_gaining(pack_path: Path, tmp_path: Path) -> None:
    """--patience N: training ends after N validations without a val Dice gain (a learning rate too small
    to change any prediction gains nothing after the first), and the summary says why."""
    result = run(_config(pack_path, tmp_path / "flat", lr=1e-12, max_steps=20, val_every=2, patience=2))["acute"]
    assert result["stopped"] == "early_stopping" and result["steps"] == 6
    assert run(_config(pack_path, tmp_path / "full", lr=1e-12, max_steps=6, val_every=2))["acute"]["stopped"] \
        == "max_steps"
    with pytest.raises(cfg.ConfigError, match="--patience must be >= 0"):
        run(_config(pack_path, tmp_path / "bad", patience=-1))


def test_focus_fraction_trains_on_focus_pairs(pack_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--focus-fraction 1: every step is a focus pair (two crops of --focus-patch); 0: none is."""
    from Training.synthesis.pool import SynthPool

    shapes: list[tuple] = []
    original = SynthPool.focus_batch

    def spy(self: SynthPool, *args: object, **kwargs: object) -> dict:
        batch = original(self, *args, **kwargs)
        shapes.append(tuple(batch["image"].shape))
        return batch
    monkeypatch.setattr(SynthPool, "focus_batch", spy)
    result = run(_config(pack_path, tmp_path / "focus", focus_fraction=1.0, focus_patch=(32, 32, 16)))["acute"]
    assert result["steps"] == 3 and shapes == [(2, 3, 32, 32, 16)] * 3
    run(_config(pack_path, tmp_path / "plain"))
    assert len(shapes) == 3
    with pytest.raises(cfg.ConfigError, match="--focus-fraction"):
        run(_config(pack_path, tmp_path / "bad", focus_fraction=1.5))
    with pytest.raises(cfg.ConfigError, match="--focus-patch"):
        run(_config(pack_path, tmp_path / "bad2", focus_fraction=0.5, focus_patch=(20, 32, 32)))
