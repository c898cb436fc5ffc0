"""Real-scan lesion mimics and embolic showers in template (MNI) space, for BOTH synthesisers.

One implementation, consumed by the GPU/torch training synthesiser (:mod:`Training.synthesis.gpu_synth`, via
:class:`Training.synthesis.gpu_synth.LabelSampler`) and by the CPU generator of test sets
(:func:`Training.synthesis.case.synthesize_case`, :mod:`Training.synthesis.physics`):

* **Where** mimics go: :func:`mimic_regions` derives one placement-weight map per kind from the
  MNI template anatomy (:mod:`Training.synthesis.anatomy`): tissue fractions, the brain surface and
  MNI coordinates (cached per template).
* **What** each kind does: :data:`KINDS` gives, per kind, its size, shape and the ranges of its
  multipliers of S0 (the b=0 / T2 signal, so b0 and b-image rise together), of the tissue ADC, of
  FLAIR, and of extra ADC noise. :func:`draw_table` draws one case's values as a
  ``(len(KINDS) + 1, 4)`` table (row 0: no mimic) and :func:`factors` turns a per-voxel lookup
  of that table and a weight into multiplier maps; the formula works on numpy and torch arrays alike.
* **Maps**: :func:`draw_mimic_maps` places Poisson-many instances of each kind and returns a
  template-space ``kind`` label map (uint8, 0 = none, ``n`` = ``KINDS[n - 1]``) and a ``weight``
  map (0..1, soft edge); where instances overlap the stronger weight wins.

Kinds (real-scan false positives of the shipped model, ``../shared/ARCHITECTURE.md``, "Real scans"):

=================== ============================================================== ===========================
kind                where                                                          signal
=================== ============================================================== ===========================
susceptibility      air-bone interfaces: temporal poles, orbitofrontal cortex and   DWI bright (S0 x1.4-2.8),
                    gyrus rectus, inferior temporal lobe next to the petrous bone,   stretched x1.5-3.5 along
                    within 8 mm of the brain surface                                 the phase-encoding (A-P)
                                                                                     axis; ADC normal, noisy
cortical_ribbon     cortical grey matter at the brain surface, twice as often on     S0 x1.15-1.6; ADC normal
                    the posterior rim                                                or raised (x1.0-1.15)
shine_through       grey or white matter                                             S0 x1.4-2.4 (T2), ADC
                                                                                     x1.0-1.3, FLAIR bright
midline_choroid     small spots (0.01-0.15 mL) in tissue next to the midline         S0 x1.4-2.6, ADC normal
                    CSF spaces and the trigones of the lateral ventricles
chronic             old infarcts (cortical, 0.5-15 mL) and lacunes (deep, 0.02-0.5   ADC x1.8-2.8 (high), S0
                    mL)                                                              x1.2-1.8, FLAIR bright,
                                                                                     DWI iso or dark
wmh                 periventricular white matter                                     FLAIR x1.4-2.2, ADC
                                                                                     x1.1-1.45, S0 x1.1-1.4
=================== ============================================================== ===========================

Embolic showers (:func:`embolic_shower`): 3 to 40 foci (log-uniform count) of 0.02-0.5 mL over
one to three arterial territories (either hemisphere), each focus either a small connected
component of a real SOOP lesion mask (when a ``source`` lesion is given) moved to its new place,
or a sampled ellipsoid; :func:`small_lesion` gives a single small lesion of 0.02-1 mL. Both return
a partial-volume fraction (mask = fraction >= 0.5) and a severity map with a strong core, since
small acute emboli are conspicuous on DWI.

Every function draws from the ``numpy`` generator it is given, so each synthesiser keeps its own
random streams (the generator gives these options their own streams so that earlier datasets
stay byte-identical when they are off).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from Training.synthesis.anatomy import Template

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KindSpec:
    """One mimic kind: how often, how big, what shape, and the ranges of its multipliers.

    Attributes:
        name: kind name (the label is its 1-based position in :data:`KINDS`).
        rate: mean number of instances per case that has real-scan mimics (Poisson).
        volume_ml: range of an instance's volume (log-uniform), mL.
        stretch: range of the elongation along the template's j (anterior-posterior) axis, the
            usual phase-encoding direction of axial EPI.
        s0: range of the S0 (b=0, T2-weighted) multiplier: b0 and b-image alike, so DWI brightens
            while the measured ADC does not change.
        adc: range of the tissue ADC multiplier.
        flair: range of the FLAIR multiplier.
        adc_noise: range of the relative standard deviation of extra ADC noise.
        soft_mm: edge width of the weight (susceptibility and ribbons fade, lesions have borders).
    """

    name: str
    rate: float
    volume_ml: tuple[float, float]
    stretch: tuple[float, float]
    s0: tuple[float, float]
    adc: tuple[float, float]
    flair: tuple[float, float]
    adc_noise: tuple[float, float] = (0.0, 0.0)
    soft_mm: float = 2.0


KINDS: tuple[KindSpec, ...] = (
    KindSpec("susceptibility", 1.4, (0.4, 5.0), (1.5, 3.5), (1.4, 2.8), (0.95, 1.1), (1.0, 1.1), (0.05, 0.3), 5.0),
    KindSpec("cortical_ribbon", 0.8, (0.5, 6.0), (1.0, 1.5), (1.15, 1.6), (1.0, 1.15), (1.0, 1.25), (0.0, 0.05), 4.0),
    KindSpec("shine_through", 0.8, (0.05, 2.0), (0.8, 1.4), (1.4, 2.4), (1.0, 1.3), (1.1, 1.7), (0.0, 0.05), 2.0),
    KindSpec("midline_choroid", 1.0, (0.01, 0.15), (0.8, 1.6), (1.4, 2.6), (0.9, 1.1), (1.0, 1.4), (0.0, 0.0), 1.5),
    KindSpec("chronic", 0.6, (0.02, 15.0), (0.8, 1.4), (1.2, 1.8), (1.8, 2.8), (1.2, 2.0), (0.0, 0.1), 2.0),
    KindSpec("wmh", 0.8, (0.3, 8.0), (0.8, 1.6), (1.1, 1.4), (1.1, 1.45), (1.4, 2.2), (0.0, 0.0), 3.0),
)
KIND_NAMES: tuple[str, ...] = tuple(spec.name for spec in KINDS)
#: Columns of a physics table (:func:`draw_table`).
COLUMNS: tuple[str, ...] = ("s0", "adc", "flair", "adc_noise")
#: Shower and small-lesion ranges (mL, counts).
SHOWER_FOCUS_ML = (0.02, 0.5)
SHOWER_COUNT = (3, 40)
SMALL_LESION_ML = (0.02, 1.0)
#: Territory weights of shower foci (labels of :data:`Training.synthesis.anatomy.TERRITORIES`, left side;
#: the hemisphere is drawn separately): MCA, ACA, PCA, posterior fossa, deep.
_SHOWER_TERRITORIES = {1: 0.55, 3: 0.1, 5: 0.15, 7: 0.12, 9: 0.08}


# ----------------------------------------------------------------------------------------
# Regions (template space, once per template)
# ----------------------------------------------------------------------------------------
_REGION_CACHE: dict[int, tuple[Template, dict[str, np.ndarray]]] = {}


def mimic_regions(template: Template) -> dict[str, np.ndarray]:
    """Placement weight (float32 ``[k, j, i]``, 0..1) of every kind on the template grid (cached).

    The regions come from the template anatomy and MNI coordinates (mm, RAS):

    * ``susceptibility``: brain within 8 mm of its surface in the temporal poles (|x| 20-58, y -30
      to 25, z -45 to -12), the orbitofrontal cortex and gyrus rectus (|x| < 35, y > 5, z -32 to -2)
      and the inferior temporal lobe over the petrous bone (|x| 28-62, y -55 to -10, z -42 to -15);
    * ``cortical_ribbon``: cortical grey matter within 6 mm of the surface (weight 1 posterior of
      y = -40, 0.5 elsewhere); ``shine_through``: grey and white matter;
    * ``midline_choroid``: tissue within 4 mm of CSF either within 10 mm of the midline and deeper
      than 15 mm below the surface, or at the trigones (|x| 15-38, y -55 to -22, z -2 to 28);
    * ``chronic``: grey and white matter; ``wmh``: white matter within 8 mm of the ventricles.
    """
    cached = _REGION_CACHE.get(id(template))
    if cached is None or cached[0] is not template:  # the template is kept alive with its regions
        if len(_REGION_CACHE) >= 4:
            _REGION_CACHE.pop(next(iter(_REGION_CACHE)))
        cached = _REGION_CACHE[id(template)] = (template, _regions(template))
    return cached[1]


def _regions(template: Template) -> dict[str, np.ndarray]:
    spacing = float(template.spacing_mm)
    x, y, z = template.world_ras()
    ax = np.abs(x)
    brain = template.brain > 0.5
    tissue = (template.gm + template.wm) > 0.5
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)  # mm below the brain surface
    superficial = brain & (depth <= 8.0)
    poles = (ax > 20) & (ax < 58) & (y > -30) & (y < 25) & (z > -45) & (z < -12)
    orbital = (ax < 35) & (y > 5) & (z > -32) & (z < -2)
    petrous = (ax > 28) & (ax < 62) & (y > -55) & (y < -10) & (z > -42) & (z < -15)
    susceptibility = superficial & (poles | orbital | petrous)
    ribbon = (template.gm > 0.5) & (depth <= 6.0)
    ribbon_w = ribbon * np.where(y < -40, 1.0, 0.5)
    csf = template.csf > 0.6
    near_csf = ndimage.distance_transform_edt(~csf, sampling=spacing) <= 4.0
    midline = tissue & near_csf & (ax < 10) & (depth > 15.0)
    trigone = tissue & near_csf & (ax > 15) & (ax < 38) & (y > -55) & (y < -22) & (z > -2) & (z < 28)
    ventricles = csf & (depth > 15.0)
    near_ventricles = ndimage.distance_transform_edt(~ventricles, sampling=spacing) <= 8.0
    wmh = (template.wm > 0.5) & near_ventricles
    regions = {
        "susceptibility": susceptibility.astype(np.float32),
        "cortical_ribbon": ribbon_w.astype(np.float32),
        "shine_through": tissue.astype(np.float32),
        "midline_choroid": (midline | trigone).astype(np.float32),
        "chronic": tissue.astype(np.float32),
        "wmh": wmh.astype(np.float32),
    }
    for name, region in regions.items():
        if not region.any():  # a tiny test template may lack a region: fall back to tissue
            logger.debug("Mimic region %s is empty on this template; using brain tissue.", name)
            regions[name] = tissue.astype(np.float32)
    return regions


# ----------------------------------------------------------------------------------------
# Physics table and factors
# ----------------------------------------------------------------------------------------
def identity_table() -> np.ndarray:
    """The physics table of a case without mimics: every multiplier 1, no noise."""
    table = np.zeros((len(KINDS) + 1, len(COLUMNS)), np.float32)
    table[:, :3] = 1.0
    return table


def draw_table(rng: np.random.Generator) -> np.ndarray:
    """One case's multipliers: float32 ``(len(KINDS) + 1, 4)``, columns :data:`COLUMNS`, row 0 no mimic."""
    table = identity_table()
    for row, spec in enumerate(KINDS, start=1):
        table[row] = [rng.uniform(*spec.s0), rng.uniform(*spec.adc), rng.uniform(*spec.flair),
                      rng.uniform(*spec.adc_noise)]
    return table


def factors(per_voxel, weight):  # noqa: ANN001, ANN201 - numpy or torch alike
    """Multiplier maps from a per-voxel lookup of a physics table and the mimic weight.

    Args:
        per_voxel: ``table[kind]``, shape ``(..., 4)`` (numpy or torch).
        weight: mimic weight 0..1, shape ``(...)``.

    Returns:
        (S0 multiplier, ADC multiplier, FLAIR multiplier, ADC noise standard deviation), each of
        the shape of ``weight``: ``1 + weight * (value - 1)`` for the multipliers and
        ``weight * noise`` for the noise, so a weight of 0 changes nothing.
    """
    s0 = 1 + weight * (per_voxel[..., 0] - 1)
    adc = 1 + weight * (per_voxel[..., 1] - 1)
    flair = 1 + weight * (per_voxel[..., 2] - 1)
    noise = weight * per_voxel[..., 3]
    return s0, adc, flair, noise


# ----------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------
def _ellipsoid(shape: tuple[int, int, int], center: np.ndarray, radii_mm: np.ndarray, spacing: float,
               soft_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """A soft ellipsoid in a local box: (box, weight crop), weight 0.5 on the surface, 1 inside
    beyond ``soft_mm / 2``, with partial volume at the border (``center`` and radii in ``(k, j, i)``)."""
    reach = radii_mm / spacing + soft_mm / spacing + 1.5
    lo = np.maximum(np.floor(center - reach).astype(int), 0)
    hi = np.minimum(np.ceil(center + reach).astype(int) + 1, np.asarray(shape))
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    axes = [(np.arange(a, b, dtype=np.float32) - c) * spacing for a, b, c in zip(lo, hi, center, strict=True)]
    k, j, i = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt((k / radii_mm[0]) ** 2 + (j / radii_mm[1]) ** 2 + (i / radii_mm[2]) ** 2)
    mean_radius = float(np.mean(radii_mm))
    weight = np.clip(0.5 - (r - 1.0) * mean_radius / max(soft_mm, 1e-3), 0.0, 1.0)
    return box, weight.astype(np.float32)


def _radii(rng: np.random.Generator, volume_ml: float, stretch: float) -> np.ndarray:
    """Ellipsoid radii (k, j, i) in mm of ``volume_ml``, elongated ``stretch`` times along j."""
    shape = rng.uniform(0.8, 1.25, 3)
    shape[1] *= stretch
    shape /= np.prod(shape) ** (1 / 3)
    radius = (3 * volume_ml * 1000.0 / (4 * np.pi)) ** (1 / 3)
    return (radius * shape).astype(np.float32)


def _pick(rng: np.random.Generator, weight: np.ndarray) -> np.ndarray | None:
    """A random voxel (k, j, i, float, jittered within the voxel) drawn proportionally to ``weight``."""
    flat = weight.ravel()
    total = float(flat.sum())
    if total <= 0:
        return None
    index = int(np.searchsorted(np.cumsum(flat, dtype=np.float64), rng.uniform(0, total), side="right"))
    index = min(index, flat.size - 1)
    return np.asarray(np.unravel_index(index, weight.shape), dtype=np.float32) + rng.uniform(-0.5, 0.5, 3)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


# ----------------------------------------------------------------------------------------
# Mimic maps
# ----------------------------------------------------------------------------------------
@dataclass
class MimicMaps:
    """Real-scan mimics of one case on the template grid.

    Attributes:
        kind: uint8 ``[k, j, i]`` kind label (0 none, ``n`` = ``KINDS[n - 1]``).
        weight: float32 ``[k, j, i]`` 0..1.
        table: float32 ``(len(KINDS) + 1, 4)`` multipliers (:func:`draw_table`).
        description: counts and volumes per kind (JSON-serialisable).
    """

    kind: np.ndarray
    weight: np.ndarray
    table: np.ndarray
    description: dict = field(default_factory=dict)

    def factor_maps(self, noise_field: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(S0, ADC, FLAIR) multiplier maps on the template grid; the ADC map carries the kind's
        extra noise when a unit-sd ``noise_field`` is given."""
        s0, adc, flair, noise = factors(self.table[self.kind], self.weight)
        if noise_field is not None:
            adc = adc * np.clip(1 + noise * noise_field, 0.3, None)
        return s0.astype(np.float32), adc.astype(np.float32), flair.astype(np.float32)


def empty_maps(shape: tuple[int, int, int]) -> MimicMaps:
    return MimicMaps(np.zeros(shape, np.uint8), np.zeros(shape, np.float32), identity_table(), {})


def draw_mimic_maps(template: Template, rng: np.random.Generator, *, avoid: np.ndarray | None = None,
                    rate: float = 1.0) -> MimicMaps:
    """Place the real-scan mimics of one case (Poisson ``rate * KindSpec.rate`` instances per kind).

    Args:
        template: the working template.
        rng: random generator (its own stream in the generator).
        avoid: lesion fraction ``[k, j, i]``; mimics are kept off voxels where it exceeds 0.05.
        rate: scales every kind's rate.

    Returns:
        :class:`MimicMaps` with the case's physics table.
    """
    shape = template.shape
    spacing = float(template.spacing_mm)
    regions = mimic_regions(template)
    free = np.ones(shape, np.float32) if avoid is None else (avoid <= 0.05).astype(np.float32)
    kind = np.zeros(shape, np.uint8)
    weight = np.zeros(shape, np.float32)
    table = draw_table(rng)
    description: dict = {}
    brain = (template.brain > 0.5).astype(np.float32)
    for label, spec in enumerate(KINDS, start=1):
        count = int(rng.poisson(spec.rate * rate))
        region = regions[spec.name] * free
        volumes = []
        for _ in range(count):
            center = _pick(rng, region)
            if center is None:
                break
            volume = _log_uniform(rng, spec.volume_ml)
            if spec.name == "chronic" and rng.random() < 0.6:  # lacune: small and deep
                volume = _log_uniform(rng, (0.02, 0.5))
            centers = [center]
            if spec.name == "susceptibility" and rng.random() < 0.5:  # both temporal poles or orbits
                mirrored = _mirror(template, center)
                if mirrored is not None:
                    centers.append(mirrored)
            radii = _radii(rng, volume, float(rng.uniform(*spec.stretch)))
            for c in centers:
                box, w = _ellipsoid(shape, c, radii, spacing, spec.soft_mm)
                w = w * float(rng.uniform(0.6, 1.0))
                # confine to the region's tissue (ribbons follow the cortex) and the brain, off the lesion
                confine = brain[box] * free[box]
                if spec.name in ("cortical_ribbon", "wmh"):
                    confine = confine * (regions[spec.name][box] > 0)
                w = w * confine
                stronger = w > weight[box]
                weight[box] = np.where(stronger, w, weight[box])
                kind[box] = np.where(stronger, label, kind[box])
            volumes.append(round(volume, 4))
        if volumes:
            description[spec.name] = {"count": len(volumes), "volume_ml": volumes}
    description["mimic_ml"] = float((weight >= 0.5).sum() * spacing**3 / 1000.0)
    return MimicMaps(kind, weight, table, description)


def _mirror(template: Template, center_kji: np.ndarray) -> np.ndarray | None:
    """The voxel (k, j, i) mirrored across the MNI midline (x -> -x), or None outside the grid."""
    m = template.geometry.ijk_to_ras
    ijk = np.array([center_kji[2], center_kji[1], center_kji[0], 1.0])
    ras = m @ ijk
    ras[0] = -ras[0]
    back = np.linalg.inv(m) @ ras
    kji = np.array([back[2], back[1], back[0]], np.float32)
    if np.any(kji < 0) or np.any(kji > np.asarray(template.shape) - 1):
        return None
    return kji


# ----------------------------------------------------------------------------------------
# Embolic showers and small single lesions
# ----------------------------------------------------------------------------------------
def _small_components(source: np.ndarray, voxel_ml: float) -> list[np.ndarray]:
    """Crops (fraction, centred on their own bounding box) of the connected components of
    ``source >= 0.5`` whose volume lies in :data:`SHOWER_FOCUS_ML`."""
    binary = source >= 0.5
    if not binary.any():
        return []
    labels, count = ndimage.label(binary, structure=np.ones((3, 3, 3), bool))
    crops = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        size_ml = float((labels[box] == index).sum()) * voxel_ml
        if not SHOWER_FOCUS_ML[0] <= size_ml <= SHOWER_FOCUS_ML[1]:
            continue
        padded = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, source.shape, strict=True))
        own = ndimage.binary_dilation(labels[padded] == index, iterations=1)
        crops.append((source[padded] * own).astype(np.float32))
    return crops


def _paste(fraction: np.ndarray, crop: np.ndarray, center: np.ndarray) -> None:
    """Put ``crop`` (maximum) into ``fraction`` centred at ``center`` (k, j, i), clipped to the grid."""
    start = np.round(center - (np.asarray(crop.shape) - 1) / 2).astype(int)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.asarray(crop.shape), np.asarray(fraction.shape))
    if np.any(hi <= lo):
        return
    target = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    source = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
    fraction[target] = np.maximum(fraction[target], crop[source])


def _focus_severity(fraction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Severity of small foci: a strong core (0.7-1.0 per focus, +-15% texture) fading with the
    partial-volume fraction, so small emboli are conspicuous as on real DWI."""
    labels, count = ndimage.label(fraction >= 0.25, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return np.zeros(fraction.shape, np.float32)
    strength = np.concatenate([[0.0], rng.uniform(0.7, 1.0, count)]).astype(np.float32)
    texture = 1 + 0.15 * rng.standard_normal(fraction.shape).astype(np.float32)
    return np.clip(strength[labels] * np.clip(fraction * 1.6, 0, 1) * texture, 0, 1.2).astype(np.float32)


def _territory_region(template: Template, territory: int) -> np.ndarray:
    """Placement weight of foci in one territory: tissue with little CSF partial volume (CSF < 0.15),
    favouring the cortex and the grey-white junction."""
    tissue = ((template.gm + template.wm) > 0.5) & (template.csf < 0.15)
    return ((template.territory == territory) & tissue) * (0.4 + template.gm)


def embolic_shower(template: Template, rng: np.random.Generator, *, source: np.ndarray | None = None,
                   avoid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A cardio-embolic shower: 3-40 foci (log-uniform count) of 0.02-0.5 mL over 1-3 territories.

    Args:
        template: the working template.
        rng: random generator.
        source: a real lesion fraction on the template grid whose small components (0.02-0.5 mL)
            may be reused as foci (half of the foci when it has any), moved to new places.
        avoid: fraction map of lesion already present (foci are placed where it is below 0.05).

    Returns:
        (fraction float32 ``[k, j, i]``, severity float32, description).
    """
    shape = template.shape
    voxel_ml = float(template.spacing_mm) ** 3 / 1000.0
    n_territories = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    labels = list(_SHOWER_TERRITORIES)
    weights = np.asarray([_SHOWER_TERRITORIES[t] for t in labels])
    hemisphere = int(rng.integers(2))
    territories = []
    for _ in range(n_territories):
        side = hemisphere if rng.random() < 0.7 else 1 - hemisphere
        territories.append(int(labels[int(rng.choice(len(labels), p=weights / weights.sum()))]) + side)
    region = sum(_territory_region(template, t) for t in set(territories))
    if avoid is not None:
        region = region * (avoid <= 0.05)
    crops = _small_components(source, voxel_ml) if source is not None else []
    n_foci = int(round(_log_uniform(rng, SHOWER_COUNT)))
    fraction = np.zeros(shape, np.float32)
    reused = 0
    spacing = float(template.spacing_mm)
    for _ in range(n_foci):
        center = _pick(rng, region)
        if center is None:
            break
        if crops and rng.random() < 0.5:
            _paste(fraction, crops[int(rng.integers(len(crops)))], center)
            reused += 1
        else:
            radii = _radii(rng, _log_uniform(rng, SHOWER_FOCUS_ML), float(rng.uniform(0.8, 1.5)))
            box, w = _ellipsoid(shape, center, radii, spacing, spacing)
            fraction[box] = np.maximum(fraction[box], w)
    tissue = np.clip(template.gm + template.wm + 0.5 * template.csf, 0, 1)
    fraction = np.where(template.brain > 0.5, fraction * np.minimum(tissue * 1.5, 1.0), 0.0).astype(np.float32)
    severity = _focus_severity(fraction, rng)
    count = int(ndimage.label(fraction >= 0.5, structure=np.ones((3, 3, 3), bool))[1])
    description = {"n_foci_drawn": n_foci, "n_from_soop_components": reused, "territories": sorted(set(territories)),
                   "n_components": count, "volume_ml": float((fraction >= 0.5).sum() * voxel_ml)}
    return fraction, severity, description


def small_lesion(template: Template, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """A single small acute lesion of 0.02-1 mL (log-uniform) in a random territory's tissue.

    Returns:
        (fraction float32 ``[k, j, i]``, severity float32, description).
    """
    voxel_ml = float(template.spacing_mm) ** 3 / 1000.0
    labels = list(_SHOWER_TERRITORIES)
    weights = np.asarray([_SHOWER_TERRITORIES[t] for t in labels])
    territory = int(labels[int(rng.choice(len(labels), p=weights / weights.sum()))]) + int(rng.integers(2))
    fraction = np.zeros(template.shape, np.float32)
    center = _pick(rng, _territory_region(template, territory))
    volume = _log_uniform(rng, SMALL_LESION_ML)
    if center is not None:
        radii = _radii(rng, volume, float(rng.uniform(0.8, 1.6)))
        box, w = _ellipsoid(template.shape, center, radii, float(template.spacing_mm), float(template.spacing_mm))
        fraction[box] = w
    fraction = np.where(template.brain > 0.5, fraction, 0.0).astype(np.float32)
    severity = _focus_severity(fraction, rng)
    return fraction, severity, {"territory": territory, "volume_drawn_ml": volume,
                                "volume_ml": float((fraction >= 0.5).sum() * voxel_ml)}
