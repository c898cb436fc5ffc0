"""A tiny stroke phantom (DWI, ADC, FLAIR on oblique, anisotropic grids) and a tiny random bundle,
for the inference, bundle and CLI tests. Anatomy is defined in world (LPS) space, so every grid
shows the same head."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from StrokePredictorLib.bundle import save_bundle
from StrokePredictorLib.io import Geometry, write_volume
from StrokePredictorLib.network import NetworkConfig, StrokeNet
from StrokePredictorLib.preprocess import ModelGrid, Normalization

# (centre LPS mm, semi-axes mm, label): 1 brain, 2 ventricle, 3 lesion (later entries win).
_STRUCTURES = (
    ((0.0, 0.0, 0.0), (62.0, 78.0, 52.0), 1),
    ((-10.0, -4.0, 6.0), (7.0, 22.0, 9.0), 2),
    ((12.0, -2.0, 8.0), (5.0, 18.0, 7.0), 2),
    ((-28.0, 30.0, 14.0), (11.0, 10.0, 12.0), 3),
)
DWI = {0: 0.0, 1: 100.0, 2: 50.0, 3: 185.0}
ADC = {0: 0.0, 1: 0.78, 2: 2.8, 3: 0.42}  # 10^-3 mm^2/s
FLAIR = {0: 0.0, 1: 90.0, 2: 20.0, 3: 160.0}


def rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation matrix (z * y * x) for angles in degrees."""
    a, b, c = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def centered(size: tuple[int, int, int], spacing: tuple[float, float, float], direction: np.ndarray,
             centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Geometry:
    """Geometry whose centre voxel lies at ``centre`` (LPS mm)."""
    half = direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    return Geometry(size, spacing, tuple(np.asarray(centre) - half), tuple(direction.ravel()))


def labels(geometry: Geometry) -> np.ndarray:
    """Label of every voxel centre, ``[k, j, i]``."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in geometry.shape), indexing="ij")
    points = geometry.index_to_lps(np.stack([i, j, k], axis=-1))
    result = np.zeros(geometry.shape, dtype=np.uint8)
    for centre, axes, label in _STRUCTURES:
        inside = (((points - np.asarray(centre)) / np.asarray(axes)) ** 2).sum(-1) <= 1.0
        result[inside] = label
    return result


def image(geometry: Geometry, table: dict[int, float], seed: int, noise: float) -> np.ndarray:
    lab = labels(geometry)
    values = np.vectorize(table.get)(lab).astype(np.float32)
    rng = np.random.default_rng(seed)
    values += (lab > 0) * rng.normal(0.0, noise, lab.shape).astype(np.float32)
    return np.clip(values, 0, None).astype(np.float32)


DWI_GEOMETRY = centered((36, 40, 22), (4.0, 4.4, 6.0), rotation((8.0, -6.0, 12.0)), (1.5, -2.0, 3.0))
FLAIR_GEOMETRY = centered((44, 44, 14), (3.6, 3.6, 9.0), rotation((-4.0, 5.0, -7.0)), (0.0, 1.0, -2.0))


def write_case(folder: Path, *, flair: bool = True, seed: int = 0) -> dict[str, Path]:
    """Write dwi.nii.gz, adc.nii.gz (10^-3 mm^2/s) and optionally flair.nii.gz into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"dwi": folder / "dwi.nii.gz", "adc": folder / "adc.nii.gz"}
    write_volume(image(DWI_GEOMETRY, DWI, seed, 4.0), DWI_GEOMETRY, paths["dwi"])
    write_volume(image(DWI_GEOMETRY, ADC, seed + 1, 0.03), DWI_GEOMETRY, paths["adc"])
    if flair:
        paths["flair"] = folder / "flair.nii.gz"
        write_volume(image(FLAIR_GEOMETRY, FLAIR, seed + 2, 3.0), FLAIR_GEOMETRY, paths["flair"])
    return paths


def tiny_config(**overrides: object) -> NetworkConfig:
    """A very small network (size divisor 8) for fast tests."""
    values: dict = dict(
        stem_channels=4, stem_kernel=3, stem_stride=2, stem_pool=False, full_res_channels=4, widths=(4, 8, 8),
        blocks=(1, 1, 1), decoder_widths=(8, 4, 4), decoder_convs=1, head_channels=8, mc_dropout=0.3,
        fusion_dim=16, heads=4, ffn_mult=2,
    )
    values.update(overrides)
    return NetworkConfig(**values)


TINY_GRID = ModelGrid((32, 40, 32), (5.0, 5.0, 5.0))


def write_tiny_bundle(directory: Path, *, seed: int = 0, config: NetworkConfig | None = None) -> Path:
    """A randomly initialised tiny bundle on :data:`TINY_GRID`. The head bias is raised so that
    the random network predicts some lesion voxels (a non-empty mask exercises every output)."""
    import torch

    torch.manual_seed(seed)
    model = StrokeNet(config or tiny_config())
    with torch.no_grad():
        model.head.bias.fill_(0.0)
    return save_bundle(
        directory, model, task="acute", grid=TINY_GRID, normalization=Normalization(),
        data={"description": "random initialisation for tests"}, metrics={}, name="tiny-test",
    )
