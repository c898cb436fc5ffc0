"""Training.synthesis.pool: pre-rendered volumes, lesion-centred patches with their grid windows, refresh."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gpu_synth import _fake_soop

from Training.synthesis.gpu_synth import build_pack
from Training.synthesis.pool import SynthPool, _components, augment_patch, bright_normal_adc

GRID = (48, 64, 48)  # i, j, k
PATCH = (32, 32, 32)  # k, j, i


@pytest.fixture(scope="module")
def pack_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("soop")
    return build_pack(_fake_soop(root / "soop"), root / "pack.npz", workers=1)


def test_components_are_26_connected() -> None:
    mask = np.zeros((6, 6, 6), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # diagonal neighbours: one component
    mask[4, 4, 4] = True
    sizes = sorted(len(c) for c in _components(mask))
    assert sizes == [1, 2]
    assert _components(np.zeros((3, 3, 3), bool)) == []


def test_augment_patch_keeps_adc_quantitative_and_background_zero() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((3, 8, 8, 8), np.float32)
    image[:, 2:6, 2:6, 2:6] = [[[[1.0]]], [[[0.8]]], [[[1.2]]]]
    out = augment_patch(image, rng)
    inside = image[1] > 0
    assert np.all(out[:, ~inside] == 0)  # no noise outside the brain
    ratio = out[1][inside].mean() / 0.8
    assert 0.9 < ratio < 1.1  # ADC only scaled by scanner variability (plus noise)
    assert not np.array_equal(out, image)


def test_hard_negatives_are_bright_on_dwi_with_a_normal_adc_away_from_lesions() -> None:
    image = np.zeros((3, 12, 12, 12), np.float32)
    image[0], image[1] = 1.0, 0.8  # normal tissue
    brain = np.ones((12, 12, 12), bool)
    lesion = np.zeros_like(brain)
    image[0, 2, 2, 2], image[1, 2, 2, 2] = 2.0, 0.85  # a mimic: bright, normal ADC
    image[0, 2, 9, 9], image[1, 2, 9, 9] = 2.0, 0.55  # restricted diffusion: a lesion, not a mimic
    image[0, 9, 9, 9], image[1, 9, 9, 9] = 2.0, 0.9  # a mimic, but next to a lesion
    lesion[9, 9, 7] = True
    assert bright_normal_adc(image, brain, lesion).tolist() == [[2, 2, 2]]
    assert bright_normal_adc(image, np.zeros_like(brain), lesion).shape == (0, 3)


def test_mimic_fraction_centres_the_other_patches_on_hard_negatives() -> None:
    from Training.synthesis.pool import PoolVolume

    pool = SynthPool.__new__(SynthPool)  # no rendering: one hand-made volume
    pool.grid_kji, pool.divisor, pool.rng = (64, 64, 64), 16, np.random.default_rng(0)
    image = np.zeros((3, 64, 64, 64), np.float16)
    empty = np.zeros((64, 64, 64), bool)
    spot = np.array([[40, 20, 50]])
    pool.volumes = [PoolVolume(image, empty, empty, ~empty, np.zeros(10, np.float32), np.ones(10, bool), True,
                               {"acute": [], "outcome": []}, spot)]
    windows = pool.batch(24, (32, 32, 32), mimic_fraction=1.0, augment=False)["window"][:, 0].numpy()
    inside = [(w <= spot[0]) & (spot[0] < w + 32) for w in windows]
    assert all(bool(i.all()) for i in inside)  # every patch holds the hard negative
    pool.rng = np.random.default_rng(0)
    uniform = pool.batch(24, (32, 32, 32), augment=False)["window"][:, 0].numpy()
    assert len({tuple(w) for w in uniform}) > 1


def test_focus_pair_centres_a_small_lesion_and_a_hard_negative() -> None:
    from Training.synthesis.pool import PoolVolume, _components

    pool = SynthPool.__new__(SynthPool)  # no rendering: hand-made volumes
    pool.grid_kji, pool.divisor, pool.rng = (64, 64, 64), 16, np.random.default_rng(1)
    image = np.zeros((3, 64, 64, 64), np.float16)
    empty = np.zeros((64, 64, 64), bool)
    lesions = empty.copy()
    lesions[5:25, 5:25, 5:25] = True  # 8,000 voxels: large
    lesions[50:52, 50:52, 10:12] = True  # 8 voxels: small
    spot = np.array([[40, 20, 50]])

    def volume(mask: np.ndarray, negatives: np.ndarray) -> PoolVolume:
        return PoolVolume(image, mask, mask, ~empty, np.zeros(10, np.float32), np.ones(10, bool), True,
                          {"acute": _components(mask), "outcome": _components(mask)}, negatives)

    pool.volumes = [volume(lesions, spot), volume(empty, np.zeros((0, 3), np.int64))]
    for _ in range(12):
        batch = pool.focus_batch((32, 32, 32), max_voxels=125, augment=False)
        assert batch["image"].shape == (2, 3, 32, 32, 32)
        first, second = batch["window"][:, 0].numpy()
        assert ((first <= [50, 50, 10]) & ([51, 51, 11] < first + 32)).all()  # the small lesion, whole
        assert batch["target"][0].sum() == 8 or (first <= 24).all()  # beside it at most the large one's corner
    # with only large lesions in the pool, the pair falls back to any lesion
    pool.volumes = [volume(lesions & ~(np.indices(empty.shape)[0] > 40), spot)]
    batch = pool.focus_batch((32, 32, 32), max_voxels=125, augment=False)
    assert batch["target"][0].sum() > 0
    second = batch["window"][1, 0].numpy()
    assert ((second <= spot[0]) & (spot[0] < second + 32)).all()  # the other crop holds the hard negative


@pytest.mark.slow
def test_patches_cut_where_their_window_says(pack_path: Path) -> None:
    pool = SynthPool(pack_path, GRID, size=1, seed=3, background=False, divisor=16)
    volume = pool.volumes[0]
    assert volume.image.shape == (3, 48, 64, 48) and volume.image.dtype == np.float16
    batch = pool.batch(12, PATCH, lesion_fraction=0.5, augment=False)
    assert batch["image"].shape == (12, 3, *PATCH) and batch["target"].shape == (12, 1, *PATCH)
    for n in range(12):
        start, full = batch["window"][n].tolist()
        assert full == [48, 64, 48] and all(s % 16 == 0 for s in start)
        region = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
        expected = volume.image[(slice(None), *region)].astype(np.float32)
        np.testing.assert_array_equal(batch["image"][n].numpy(), expected)
        np.testing.assert_array_equal(batch["target"][n, 0].numpy() > 0.5, volume.acute[region])
        # both tasks' targets of the same patch, so that acute and outcome variants share a batch
        np.testing.assert_array_equal(batch["outcome"][n, 0].numpy() > 0.5, volume.outcome[region])
    assert torch.equal(batch["acute"], batch["target"])


@pytest.mark.slow
def test_mirrored_patches_are_cuts_of_the_mirrored_grid_and_lesions_are_centred(pack_path: Path) -> None:
    pool = SynthPool(pack_path, GRID, size=2, seed=5, background=False, divisor=16)
    pool.volumes = [v for v in pool.volumes if v.components["acute"]][:1]
    assert pool.volumes, "the fake library always yields a lesion in two draws"
    volume = pool.volumes[0]
    mirrored = volume.acute[..., ::-1]
    batch = pool.batch(16, PATCH, lesion_fraction=1.0, augment=True)
    flips = 0
    for n in range(16):
        start, _ = batch["window"][n].tolist()
        region = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
        target = batch["target"][n, 0].numpy() > 0.5
        outcome = batch["outcome"][n, 0].numpy() > 0.5
        if np.array_equal(target, volume.acute[region]) and not np.array_equal(target, mirrored[region]):
            np.testing.assert_array_equal(outcome, volume.outcome[region])
            continue
        np.testing.assert_array_equal(target, mirrored[region])
        np.testing.assert_array_equal(outcome, volume.outcome[..., ::-1][region])  # mirrored with the image
        flips += 1
        assert target.any()  # every patch is centred on a lesion component
    assert 0 < flips < 16


@pytest.mark.slow
def test_background_refresh_swaps_in_new_volumes(pack_path: Path) -> None:
    pool = SynthPool(pack_path, GRID, size=2, seed=1, background=True, divisor=16)
    try:
        before = [v.image.copy() for v in pool.volumes]
        deadline = time.monotonic() + 120
        while pool.refreshed == 0 and time.monotonic() < deadline:
            pool.refresh(1)
            time.sleep(0.5)
        assert pool.refreshed >= 1
        assert not np.array_equal(pool.volumes[0].image, before[0])
        assert torch.is_tensor(pool.batch(1, PATCH)["image"])
    finally:
        pool.close()
    assert pool._process is None


def test_pool_renders_with_the_given_synthesis_ranges(pack_path: Path) -> None:
    """``synth`` reaches the pool's renderer and its background process (train-synth --grid-noise)."""
    import queue
    import threading

    from Training.synthesis.gpu_synth import SynthConfig
    from Training.synthesis.pool import Renderer, _render_forever

    config = SynthConfig(grid_noise=(0.05, 0.11))
    pool = SynthPool(pack_path, GRID, size=1, seed=1, background=False, divisor=16, synth=config)
    assert pool.renderer.synth.config == config  # which the background process is given too
    default = SynthPool(pack_path, GRID, size=1, seed=1, background=False, divisor=16)
    assert default.renderer.synth.config == SynthConfig()
    assert not np.array_equal(default.volumes[0].image, pool.volumes[0].image)
    # the background renderer (run here in a thread) renders with the ranges it is given
    out: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    threads = torch.get_num_threads()  # the renderer sets one thread for the whole process
    worker = threading.Thread(target=_render_forever, args=(str(pack_path), GRID, 5, out, stop, 0.0, 0, config))
    worker.start()
    try:
        volume = out.get(timeout=120)
        stop.set()
        worker.join(timeout=60)
        torch.set_num_threads(1)  # as the renderer (its thread's setting need not reach this one)
        expected = Renderer(pack_path, GRID, seed=5, synth=config).render(1)[0]
    finally:
        stop.set()
        torch.set_num_threads(threads)
    assert np.array_equal(volume.image, expected.image)


def test_noise_verb_measures_pool_and_caches_alike(pack_path: Path, tmp_path: Path) -> None:
    """``python -m Training noise``: the fine-scale fluctuation of rendered pool volumes (on the caches' grid) and of
    cached cases, the pool's rising with --grid-noise; refusals name the option."""
    import json

    from training_fixtures import build_test_cache, write_isles_phantom

    from StrokePredictorLib.errors import OutputExistsError, StrokePredictorError
    from Training import config as cfg
    from Training.evaluation.input_noise import NoiseConfig, run

    cache = build_test_cache(write_isles_phantom(tmp_path / "data", n_cases=2), tmp_path / "cache")
    out = tmp_path / "noise.json"
    quiet = run(NoiseConfig(pack=pack_path, volumes=2, cache=(cache,), out=out))
    noisy = run(NoiseConfig(pack=pack_path, volumes=2, grid_noise=(0.11, 0.11)))
    assert set(quiet) == {"cache cache", "pool (--grid-noise 0.0,0.0)"} and quiet["cache cache"]["n"] == 2
    assert all(np.isfinite(v).all() for v in np.asarray(quiet["cache cache"]["values"]))
    assert noisy["pool (--grid-noise 0.11,0.11)"]["dwi_q10_50_90"][1] > quiet["pool (--grid-noise 0.0,0.0)"][
        "dwi_q10_50_90"][1]
    assert json.loads(out.read_text())["sources"]["cache cache"]["n"] == 2
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run(NoiseConfig(cache=(cache,), out=out))
    with pytest.raises(StrokePredictorError, match="--pack"):
        run(NoiseConfig())
    with pytest.raises(cfg.ConfigError, match="--grid-noise"):
        run(NoiseConfig(cache=(cache,), grid_noise=(0.2, 0.1)))
    with pytest.raises(StrokePredictorError, match="index.json"):
        run(NoiseConfig(cache=(tmp_path,)))
