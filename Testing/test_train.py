"""Training/training/train.py and Training/data/dataset.py: loss goes down, exact resume, DDP equals one process."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from training_fixtures import TINY_NETWORK, TINY_NETWORK_NO_DROPOUT, build_test_cache, write_isles_phantom

from StrokePredictorLib.errors import OutputExistsError
from Training import config as configlib
from Training.data.dataset import (
    AugmentConfig,
    CacheDataset,
    StreamSampler,
    apply_augmentation,
    identity_augmentation,
    sample_augmentation,
)
from Training.training import loop as looplib
from Training.training import sources
from Training.training import train as trainlib
from Training.training.train import TrainConfig, run


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    data = write_isles_phantom(root / "data", n_cases=6, seed=2)
    return build_test_cache(data, root / "cache")


def _config(cache: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(cache=cache, out=out, network=TINY_NETWORK, device="cpu", workers=0, progress=False,
                tensorboard=False, lr=3e-3, warmup_steps=2, batch_size=2)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _log(run_dir: Path) -> list[dict]:
    with (run_dir / "log.csv").open() as handle:
        return list(csv.DictReader(handle))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return looplib.load_checkpoint(path)["model"]


# ---- data pieces ------------------------------------------------------------------------------
def test_stream_sampler_global_batch_is_independent_of_processes() -> None:
    one = StreamSampler(5, 4, seed=3)
    one.set_range(0, 6)
    ranks = [StreamSampler(5, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for sampler in ranks:
        sampler.set_range(0, 6)
    single = list(one)
    shards = [list(s) for s in ranks]
    for step in range(6):
        merged = shards[0][2 * step:2 * step + 2] + shards[1][2 * step:2 * step + 2]
        assert merged == single[4 * step:4 * step + 4]
    # every pass over the 5 cases is a permutation; resuming at step 3 gives the same tail
    cases = [c for c, _ in single]
    assert sorted(cases[:5]) == [0, 1, 2, 3, 4] and sorted(cases[5:10]) == [0, 1, 2, 3, 4]
    one.set_range(3, 6)
    assert list(one) == single[12:]


def test_identity_augmentation_is_exact_and_flip_mirrors() -> None:
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 3, 8, 10, 12), dtype=np.float32))
    brain = torch.ones(1, 1, 8, 10, 12, dtype=torch.bool)
    target = torch.zeros(1, 1, 8, 10, 12)
    target[..., 2:5, 3:6, 1:4] = 1
    batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in identity_augmentation((8, 10, 12)).items()}
    out_image, out_target = apply_augmentation(image, target, brain, batch)
    assert torch.equal(out_image, image) and torch.equal(out_target, target)
    flip_only = AugmentConfig(spatial_p=0, flip_p=1, intensity_p=0)
    params = sample_augmentation(np.random.default_rng(1), flip_only, (8, 10, 12), (2.0, 2.0, 2.0))
    batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in params.items()}
    out_image, out_target = apply_augmentation(image, target, brain, batch)
    assert torch.allclose(out_image, image.flip(-1), atol=1e-5)
    assert torch.equal(out_target, target.flip(-1))


def test_augmentation_is_replayable_and_keeps_targets_binary(cache: Path) -> None:
    dataset = CacheDataset(cache, json.loads((cache / "split.json").read_text())["train"], "acute",
                           augment=AugmentConfig(elastic_p=1.0, clinical_drop_p=0.5, flair_drop_p=1.0), seed=4)
    a, b = dataset[(0, 17)], dataset[(0, 17)]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(dataset[(0, 18)]["aug_theta"], a["aug_theta"])
    assert not a["flair_present"] and float(np.abs(a["image"][2]).max()) == 0.0
    assert np.all(a["clinical_values"][a["clinical_missing"]] == 0.0)
    batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in a.items()}
    image, target = apply_augmentation(batch["image"], batch["target"], batch["brain"], batch)
    assert set(torch.unique(target).tolist()) <= {0.0, 1.0}
    assert 0.5 * batch["target"].sum() < target.sum() < 2.0 * batch["target"].sum()
    assert float(image.min()) >= 0.0 and not torch.equal(image, batch["image"])


def test_clinical_dropout_rate(cache: Path) -> None:
    ids = json.loads((cache / "split.json").read_text())["train"]
    dataset = CacheDataset(cache, ids, "acute", augment=AugmentConfig(clinical_drop_p=0.25), seed=0)
    base = dataset.load(0)["clinical_missing"]
    present = ~base
    dropped = np.mean([dataset[(0, p)]["clinical_missing"][present].mean() for p in range(400)])
    assert dropped == pytest.approx(0.25, abs=0.04)


def test_lr_schedule_warmup_and_cosine() -> None:
    assert looplib.lr_factor(0, 10, 110, 0.0) == pytest.approx(0.1)
    assert looplib.lr_factor(9, 10, 110, 0.0) == pytest.approx(1.0)
    assert looplib.lr_factor(60, 10, 110, 0.0) == pytest.approx(0.5)
    assert looplib.lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_dice_score() -> None:
    a = np.zeros(10, bool)
    assert sources.dice_score(a, a) == 1.0
    b = a.copy()
    b[:4] = True
    c = a.copy()
    c[2:6] = True
    assert sources.dice_score(b, c) == pytest.approx(0.5)


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_run_lowers_the_loss_and_writes_its_files(cache: Path, tmp_path: Path) -> None:
    config = _config(cache, tmp_path / "run", epochs=6, steps_per_epoch=4, augment=False, tensorboard=True)
    result = run(config)
    rows = _log(result.run_dir)
    assert len(rows) == 6 and int(rows[-1]["step"]) == 24
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert last < first - 0.05, (first, last)
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    assert result.best_checkpoint.is_file() and result.stopped == "epochs"
    best = looplib.load_checkpoint(result.best_checkpoint)
    assert best["val_dice"] == pytest.approx(result.best_val_dice)
    assert best["val_dice"] == max(float(r["val_dice"]) for r in rows)
    saved = json.loads((result.run_dir / "train_config.json").read_text())
    assert saved["steps_per_epoch"] == 4 and saved["network"] == TINY_NETWORK
    assert any((result.run_dir / "tensorboard").iterdir())
    with pytest.raises(OutputExistsError, match="--resume"):
        run(config)


def test_the_lesion_loss_adds_its_term_to_the_same_first_step(cache: Path, tmp_path: Path) -> None:
    """Same seed, data and weights: the first step's loss with ``lesion_loss`` is the plain loss plus
    0.5 x the per-lesion Dice term (positive for an untrained network)."""
    losses = {}
    for weight in (0.0, 0.5):
        result = run(_config(cache, tmp_path / f"run{weight}", epochs=1, steps_per_epoch=1, augment=False,
                             lesion_loss=weight))
        losses[weight] = float(_log(result.run_dir)[0]["train_loss"])
    assert losses[0.5] > losses[0.0] + 0.05
    with pytest.raises(ValueError, match="lesion_loss"):
        _config(cache, tmp_path / "bad", lesion_loss=-1.0)


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(cache: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(cache, tmp_path / "full", epochs=4, steps_per_epoch=2, deterministic=True)
    full = run(config)

    calls = {"n": 0}
    real_save = looplib.save_checkpoint

    def save_then_die(state: dict, path: Path) -> Path:  # the process is killed after epoch 2's checkpoint
        real_save(state, path)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return path

    interrupted = replace(config, out=tmp_path / "resumed", workers=1)
    monkeypatch.setattr(looplib, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    monkeypatch.setattr(looplib, "save_checkpoint", real_save)
    assert looplib.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 4
    resumed = run(replace(interrupted, resume=True))
    assert resumed.steps == full.steps == 8
    a = _weights(full.run_dir / "checkpoints" / "last.pt")
    b = _weights(resumed.run_dir / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    # and a resumed run refuses a changed task
    with pytest.raises(configlib.ConfigError, match="task"):
        run(replace(interrupted, resume=True, task="outcome"))


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process(cache: Path, tmp_path: Path) -> None:
    from Training.training.distributed import spawn_local

    # Adam's first steps are sign-like (g / |g|) for tiny gradients, which turns float rounding of
    # the gradient all-reduce into visible differences; a large epsilon makes the update linear
    # in the gradient, so the comparison tests the gradients themselves.
    config = _config(cache, tmp_path / "ddp", network=TINY_NETWORK_NO_DROPOUT, epochs=1, steps_per_epoch=3,
                     batch_size=2, deterministic=True, adam_eps=1.0, lr=0.5)
    dice = spawn_local(config, world_size=2)
    assert dice[0] == dice[1]
    single = run(replace(config, out=tmp_path / "single"))
    assert single.best_val_dice == pytest.approx(dice[0], abs=1e-6)
    ddp = looplib.load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert ddp["world_size"] == 2 and ddp["step"] == 3 and len(ddp["rng"]) == 2
    one = _weights(tmp_path / "single" / "checkpoints" / "last.pt")
    initial = _initial_weights(config)
    changed = False
    for key, value in one.items():
        assert torch.allclose(ddp["model"][key], value, atol=1e-6, rtol=0), key
        changed |= not torch.equal(value, initial[key])
    assert changed, "training did not change the weights"


def _initial_weights(config: TrainConfig) -> dict[str, torch.Tensor]:
    from StrokePredictorLib.network import StrokeNet

    torch.manual_seed(config.seed)
    return StrokeNet(trainlib.network_config(config)).state_dict()


def test_time_limit_and_max_steps(cache: Path, tmp_path: Path) -> None:
    result = run(_config(cache, tmp_path / "steps", epochs=10, steps_per_epoch=3, max_steps=4))
    assert result.steps == 4 and result.stopped == "max_steps"
    assert [int(r["step"]) for r in _log(result.run_dir)] == [3, 4]


def test_cli_flags_override_config_file(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("epochs: 7\ntask: outcome\nlr: 0.01\n")
    config = configlib.parse(TrainConfig, ["--config", str(path), "--lr", "0.002", "--imaging-only"], "t")
    assert (config.epochs, config.task, config.lr, config.imaging_only) == (7, "outcome", 0.002, True)
    with pytest.raises(configlib.ConfigError, match="task"):
        configlib.parse(TrainConfig, ["--task", "chronic"], "t")


# ---- resume, elapsed time, time-based checkpoints, progress, warm-up -----------------
def _cli(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--cache", str(cache), "--out", str(run_dir), "--network", TINY_NETWORK, "--device", "cpu",
            "--workers", "0", "--no-progress", "--no-tensorboard", "--lr", "0.003", *extra]


def test_resume_reads_the_runs_own_config_and_only_extends_the_budget(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    trainlib.main(_cli(cache, run_dir, "--epochs", "1", "--steps-per-epoch", "2"))
    monkeypatch.chdir(tmp_path)  # no folder named "cache" here: the default must not be used on resume
    with caplog.at_level(logging.INFO, logger="Training.training.train"):
        trainlib.main(["--out", str(run_dir), "--resume", "--epochs", "2"])
    assert "resume: --epochs 1 -> 2 (budget extended)" in caplog.text
    assert [int(r["step"]) for r in _log(run_dir)] == [2, 4]
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert saved["epochs"] == 2 and saved["cache"] == str(cache) and saved["lr"] == 0.003
    with pytest.raises(configlib.ConfigError, match=r"--lr 0\.5 \(saved: 0\.003\) cannot change"):
        trainlib.main(["--out", str(run_dir), "--resume", "--lr", "0.5"])
    # the default learning rate typed again is still not this run's
    with pytest.raises(configlib.ConfigError, match=r"--lr 0\.001 \(saved: 0\.003\)"):
        trainlib.main(["--out", str(run_dir), "--resume", "--lr", "0.001"])
    with pytest.raises(configlib.ConfigError, match=r"not shorten it: --epochs 1 \(saved: 2\)"):
        trainlib.main(["--out", str(run_dir), "--resume", "--epochs", "1"])
    with pytest.raises(configlib.ConfigError, match="--task outcome"):
        trainlib.main(["--out", str(run_dir), "--resume", "--task", "outcome"])
    # the same values typed again, and a changed operational flag, are fine; nothing is left to train
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="Training.training.train"):
        trainlib.main(_cli(cache, run_dir, "--epochs", "2", "--steps-per-epoch", "2", "--resume",
                           "--checkpoint-minutes", "5"))
    assert "Nothing to train" in caplog.text and len(_log(run_dir)) == 2
    with pytest.raises(trainlib.CacheError, match="Cannot resume"):
        trainlib.main(["--out", str(tmp_path / "none"), "--resume"])


@pytest.mark.slow
def test_time_checkpoints_within_an_epoch_resume_exactly_and_time_adds_up(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(cache, tmp_path / "full", epochs=1, steps_per_epoch=6, deterministic=True)
    full = run(config)
    saved_steps: list[int] = []
    real_save = looplib.save_checkpoint

    def save_then_die(state: dict, path: Path) -> Path:  # Ctrl-C right after the step-3 checkpoint
        real_save(state, path)
        saved_steps.append(state["step"])
        if state["step"] == 3:
            raise KeyboardInterrupt
        return path

    interrupted = replace(config, out=tmp_path / "resumed", checkpoint_minutes=1e-9)
    monkeypatch.setattr(looplib, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted)
    monkeypatch.setattr(looplib, "save_checkpoint", real_save)
    assert saved_steps == [1, 2, 3]  # written within the epoch, not only at its end
    last = tmp_path / "resumed" / "checkpoints" / "last.pt"
    state = looplib.load_checkpoint(last)
    assert state["step"] == 3 and state["epoch"] == 0 and state["elapsed_s"] > 0
    assert not list(last.parent.glob("*.tmp*")) and not list(last.parent.glob(".*"))  # atomic
    state["elapsed_s"] = 5000.0  # as if the first session had trained for 5000 s
    torch.save(state, last)
    resumed = run(replace(interrupted, resume=True))
    assert resumed.steps == full.steps == 6
    a, b = _weights(full.run_dir / "checkpoints" / "last.pt"), _weights(last)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    rows, full_rows = _log(resumed.run_dir), _log(full.run_dir)
    assert len(rows) == 1 and float(rows[0]["elapsed_s"]) > 5000.0  # cumulative across the resume
    assert float(rows[0]["train_loss"]) == pytest.approx(float(full_rows[0]["train_loss"]), abs=1e-6)
    assert json.loads((resumed.run_dir / "result.json").read_text())["seconds"] > 5000.0


def test_progress_lines_without_a_progress_bar(cache: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    assert TrainConfig().progress_seconds <= 30.0
    with caplog.at_level(logging.INFO, logger="Training.training.train"):
        run(_config(cache, tmp_path / "p", epochs=1, steps_per_epoch=3, progress=False, progress_seconds=0.0))
    lines = [r.getMessage() for r in caplog.records if " s/step" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["epoch 1 step 1/3", "epoch 1 step 2/3", "epoch 1 step 3/3"]
    assert all("min left" in line and "elapsed" in line for line in lines)
    # and the validation at the end of the epoch says how far it has got
    assert any(r.getMessage().startswith("validation: 0 of ") for r in caplog.records)


def test_warmup_is_a_fraction_of_the_run(cache: Path, tmp_path: Path) -> None:
    assert looplib.warmup_length(20, TrainConfig().warmup, TrainConfig().warmup_steps) == 1
    assert looplib.warmup_length(2000, TrainConfig().warmup, TrainConfig().warmup_steps) == 100
    assert looplib.warmup_length(20, TrainConfig().warmup, 50) == 4  # a fixed count is capped
    assert looplib.warmup_length(2000, TrainConfig().warmup, 50) == 50
    default_warmup = TrainConfig().warmup_steps
    result = run(_config(cache, tmp_path / "w", warmup_steps=default_warmup, epochs=2, steps_per_epoch=5, lr=1e-3))
    rows = _log(result.run_dir)
    assert float(rows[0]["lr"]) > 0.5e-3  # after half of a 10-step run, warm-up is long over


def test_a_non_finite_gradient_is_skipped_not_applied() -> None:
    from monai.losses import DiceCELoss

    from StrokePredictorLib.network import StrokeNet

    torch.manual_seed(0)
    model = StrokeNet(trainlib.network_config(TrainConfig(network=TINY_NETWORK)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    image = torch.rand(1, 3, 16, 16, 16)
    batch = {"image": image, "target": (torch.rand(1, 1, 16, 16, 16) > 0.9).float(),
             "clinical_values": torch.zeros(1, 10), "clinical_missing": torch.ones(1, 10, dtype=torch.bool),
             "flair_present": torch.ones(1, dtype=torch.bool)}
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}
    stats: dict = {}
    bad = {**batch, "image": image.clone().index_fill_(2, torch.tensor([3]), float("nan"))}
    trainlib.training_step(model, bad, optimizer, scaler, DiceCELoss(sigmoid=True), device=torch.device("cpu"),
                           autocast=autocast, stats=stats)
    assert stats == {"skipped": 1}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainlib.training_step(model, batch, optimizer, scaler, DiceCELoss(sigmoid=True), device=torch.device("cpu"),
                           autocast=autocast, stats=stats)
    assert stats == {"skipped": 1}
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert any(not torch.equal(before[k], p) for k, p in params.items())
