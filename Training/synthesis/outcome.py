"""Simulated follow-up infarct (the ``outcome`` target).

Model (all in template space, deterministic given its inputs and the random field):

1. **Penumbra.** Tissue (grey or white matter) in the territories the acute core touches,
   at most 45 mm from the core, nearest first (by ``distance / 45 mm + 0.25 * smooth noise``),
   of volume ``m * core volume`` with the mismatch ratio
   ``m = min(0.3 + 0.25 * NIHSS * (1.3 - 0.6 * collateral), 6)``: a severe deficit for the core
   size means a large mismatch. The true NIHSS and collateral status are not in the image.
2. **Fraction of the penumbra that infarcts**::

       q_untreated = clip(0.45 + 0.45 * (1 - collateral) + 0.1 * [glucose > 10], 0, 0.98)
       q = q_untreated * (1 - benefit(treatment) * exp(-onset_h / tau(treatment)))

   with benefit none 0, thrombolysis 0.55, thrombectomy 0.8, both 0.88 and tau 4.5 h for
   thrombolysis, 8 h for thrombectomy (and both). So the final infarct grows with onset time
   (treatment comes later and saves less) and is larger without treatment; treatment and onset
   time are in the clinical data, not in the image.
3. **Which voxels.** The ``q`` fraction of the penumbra nearest the core (same ranking)
   infarcts, so growth spreads outward from the core; the same random field for two values of
   ``q`` gives nested outcomes.
4. The outcome is ``max(core fraction, grown fraction)``: it always contains the acute core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from Training.synthesis.anatomy import Template

TREATMENT_BENEFIT = {"none": 0.0, "thrombolysis": 0.55, "thrombectomy": 0.8, "both": 0.88}
TREATMENT_TAU_H = {"none": 1.0, "thrombolysis": 4.5, "thrombectomy": 8.0, "both": 8.0}


@dataclass(frozen=True)
class OutcomeInfo:
    mismatch_ratio: float
    penumbra_radius_mm: float
    penumbra_ml: float
    infarcted_fraction: float
    outcome_ml: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def infarcted_fraction(onset_h: float, treatment: str, collateral: float, glucose: float) -> float:
    """Fraction ``q`` of the penumbra that becomes infarct (see the module docstring)."""
    q_untreated = float(np.clip(0.45 + 0.45 * (1 - collateral) + 0.1 * (glucose > 10), 0, 0.98))
    benefit = TREATMENT_BENEFIT[treatment] * np.exp(-onset_h / TREATMENT_TAU_H[treatment])
    return float(q_untreated * (1 - benefit))


MAX_DISTANCE_MM = 45.0


def mismatch_ratio(nihss: float, collateral: float) -> float:
    """Penumbra volume / core volume."""
    return float(min(0.3 + 0.25 * max(nihss, 0.0) * (1.3 - 0.6 * collateral), 6.0))


def outcome_fraction(template: Template, core: np.ndarray, *, nihss: float, onset_h: float, treatment: str,
                     collateral: float, glucose: float, noise: np.ndarray) -> tuple[np.ndarray, OutcomeInfo]:
    """Grow the acute core into the penumbra.

    Args:
        template: working template.
        core: float32 ``[k, j, i]`` acute lesion fraction on the template grid.
        nihss, onset_h, treatment, collateral, glucose: the (true) clinical state.
        noise: float32 ``[k, j, i]`` smooth unit random field (fixed per case).

    Returns:
        (outcome fraction float32 ``[k, j, i]`` >= ``core``, :class:`OutcomeInfo`).
    """
    voxel_ml = template.spacing_mm ** 3 / 1000.0
    binary = core >= 0.5
    if not binary.any():
        return core.copy(), OutcomeInfo(0.0, 0.0, 0.0, 0.0, 0.0)
    ratio = mismatch_ratio(nihss, collateral)
    territories = np.unique(template.territory[binary])
    territories = territories[territories > 0]
    allowed = np.isin(template.territory, territories) & ((template.gm + template.wm) > 0.4)
    allowed = ndimage.binary_dilation(allowed, iterations=1) & (template.brain > 0.5)
    # only voxels within MAX_DISTANCE_MM of the core can join: compute distances in the core's
    # bounding box plus that margin (exact there), +inf elsewhere
    margin = int(np.ceil(MAX_DISTANCE_MM / template.spacing_mm)) + 1
    where = np.argwhere(binary)
    lo = np.maximum(where.min(axis=0) - margin, 0)
    hi = np.minimum(where.max(axis=0) + margin + 1, binary.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    distance = np.full(binary.shape, np.inf)
    distance[box] = ndimage.distance_transform_edt(~binary[box], sampling=template.spacing_mm)
    candidates = allowed & ~binary & (distance <= MAX_DISTANCE_MM)
    flat = np.flatnonzero(candidates)
    score = distance.ravel()[flat] / MAX_DISTANCE_MM + 0.25 * noise.ravel()[flat]
    order = flat[np.argsort(score, kind="stable")]
    n_pen = min(int(round(ratio * binary.sum())), order.size)
    q = infarcted_fraction(onset_h, treatment, collateral, glucose)
    n_take = int(round(q * n_pen))
    grown = np.zeros(core.shape, bool)
    if n_take > 0:
        grown.flat[order[:n_take]] = True
        # only what stays connected to the core (growth spreads from it)
        labels, _ = ndimage.label(grown | binary, structure=np.ones((3, 3, 3)))
        keep = np.unique(labels[binary])
        grown &= np.isin(labels, keep[keep > 0])
    radius = float(distance.ravel()[order[n_pen - 1]]) if n_pen > 0 else 0.0
    grown_frac = ndimage.gaussian_filter(grown.astype(np.float32), 0.6)
    grown_frac = np.where(grown, np.maximum(grown_frac, 0.55), np.minimum(grown_frac, 0.45))
    result = np.maximum(core, grown_frac).astype(np.float32)
    info = OutcomeInfo(ratio, radius, n_pen * voxel_ml, q, float((result >= 0.5).sum() * voxel_ml))
    return result, info


#: The growth check's two clinical scenarios (``python -m Training behaviour``): thrombectomy 1 h after
#: onset against no treatment at 20 h, both with NIHSS 16.
GROWTH_SCENARIOS = {
    "thrombectomy_1h": {"onset_h": 1.0, "treatment": "thrombectomy", "nihss": 16.0},
    "none_20h": {"onset_h": 20.0, "treatment": "none", "nihss": 16.0},
}


def scenario_volumes(template: Template, core: np.ndarray, *, collateral: float, glucose: float,
                     noise: np.ndarray) -> dict[str, float]:
    """Simulated final infarct (mL, template grid) of one case under each of :data:`GROWTH_SCENARIOS`
    (the case's own core, collateral status, glucose and random field; the scenario's NIHSS, onset
    and treatment), and ``growth``: the second over the first (1 when both are empty)."""
    volumes = {name: outcome_fraction(template, core, nihss=values["nihss"], onset_h=values["onset_h"],
                                      treatment=str(values["treatment"]), collateral=collateral, glucose=glucose,
                                      noise=noise)[1].outcome_ml
               for name, values in GROWTH_SCENARIOS.items()}
    early, late = (volumes[name] for name in GROWTH_SCENARIOS)
    volumes["growth"] = late / early if early > 0 else 1.0
    return volumes
