"""Helpers for the training tests: a tiny ISLES-layout dataset, a tiny network, a tiny cache.

``write_isles_phantom`` writes the ISLES 2022 Zenodo layout (DWI, ADC, optional FLAIR,
derivatives with ``_msk`` and ``_outcome`` masks, ``clinical.csv``, ``dataset.json``) with one
bright-DWI / low-ADC spherical lesion per case at a random place, on a small grid, in well under
a second per case. It does not depend on the data engineer's generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from phantoms import centered_geometry, grid_points

from StrokePredictorLib.io import write_volume

SOURCE_SIZE = (40, 48, 32)  # i, j, k voxels
SOURCE_SPACING = (4.0, 4.0, 4.5)  # mm
TEST_GRID_SIZE = (24, 28, 20)  # model grid for the tests (divisible by the tiny network's divisor 4)
TEST_GRID_SPACING = (7.0, 7.0, 7.0)

# A tiny StrokeNet (size divisor 4, a few thousand parameters): tests take seconds.
TINY_NETWORK = json.dumps({
    "stem_channels": 4, "widths": [4, 8], "blocks": [1, 1], "decoder_widths": [8, 4], "full_res_channels": 4,
    "head_channels": 4, "fusion_dim": 16, "heads": 2, "ffn_mult": 1,
})
# The same without any randomness inside the network (for exact multi-process comparisons).
TINY_NETWORK_NO_DROPOUT = json.dumps({**json.loads(TINY_NETWORK), "mc_dropout": 0.0, "feature_dropout": 0.0})


def write_isles_phantom(root: Path, n_cases: int = 5, seed: int = 0, *, flair_every: int = 2,
                        outcome: bool = True, clinical_csv: bool = True) -> Path:
    """Write ``n_cases`` phantom cases in the ISLES 2022 Zenodo layout under ``root``."""
    rng = np.random.default_rng(seed)
    geometry = centered_geometry(SOURCE_SIZE, SOURCE_SPACING)
    points = grid_points(geometry)
    brain = ((points / np.array([68.0, 80.0, 58.0])) ** 2).sum(-1) <= 1.0
    rows = ["case_id,age,sex,nihss,onset_to_imaging_h"]
    for index in range(1, n_cases + 1):
        case = f"sub-strokecase{index:04d}"
        centre = rng.uniform(-1, 1, 3) * np.array([35.0, 40.0, 25.0])
        radius = rng.uniform(10.0, 18.0)
        lesion = (np.linalg.norm(points - centre, axis=-1) <= radius) & brain
        grown = (np.linalg.norm(points - centre, axis=-1) <= radius * 1.3) & brain
        noise = rng.normal(0, 4.0, lesion.shape)
        dwi = np.where(brain, 100.0 + noise + 80.0 * lesion, 0.0).astype(np.float32)
        adc = np.where(brain, 0.8e-3 * (1 - 0.45 * lesion) + rng.normal(0, 0.03e-3, lesion.shape), 0.0)
        base = root / case / "ses-0001"
        write_volume(dwi, geometry, base / "dwi" / f"{case}_ses-0001_dwi.nii.gz")
        write_volume(np.clip(adc, 0, None).astype(np.float32), geometry, base / "dwi" / f"{case}_ses-0001_adc.nii.gz")
        if flair_every and index % flair_every == 0:
            flair = np.where(brain, 80.0 + noise + 40.0 * lesion, 0.0).astype(np.float32)
            write_volume(flair, geometry, base / "anat" / f"{case}_ses-0001_FLAIR.nii.gz")
        derivatives = root / "derivatives" / case / "ses-0001"
        write_volume(lesion.astype(np.uint8), geometry, derivatives / f"{case}_ses-0001_msk.nii.gz")
        if outcome:
            write_volume(grown.astype(np.uint8), geometry, derivatives / f"{case}_ses-0001_outcome.nii.gz")
        rows.append(f"{case},{60 + index},{'MF'[index % 2]},{int(lesion.sum()) % 20},")
    if clinical_csv:
        (root / "clinical.csv").write_text("\n".join(rows) + "\n")
    (root / "dataset.json").write_text(json.dumps({"name": "test phantom", "cases": n_cases, "seed": seed}))
    return root


def build_test_cache(data: Path, out: Path, **overrides: object) -> Path:
    """Preprocess ``data`` into ``out`` on the small test grid; returns ``out``."""
    from Training.data.cache import CacheConfig, build_cache

    config = CacheConfig(data=data, out=out, grid_size=TEST_GRID_SIZE, grid_spacing=TEST_GRID_SPACING,
                         progress=False, **overrides)  # type: ignore[arg-type]
    build_cache(config)
    return out
