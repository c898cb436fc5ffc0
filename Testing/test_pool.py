"""Training.synthesis.pool: pre-rendered volumes, lesion-centred patches with their grid windows, refresh."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gpu_synth import _fake_soop

from Training.synthesis.gpu_synth import build_pack
from Training.synthesis.pool import SynthPool, _components, augment_patch

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
