"""Small analytic head phantoms for tests: tissue labels defined in world (LPS) space and
sampled onto any grid, so that geometry and registration can be checked against known truth."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from StrokePredictorLib.io import Geometry

# (centre LPS mm, semi-axes mm, label). Later entries overwrite earlier ones. Deliberately
# asymmetric, so that a rotation or a flip changes the picture.
_STRUCTURES = (
    ((0.0, 0.0, 0.0), (70.0, 85.0, 60.0), 1),  # brain (white matter)
    ((0.0, 0.0, 0.0), (62.0, 78.0, 52.0), 2),  # grey matter ring inside is drawn below
    ((0.0, 0.0, 0.0), (54.0, 70.0, 45.0), 1),
    ((-12.0, -5.0, 8.0), (8.0, 25.0, 10.0), 3),  # left ventricle (CSF)
    ((14.0, -2.0, 10.0), (6.0, 20.0, 8.0), 3),  # right ventricle, smaller and shifted
    ((25.0, 30.0, -15.0), (12.0, 9.0, 14.0), 2),  # deep grey nucleus, off-centre
    ((-30.0, 35.0, 20.0), (9.0, 9.0, 9.0), 4),  # lesion
)

# Relative intensities per label (0 background, 1 WM, 2 GM, 3 CSF, 4 lesion, 5 scalp).
DWI_INTENSITY = {0: 0.0, 1: 100.0, 2: 110.0, 3: 45.0, 4: 190.0, 5: 60.0}
ADC_1E3 = {0: 0.0, 1: 0.72, 2: 0.9, 3: 2.8, 4: 0.45, 5: 1.2}
FLAIR_INTENSITY = {0: 0.0, 1: 80.0, 2: 120.0, 3: 15.0, 4: 170.0, 5: 150.0}


def labels_lps(points: np.ndarray, scalp: bool = False) -> np.ndarray:
    """Tissue label at LPS points ``(..., 3)``."""
    labels = np.zeros(points.shape[:-1], dtype=np.uint8)
    if scalp:
        r = (points / np.array([86.0, 101.0, 76.0])) ** 2
        labels[r.sum(-1) <= 1.0] = 5
        r = (points / np.array([79.0, 94.0, 69.0])) ** 2
        labels[r.sum(-1) <= 1.0] = 0  # skull: dark gap between scalp and brain
    for centre, axes, label in _STRUCTURES:
        r = ((points - np.array(centre)) / np.array(axes)) ** 2
        labels[r.sum(-1) <= 1.0] = label
    return labels


def grid_points(geometry: Geometry) -> np.ndarray:
    """LPS coordinates of every voxel centre, shape (K, J, I, 3)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in geometry.shape), indexing="ij")
    return geometry.index_to_lps(np.stack([i, j, k], axis=-1))


def sample(geometry: Geometry, table: dict[int, float], *, scalp: bool = False, transform=None,
           smooth_mm: float = 0.0, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
    """Phantom image on ``geometry``: ``table[label]`` at each voxel centre.

    ``transform`` (a SimpleITK Euler3D/affine-like transform) maps grid points to anatomy
    points: an image made with ``transform = T`` shows at point ``q`` the anatomy at ``T(q)``.
    """
    points = grid_points(geometry)
    if transform is not None:
        matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
        center = np.asarray(transform.GetCenter())
        offset = center + np.asarray(transform.GetTranslation())
        points = (points - center) @ matrix.T + offset
    labels = labels_lps(points, scalp)
    image = np.vectorize(table.get, otypes=[np.float32])(labels)
    if smooth_mm:
        sitk_image = geometry.apply_to(sitk.GetImageFromArray(image))
        image = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk_image, smooth_mm))
    if noise and rng is not None:
        image = image + rng.normal(0, noise, image.shape).astype(np.float32)
    return image.astype(np.float32)


def rotation_direction(angles_deg: tuple[float, float, float], left_handed: bool = False) -> np.ndarray:
    """A direction matrix rotated by Euler angles (degrees), optionally with k flipped."""
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*np.radians(angles_deg))
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    if left_handed:
        matrix[:, 2] *= -1
    return matrix


def centered_geometry(size: tuple[int, int, int], spacing: tuple[float, float, float],
                      direction: np.ndarray | None = None, shift: tuple[float, float, float] = (0, 0, 0)) -> Geometry:
    """A grid of ``size`` voxels centred on the LPS point ``shift``."""
    direction = np.eye(3) if direction is None else np.asarray(direction)
    half = direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    origin = np.asarray(shift) - half
    return Geometry(size, spacing, tuple(origin), tuple(direction.ravel()))
