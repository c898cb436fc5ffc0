"""Acquisition geometry and MR signal formation on the scanner grids.

* :data:`DWI_GRIDS` / :data:`FLAIR_GRIDS`: grids drawn from the variety of ISLES 2022 (size in
  (i, j, k), spacing in mm); ISLES stores NIfTI with a left-handed RAS affine diag(-s, s, s),
  i.e. LPS direction diag(1, -1, 1), which the grids here keep (plus a small obliquity).
* :func:`rigid` builds a rigid transform (rotation in degrees about a centre, translation in mm),
  4x4 in LPS; :func:`resample_affine` resamples a template-space array onto a grid through a
  4x4 matrix mapping *target* points to *source* points (SimpleITK, linear).
* :func:`rician`, :func:`bias_field`: the noise and the smooth receive-coil gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from StrokePredictorLib._lazy import sitk
from StrokePredictorLib.io import Geometry


@dataclass(frozen=True)
class GridSpec:
    """A scanner grid: voxels along (i, j, k), spacing (mm) and a draw weight."""

    name: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    weight: float = 1.0


DWI_GRIDS: tuple[GridSpec, ...] = (
    GridSpec("2mm-iso", (112, 112, 73), (2.0, 2.0, 2.0), 0.55),
    GridSpec("1.8x1.8x4.8", (128, 128, 32), (1.8, 1.8, 4.8), 0.25),
    GridSpec("1.15x1.15x4.8", (192, 192, 32), (1.15, 1.15, 4.8), 0.20),
)
FLAIR_GRIDS: tuple[GridSpec, ...] = (
    GridSpec("2D-0.45x0.45x5", (512, 512, 29), (0.45, 0.45, 5.0), 0.2),
    GridSpec("2D-0.9x0.9x5", (256, 256, 30), (0.9, 0.9, 5.0), 0.55),
    GridSpec("3D-1mm", (192, 224, 150), (1.0, 1.0, 1.1), 0.25),
)
OOD_DWI_GRIDS: tuple[GridSpec, ...] = (
    GridSpec("3x3x6", (80, 80, 24), (3.0, 3.0, 6.0), 0.4),
    GridSpec("0.9x0.9x3", (256, 256, 48), (0.9, 0.9, 3.0), 0.3),
    GridSpec("2.5-iso", (96, 96, 60), (2.5, 2.5, 2.5), 0.3),
)
OOD_FLAIR_GRIDS: tuple[GridSpec, ...] = (
    GridSpec("2D-1.2x1.2x7", (192, 192, 22), (1.2, 1.2, 7.0), 0.5),
    GridSpec("2D-0.7x0.7x6", (320, 320, 25), (0.7, 0.7, 6.0), 0.5),
)
TINY_DWI_GRIDS: tuple[GridSpec, ...] = (GridSpec("tiny", (44, 52, 30), (3.5, 3.5, 5.0), 1.0),)
TINY_FLAIR_GRIDS: tuple[GridSpec, ...] = (GridSpec("tiny", (64, 64, 24), (2.8, 2.8, 6.0), 1.0),)
#: ISLES-like base direction (LPS): i to the left, j anterior, k superior (left-handed).
BASE_DIRECTION = np.diag([1.0, -1.0, 1.0])


def choose(rng: np.random.Generator, grids: tuple[GridSpec, ...]) -> GridSpec:
    weights = np.asarray([g.weight for g in grids], float)
    return grids[int(rng.choice(len(grids), p=weights / weights.sum()))]


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """3x3 rotation from Euler angles (degrees) about x, then y, then z (ITK Euler3D, ZXY off)."""
    ax, ay, az = np.radians(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(angles_deg: np.ndarray, translation_mm: np.ndarray, center: np.ndarray) -> np.ndarray:
    """4x4 LPS matrix of ``p -> R (p - c) + c + t``."""
    matrix = np.eye(4)
    rot = rotation_matrix(angles_deg)
    matrix[:3, :3] = rot
    matrix[:3, 3] = np.asarray(center) - rot @ np.asarray(center) + np.asarray(translation_mm)
    return matrix


def euler_transform(matrix: np.ndarray, center: np.ndarray) -> sitk.Euler3DTransform:
    """SimpleITK Euler3D transform equal to a rigid 4x4 matrix, with the given centre."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter([float(c) for c in center])
    transform.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    center = np.asarray(center, float)
    transform.SetTranslation([float(v) for v in matrix[:3, :3] @ center + matrix[:3, 3] - center])
    return transform


def random_rotation(rng: np.random.Generator, angle_deg: float) -> np.ndarray:
    """Euler angles (degrees) of a rotation of exactly ``angle_deg`` about a random axis,
    returned as the rotation matrix (3x3)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    theta = np.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * (k @ k)


def grid_geometry(spec: GridSpec, center_lps: np.ndarray, oblique: np.ndarray | None = None) -> Geometry:
    """A geometry of ``spec`` centred on ``center_lps`` with direction ``oblique @ BASE_DIRECTION``."""
    direction = (oblique if oblique is not None else np.eye(3)) @ BASE_DIRECTION
    half = direction @ (np.asarray(spec.spacing) * (np.asarray(spec.size) - 1) / 2.0)
    origin = np.asarray(center_lps, float) - half
    return Geometry(spec.size, spec.spacing, tuple(origin), tuple(direction.ravel()))


def resample_affine(array: np.ndarray, source: Geometry, target: Geometry, target_to_source: np.ndarray,
                    *, order: int = 1, default: float = 0.0) -> np.ndarray:
    """Resample ``array`` (on ``source``) onto ``target``; ``target_to_source`` is the 4x4 LPS
    matrix mapping a target point to the source point it shows. Returns float32 ``[k, j, i]``."""
    image = source.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32)))
    reference = target.apply_to(sitk.Image(list(target.size), sitk.sitkUInt8))
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in target_to_source[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in target_to_source[:3, 3]])
    interpolator = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}[order]
    result = sitk.Resample(image, reference, transform, interpolator, default, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(result)


def _basis(n_out: int, n_coarse: int) -> np.ndarray:
    """``(n_out, n_coarse)`` cubic-spline interpolation weights from a coarse to a fine 1-D grid."""
    eye = np.eye(n_coarse, dtype=np.float32)
    return ndimage.zoom(eye, (n_out / n_coarse, 1), order=3, grid_mode=True, mode="nearest")[:n_out]


def smooth_upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Smoothly (separable cubic spline) upsample a small 3-D control grid to ``shape``, float32."""
    bk, bj, bi = (_basis(n, c) for n, c in zip(shape, coarse.shape, strict=True))
    out = np.tensordot(bk, coarse.astype(np.float32), axes=(1, 0))  # (K, b, c)
    out = np.tensordot(out, bj, axes=(1, 1))                         # (K, c, J)
    out = np.tensordot(out, bi, axes=(1, 1))                         # (K, J, I)
    return out


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative gain ``exp(strength * field)`` from a 4x4x4 random control grid."""
    smooth = smooth_upsample(rng.standard_normal((4, 4, 4)), shape)
    return np.exp(strength * smooth / max(float(np.abs(smooth).max()), 1e-6)).astype(np.float32)


def correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed in-plane by ``sigma_vox`` (as from interpolation of a
    coarser acquisition)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if sigma_vox <= 0:
        return noise
    noise = ndimage.gaussian_filter(noise, (sigma_vox * 0.6, sigma_vox, sigma_vox))
    return noise / max(float(noise.std()), 1e-6)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator, corr_sigma_vox: float = 0.0) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of standard deviation ``sigma`` per channel."""
    real = signal + sigma * correlated_noise(rng, signal.shape, corr_sigma_vox)
    imag = sigma * correlated_noise(rng, signal.shape, corr_sigma_vox)
    return np.sqrt(real * real + imag * imag).astype(np.float32)
