"""Admission NIHSS from lesion volume and location: features, the fitted model, sampling.

The model is fitted on the real SOOP pairs (1,449 acute lesion masks in MNI space with their
admission NIHSS; Absher et al., Scientific Data 2024) by ``Training/clinical/fit_nihss.py`` and stored in
``Training/resources/nihss_model.json``. It is a Poisson regression (log link, small ridge
penalty) on standardised lesion features, with a negative-binomial dispersion estimated on the
training rows, so that simulated scores scatter around the expected score as real ones do.

Features need no atlas, so that the same numbers can be computed for a lesion in MNI space
(SOOP) and in a case's native space (ISLES 2022, generated data). All are computed from world
(RAS, mm) coordinates of the lesion and of the brain mask:

* ``log_volume``: log(1 + lesion volume in mL);
* ``left_fraction``: fraction of lesion voxels left of the brain's midline (the x coordinate of
  the brain centroid); dominant-hemisphere lesions score higher (language items);
* ``left_x_log_volume``: (left_fraction - 0.5) x log_volume (the hemisphere effect grows with size);
* ``lateral``: mean |x - midline| of the lesion voxels over the brain's x standard deviation
  (cortical vs deep);
* ``anterior``, ``superior``: lesion centroid minus brain centroid along y (A) and z (S), over the
  brain's standard deviation along that axis (brainstem/cerebellar lesions sit low and back);
* ``log_components``: log of the number of 26-connected components on a grid of about 2 mm.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

FEATURE_NAMES: tuple[str, ...] = (
    "log_volume", "left_fraction", "left_x_log_volume", "lateral", "anterior", "superior", "log_components",
)
DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[1] / "resources" / "nihss_model.json"
NIHSS_MAX = 42


def _world(indices_kji: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    ijk = indices_kji[:, ::-1].astype(np.float64)
    return ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


def brain_reference(brain_kji: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (RAS mm, (3,)) and standard deviation (mm, (3,)) of a brain mask ``[k, j, i]``."""
    points = _world(np.argwhere(brain_kji), ijk_to_ras)
    if points.shape[0] < 10:
        raise ValueError("The brain mask is (nearly) empty; lesion location cannot be computed.")
    return points.mean(axis=0), np.maximum(points.std(axis=0), 1.0)


def _component_count(mask_kji: np.ndarray, spacing_kji: np.ndarray) -> int:
    factors = np.maximum(np.round(2.0 / spacing_kji).astype(int), 1)
    if np.any(factors > 1):
        pad = [(0, (-s) % f) for s, f in zip(mask_kji.shape, factors, strict=False)]
        padded = np.pad(mask_kji, pad)
        shape = []
        for size, f in zip(padded.shape, factors, strict=False):
            shape += [size // f, f]
        mask_kji = padded.reshape(shape).max(axis=(1, 3, 5))
    return int(ndimage.label(mask_kji, structure=np.ones((3, 3, 3), bool))[1])


def lesion_features(
    lesion_kji: np.ndarray,
    ijk_to_ras: np.ndarray,
    brain_center: np.ndarray,
    brain_sd: np.ndarray,
) -> np.ndarray:
    """The :data:`FEATURE_NAMES` of one lesion mask.

    Args:
        lesion_kji: lesion mask indexed ``[k, j, i]``.
        ijk_to_ras: 4x4 voxel-to-RAS matrix (mm), e.g. ``Geometry.ijk_to_ras`` or a NIfTI affine.
        brain_center, brain_sd: from :func:`brain_reference` on the same grid (RAS mm).

    Returns:
        float64 array (7,). An empty lesion gives volume 0, zero location features and 0 components.
    """
    lesion_kji = np.asarray(lesion_kji).astype(bool)
    spacing_ijk = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing_ijk)) / 1000.0
    indices = np.argwhere(lesion_kji)
    if indices.shape[0] == 0:
        return np.zeros(len(FEATURE_NAMES))
    points = _world(indices, ijk_to_ras)
    log_volume = math.log1p(indices.shape[0] * voxel_ml)
    dx = points[:, 0] - brain_center[0]
    left_fraction = float(np.mean(dx < 0))  # RAS: x grows to the right
    lateral = float(np.mean(np.abs(dx)) / brain_sd[0])
    anterior = float((points[:, 1].mean() - brain_center[1]) / brain_sd[1])
    superior = float((points[:, 2].mean() - brain_center[2]) / brain_sd[2])
    components = _component_count(lesion_kji, spacing_ijk[::-1])
    return np.array([log_volume, left_fraction, (left_fraction - 0.5) * log_volume, lateral, anterior, superior,
                     math.log(max(components, 1))])


@dataclass(frozen=True)
class NihssModel:
    """Poisson regression of NIHSS on standardised :data:`FEATURE_NAMES` with NB dispersion.

    expected NIHSS = exp(intercept + sum(coef * (x - mean) / scale)), capped at 42;
    a sample is negative-binomial with that mean and variance mu + dispersion * mu^2.
    """

    feature_names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    dispersion: float
    info: dict

    def expected(self, features: np.ndarray) -> np.ndarray:
        """Expected NIHSS for features (F,) or (N, F)."""
        z = (np.atleast_2d(features) - self.mean) / self.scale
        mu = np.exp(np.clip(self.intercept + z @ self.coef, -10, math.log(NIHSS_MAX)))
        return mu if np.ndim(features) > 1 else mu[0]

    def sample(self, features: np.ndarray, rng: np.random.Generator) -> int:
        """One simulated admission NIHSS (integer 0-42) for one lesion's features (F,)."""
        mu = float(self.expected(features))
        if self.dispersion > 1e-9:
            shape = 1.0 / self.dispersion  # gamma-Poisson mixture = negative binomial
            mu = float(rng.gamma(shape, mu / shape))
        return int(min(rng.poisson(mu), NIHSS_MAX))

    def to_dict(self) -> dict:
        return {"feature_names": list(self.feature_names), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept, "dispersion": self.dispersion,
                "info": self.info}

    @classmethod
    def from_dict(cls, data: dict) -> NihssModel:
        names = tuple(data["feature_names"])
        if names != FEATURE_NAMES:
            raise ValueError(f"NIHSS model features {names} do not match this code's {FEATURE_NAMES}; refit it.")
        return cls(names, np.asarray(data["mean"], float), np.asarray(data["scale"], float),
                   np.asarray(data["coef"], float), float(data["intercept"]), float(data["dispersion"]),
                   dict(data.get("info", {})))


def load_model(path: str | os.PathLike | None = None) -> NihssModel:
    """Load the fitted model (default: ``Training/resources/nihss_model.json``)."""
    return NihssModel.from_dict(json.loads(Path(path or DEFAULT_MODEL_PATH).read_text()))


def fit_poisson(x: np.ndarray, y: np.ndarray, ridge: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Fit a ridge-penalised Poisson regression with log link.

    Args:
        x: features (N, F); y: counts (N,); ridge: L2 penalty on the standardised coefficients
            (the intercept is not penalised).

    Returns:
        (mean (F,), scale (F,), coef (F,), intercept).
    """
    from scipy.optimize import minimize

    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    z = (x - mean) / scale
    n = len(y)

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        eta = np.clip(params[0] + z @ params[1:], -20, 20)
        mu = np.exp(eta)
        loss = float(np.sum(mu - y * eta)) / n + 0.5 * ridge / n * float(params[1:] @ params[1:])
        residual = (mu - y) / n
        grad = np.concatenate([[residual.sum()], z.T @ residual + ridge / n * params[1:]])
        return loss, grad

    start = np.zeros(x.shape[1] + 1)
    start[0] = math.log(max(float(y.mean()), 1e-3))
    result = minimize(objective, start, jac=True, method="L-BFGS-B")
    return mean, scale, result.x[1:], float(result.x[0])


def nb_dispersion(y: np.ndarray, mu: np.ndarray) -> float:
    """Method-of-moments negative-binomial dispersion alpha: Var = mu + alpha mu^2."""
    alpha = float(np.sum((y - mu) ** 2 - mu) / np.sum(mu**2))
    return max(alpha, 0.0)
