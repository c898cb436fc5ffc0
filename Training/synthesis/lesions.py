"""Acute lesions in template (MNI) space: real SOOP masks or procedural lesions in arterial territories.

Both sources return a :class:`Lesion`: a lesion fraction map (float32 ``[k, j, i]`` on the
template grid, partial volume at the border), a *severity* map in [0, 1] (1 = dense core,
small at the rim, with heterogeneous texture) and a description. The acquisition step
thresholds the resampled fraction at 0.5 to obtain the mask, so intensities and mask agree.

Procedural mix (ISLES 2022-like: median about 7 mL, many lesions under 1 mL, several
components, a few empty cases): single territorial infarcts, showers of small embolic
lesions, single small (lacunar) lesions in the deep territory, and empty cases.
"""

from __future__ import annotations

import csv
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from StrokePredictorLib.errors import InputImageError
from Training.synthesis.anatomy import TERRITORIES, Template, posterior_fossa_weight
from Training.synthesis.mimics import MimicMaps

logger = logging.getLogger(__name__)

#: Procedural lesion kinds and their probabilities.
LESION_MIX: dict[str, float] = {"territorial": 0.5, "embolic": 0.26, "small": 0.22, "empty": 0.02}
#: Territory probabilities for territorial infarcts (label -> weight before hemisphere choice).
_TERRITORY_WEIGHTS = {1: 0.62, 3: 0.08, 5: 0.16, 7: 0.09, 9: 0.05}


@dataclass
class Lesion:
    """An acute lesion on the template grid.

    Attributes:
        fraction: float32 ``[k, j, i]`` lesion fraction 0..1 (mask = fraction >= 0.5).
        severity: float32 ``[k, j, i]`` 0..1, depth-dependent lesion strength (1 = core).
        kind: "territorial", "embolic", "small", "empty" or "soop".
        territory: territory label (:data:`TERRITORIES`) of the largest component, 0 if none.
        source: SOOP participant id or "procedural".
        clinical: real clinical values that come with a SOOP lesion (age, sex, nihss, prior_stroke).
    """

    fraction: np.ndarray
    severity: np.ndarray
    kind: str
    territory: int
    source: str = "procedural"
    clinical: dict = field(default_factory=dict)

    def volume_ml(self, voxel_ml: float) -> float:
        return float((self.fraction >= 0.5).sum() * voxel_ml)

    def n_components(self) -> int:
        return int(ndimage.label(self.fraction >= 0.5, structure=np.ones((3, 3, 3)))[1])


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Gaussian random field with unit standard deviation, float32, smoothed by ``sigma_vox``."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    return field_ / max(float(field_.std()), 1e-6)


def severity_map(binary: np.ndarray, spacing_mm: float, rng: np.random.Generator,
                 rim_floor: float, core_depth_mm: float = 5.0) -> np.ndarray:
    """Depth-dependent lesion strength: ``rim_floor`` at the border rising to 1 at
    ``core_depth_mm`` inside, modulated by a smooth texture (+-20%)."""
    if not binary.any():
        return np.zeros(binary.shape, np.float32)
    texture = 1.0 + 0.2 * smooth_noise(rng, binary.shape, 1.0)
    # Distances are computed in the lesion's bounding box plus a margin: exact inside the lesion
    # (its border lies in the box) and outside up to the margin, beyond which the fade
    # rim_floor * exp(-distance / spacing) is below 5e-5 and is set to 0. Much faster than the
    # whole volume for the usual small lesions.
    margin = 10
    where = np.argwhere(binary)
    lo = np.maximum(where.min(axis=0) - margin, 0)
    hi = np.minimum(where.max(axis=0) + margin + 1, binary.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    crop = binary[box]
    depth = ndimage.distance_transform_edt(crop, sampling=spacing_mm).astype(np.float32)
    ramp = np.clip((depth - spacing_mm * 0.5) / core_depth_mm, 0, 1) ** 0.8
    inside = (rim_floor + (1.0 - rim_floor) * ramp) * texture[box]
    # let the strength fade smoothly just outside the mask, for partial volume
    outside = ndimage.distance_transform_edt(~crop, sampling=spacing_mm).astype(np.float32)
    sev = np.zeros(binary.shape, np.float32)
    sev[box] = np.where(crop, inside, rim_floor * np.exp(-outside / spacing_mm))
    return np.clip(sev, 0, 1.2).astype(np.float32)


def _fraction(binary: np.ndarray) -> np.ndarray:
    """Binary mask -> partial-volume fraction whose 0.5 level set is the mask border."""
    frac = ndimage.gaussian_filter(binary.astype(np.float32), 0.6)
    frac = np.where(binary, np.maximum(frac, 0.55), np.minimum(frac, 0.45))
    return frac.astype(np.float32)


def _blob(template: Template, rng: np.random.Generator, center: np.ndarray, volume_ml: float,
          allowed: np.ndarray, irregularity: float) -> np.ndarray:
    """A smooth irregular blob of about ``volume_ml`` around ``center`` (k, j, i voxels), inside ``allowed``."""
    voxel_ml = template.spacing_mm ** 3 / 1000.0
    n_target = max(1, int(round(volume_ml / voxel_ml)))
    radius = (3 * n_target / (4 * np.pi)) ** (1 / 3) + 2
    half = int(np.ceil(radius * 1.8)) + 2
    lo = np.maximum(np.round(center).astype(int) - half, 0)
    hi = np.minimum(np.round(center).astype(int) + half + 1, np.asarray(template.shape))
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij"))
    axes = rng.uniform(0.7, 1.4, 3)
    dist = np.sqrt((((grid - center[:, None, None, None]) / axes[:, None, None, None]) ** 2).sum(0))
    shape = grid.shape[1:]
    score = -dist / max(radius, 1.0) + irregularity * smooth_noise(rng, shape, max(1.0, radius / 3))
    score = np.where(allowed[box], score, -np.inf)
    out = np.zeros(template.shape, bool)
    finite = np.isfinite(score)
    if not finite.any():
        return out
    n = min(n_target, int(finite.sum()))
    threshold = np.partition(score[finite], -n)[-n]
    region = score >= threshold
    # keep the component that contains the most voxels (a blob, not scattered points)
    labels, count = ndimage.label(region)
    if count > 1:
        sizes = ndimage.sum(region, labels, range(1, count + 1))
        region = labels == (1 + int(np.argmax(sizes)))
    out[box] = region
    return out


def _random_point(rng: np.random.Generator, where: np.ndarray) -> np.ndarray | None:
    idx = np.flatnonzero(where)
    if idx.size == 0:
        return None
    return np.asarray(np.unravel_index(idx[rng.integers(idx.size)], where.shape), dtype=float)


def procedural_lesion(template: Template, rng: np.random.Generator, *, kind: str | None = None,
                      empty_fraction: float | None = None) -> Lesion:
    """Draw a procedural acute lesion in an arterial territory.

    Args:
        template: the working template.
        rng: random generator.
        kind: force a kind ("territorial", "embolic", "small", "empty"); random by :data:`LESION_MIX` if None.
        empty_fraction: probability of an empty case (overrides the mix's value when given).
    """
    mix = dict(LESION_MIX)
    if empty_fraction is not None:
        mix["empty"] = float(empty_fraction)
    names = list(mix)
    weights = np.asarray([mix[n] for n in names], float)
    kind = kind or names[int(rng.choice(len(names), p=weights / weights.sum()))]
    tissue = (template.gm + template.wm) > 0.5
    voxel_ml = template.spacing_mm ** 3 / 1000.0
    binary = np.zeros(template.shape, bool)
    territory = 0
    if kind == "territorial":
        labels = list(_TERRITORY_WEIGHTS)
        w = np.asarray([_TERRITORY_WEIGHTS[t] for t in labels])
        territory = labels[int(rng.choice(len(labels), p=w / w.sum()))] + int(rng.integers(2))
        allowed = tissue & (template.territory == territory)
        volume = float(np.clip(rng.lognormal(np.log(20.0), 0.9), 1.5, 200.0))
        center = _random_point(rng, ndimage.binary_erosion(allowed, iterations=1) if allowed.sum() > 50 else allowed)
        if center is not None:
            binary = _blob(template, rng, center, volume, allowed, irregularity=0.35)
    elif kind == "embolic":
        hemi = int(rng.integers(2))
        n = int(rng.integers(2, 9))
        for _ in range(n):
            t = int(rng.choice([1, 1, 1, 3, 5, 9, 7])) + (hemi if rng.random() < 0.8 else 1 - hemi)
            allowed = tissue & (template.territory == t)
            center = _random_point(rng, allowed)
            if center is not None:
                binary |= _blob(template, rng, center, float(rng.lognormal(np.log(0.4), 0.9)), allowed, 0.25)
        territory = 1 + hemi
    elif kind == "small":
        t = int(rng.choice([9, 9, 1, 7, 5, 3])) + int(rng.integers(2))
        allowed = tissue & (template.territory == t)
        center = _random_point(rng, allowed)
        if center is not None:
            binary = _blob(template, rng, center, float(np.clip(rng.lognormal(np.log(0.8), 0.8), 0.05, 4.0)),
                           allowed, 0.2)
        territory = t
    if kind != "empty" and binary.sum() * voxel_ml < 0.01:
        binary[:] = False
    rim_floor = float(rng.uniform(0.15, 0.5))
    frac = _fraction(binary) if binary.any() else np.zeros(template.shape, np.float32)
    return Lesion(frac, severity_map(binary, template.spacing_mm, rng, rim_floor), kind if binary.any() else "empty",
                  territory if binary.any() else 0)


# ----------------------------------------------------------------------------------------
# SOOP library
# ----------------------------------------------------------------------------------------
_SOOP_FILE = re.compile(r"^bwsr(sub-\d+)_lesion\.nii(\.gz)?$")


@dataclass(frozen=True)
class SoopLibrary:
    """The SOOP lesion library: file per participant and their clinical values."""

    root: Path
    files: tuple[tuple[str, Path], ...]
    participants: dict

    def __len__(self) -> int:
        return len(self.files)


def _number(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if np.isnan(value) else value


@functools.lru_cache(maxsize=2)
def load_soop(root: str | Path) -> SoopLibrary:
    """Index the SOOP library in ``root`` (``lesions/bwsrsub-<ID>_lesion.nii.gz`` and ``participants.tsv``).

    Raises:
        InputImageError: the folder, its ``lesions`` sub-folder or ``participants.tsv`` is missing.
    """
    root = Path(root)
    table = root / "participants.tsv"
    lesion_dir = root / "lesions"
    if not table.is_file() or not lesion_dir.is_dir():
        raise InputImageError(
            f"Lesion library {root} must contain participants.tsv and a lesions/ folder "
            "(bwsrsub-<ID>_lesion.nii.gz); see ../shared/data/soop/README.md."
        )
    participants: dict[str, dict] = {}
    with table.open(newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            sex = (row.get("sex") or "").strip().upper()
            prior = _number(row.get("priorstroke"))
            participants[row["participant_id"]] = {
                "age": _number(row.get("age")),
                "sex": sex if sex in ("F", "M") else None,
                "nihss": _number(row.get("nihss")),
                "prior_stroke": None if prior is None else ("yes" if prior >= 0.5 else "no"),
            }
    files = []
    for path in sorted(lesion_dir.iterdir()):
        match = _SOOP_FILE.match(path.name)
        if match:
            files.append((match.group(1), path))
    if not files:
        raise InputImageError(f"Lesion library {lesion_dir} holds no bwsrsub-<ID>_lesion.nii.gz file.")
    logger.info("SOOP library %s: %d lesion masks, %d participants.", root, len(files), len(participants))
    return SoopLibrary(root, tuple(files), participants)


def resample_to_template(array_ijk: np.ndarray, affine: np.ndarray, template: Template, order: int = 1) -> np.ndarray:
    """Resample a nibabel-ordered ``[i, j, k]`` array with RAS ``affine`` onto the template grid
    (``[k, j, i]``) by world position (linear by default; 0 outside)."""
    # template voxel (i, j, k) -> RAS -> source voxel
    to_source = np.linalg.inv(affine) @ template.geometry.ijk_to_ras
    shape = template.shape
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    coords = [to_source[r, 0] * i + to_source[r, 1] * j + to_source[r, 2] * k + to_source[r, 3] for r in range(3)]
    return ndimage.map_coordinates(array_ijk.astype(np.float32), coords, order=order, mode="constant", cval=0.0)


def soop_lesion(library: SoopLibrary, template: Template, rng: np.random.Generator, index: int | None = None) -> Lesion:
    """Load one SOOP lesion (random, or ``index``) onto the template grid with its participant's values."""
    import nibabel as nib

    if index is None:
        index = int(rng.integers(len(library.files)))
    participant, path = library.files[index]
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # noqa: BLE001 - any reader failure names the file
        raise InputImageError(f"SOOP lesion {path} could not be read: {error}") from None
    # block-average the 1 mm mask to the working spacing first (partial volume), then resample
    sigma = max(template.spacing_mm / 2.355, 0.01)
    smooth = ndimage.gaussian_filter((data > 0.5).astype(np.float32), sigma)
    frac = np.clip(resample_to_template(smooth, image.affine, template), 0, 1)
    binary = frac >= 0.5
    frac = np.where(binary, np.maximum(frac, 0.5), np.minimum(frac, 0.49)).astype(np.float32)
    territory = 0
    if binary.any():
        labels = template.territory[binary]
        labels = labels[labels > 0]
        territory = int(np.bincount(labels).argmax()) if labels.size else 0
    rim_floor = float(rng.uniform(0.15, 0.5))
    clinical = dict(library.participants.get(participant, {}))
    return Lesion(frac, severity_map(binary, template.spacing_mm, rng, rim_floor), "soop", territory, participant,
                  clinical)


def territory_name(label: int) -> str:
    return TERRITORIES.get(int(label), "none")


# ----------------------------------------------------------------------------------------
# Mimics: bright non-lesion findings
# ----------------------------------------------------------------------------------------
@dataclass
class Mimics:
    """Non-lesion findings on the template grid (float32 fractions ``[k, j, i]``).

    Attributes:
        shine: T2 shine-through (vasogenic/chronic T2-bright tissue): bright on DWI and FLAIR,
            ADC normal or raised.
        wmh: periventricular/deep white-matter hyperintensities (FLAIR bright, ADC raised).
        chronic: old infarct (CSF-like ADC, dark DWI, FLAIR bright rim).
        artefact: susceptibility-like DWI artefact near the skull base (DWI bright, ADC normal).
        regional: broad regional DWI hyperintensity (relative S0 gain >= 0: DWI bright, ADC
            unchanged), or None; see :func:`draw_regional`.
        cerebellar: the posterior fossa's own tissue values, or None; see :func:`draw_cerebellar`.
        scan: the real-scan mimics of :mod:`Training.synthesis.mimics` (kind and weight maps and their
            multipliers), or None.
        scan_noise: unit-sd smooth field for the extra ADC noise of ``scan`` (or None).
    """

    shine: np.ndarray
    wmh: np.ndarray
    chronic: np.ndarray
    artefact: np.ndarray
    description: dict = field(default_factory=dict)
    regional: np.ndarray | None = None
    cerebellar: CerebellarTissue | None = None
    scan: MimicMaps | None = None
    scan_noise: np.ndarray | None = None

    def scan_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(S0, ADC, FLAIR) multiplier maps of the real-scan mimics, or None without them."""
        return None if self.scan is None else self.scan.factor_maps(self.scan_noise)


@dataclass(frozen=True)
class CerebellarTissue:
    """Grey-matter ADC and FLAIR gain below the tentorium (see :func:`draw_cerebellar`).

    Attributes:
        fossa: float32 ``[k, j, i]`` posterior-fossa weight (0..1, soft edge) on the template grid.
        gm_adc_mm2s: ADC of the cerebellar cortex before scanner variability (mm^2/s).
        flair_gain: FLAIR multiplier in the posterior fossa.
    """

    fossa: np.ndarray
    gm_adc_mm2s: float
    flair_gain: float

    def gm_adc(self, cerebral_gm_adc: float, scanner: float) -> np.ndarray:
        """Grey-matter ADC map: the cerebral value outside the fossa, the cerebellar one inside."""
        return (cerebral_gm_adc * (1 - self.fossa) + self.gm_adc_mm2s * scanner * self.fossa).astype(np.float32)

    def flair(self, flair: np.ndarray) -> np.ndarray:
        return flair * (1 + (self.flair_gain - 1) * self.fossa)


def draw_cerebellar(template: Template, rng: np.random.Generator,
                    probability: float) -> tuple[CerebellarTissue | None, dict]:
    """With probability ``probability``, give the cerebellar cortex its own ADC, 0.60-0.85 x10^-3
    mm^2/s (real: mean 0.68, range 0.59-0.82, Peker et al. 2019; the cerebral cortex's 0.89,
    Helenius et al., AJNR 2002), so that it is bright on DWI with a low-normal ADC as in real scans,
    and a FLAIR gain of 1.0-1.3 below the tentorium; otherwise None. Draw it from its own random
    stream so the rest of a case is unchanged."""
    if probability <= 0 or rng.random() >= probability:
        return None, {}
    fossa = posterior_fossa_weight(template.territory)
    tissue = CerebellarTissue(fossa, float(rng.uniform(0.60e-3, 0.85e-3)),
                              float(rng.uniform(1.0, 1.3)))
    return tissue, {"gm_adc_mm2s": tissue.gm_adc_mm2s, "flair_gain": tissue.flair_gain,
                    "fossa_ml": float((fossa > 0.5).sum() * template.spacing_mm ** 3 / 1000)}


def draw_regional(template: Template, rng: np.random.Generator, probability: float) -> tuple[np.ndarray | None, dict]:
    """Broad regional DWI hyperintensities with normal ADC, as real DWI shows them (brightening of the
    inferior brain toward the skull base, large soft bright regions from coil and susceptibility
    effects): a relative S0 gain (so b0 and b-image rise together and the ADC is unchanged).

    With probability ``probability`` a case gets an inferior brightening (gain 0.15-0.6, a smooth
    step at 40-10 mm below the MNI origin, half of such cases) and/or large soft blobs (gain up to
    0.6); otherwise None. Draw it from its own random stream so the rest of a case is unchanged.

    Returns:
        (gain map on the template grid or None, description).
    """
    if probability <= 0 or rng.random() >= probability:
        return None, {}
    shape = template.shape
    z = template.geometry.ijk_to_ras[2, 3] + np.arange(shape[0]) * template.spacing_mm
    gain = np.zeros(shape, np.float32)
    description: dict = {}
    if rng.random() < 0.5:
        inferior = float(rng.uniform(0.15, 0.6))
        level, width = float(rng.uniform(-40.0, -10.0)), float(rng.uniform(4.0, 12.0))
        step = 1.0 / (1.0 + np.exp(-(level - z) / width))
        gain += (inferior * step)[:, None, None].astype(np.float32)
        description["inferior_gain"], description["inferior_level_mm"] = inferior, level
    blobs = float(rng.uniform(0.1, 0.6))
    gain += blobs * np.clip(smooth_noise(rng, shape, 10.0 / template.spacing_mm) - 1.2, 0, None)
    description["blob_gain"] = blobs
    gain *= (template.brain > 0.5)
    description["regional_ml"] = float((gain > 0.1).sum() * template.spacing_mm ** 3 / 1000)
    return gain.astype(np.float32), description


def draw_mimics(template: Template, rng: np.random.Generator, lesion: Lesion, *, age: float,
                prior_stroke: bool, rate: float = 1.0) -> Mimics:
    """Draw mimics away from the acute lesion. ``rate`` scales how often each occurs."""
    shape = template.shape
    free = (lesion.fraction < 0.05) & ((template.gm + template.wm) > 0.5)
    description: dict = {}
    shine = np.zeros(shape, np.float32)
    n_shine = int(rng.poisson(0.8 * rate))
    for _ in range(n_shine):
        c = _random_point(rng, free)
        if c is not None:
            shine = np.maximum(shine, _fraction(_blob(template, rng, c, float(rng.lognormal(np.log(0.4), 0.7)), free,
                                                      0.3)) * rng.uniform(0.5, 1.0))
    description["t2_shine_through_blobs"] = n_shine
    wmh = np.zeros(shape, np.float32)
    if rng.random() < rate * np.clip((age - 45) / 40, 0.05, 0.9):
        near_ventricles = ndimage.binary_dilation(template.csf > 0.7, iterations=max(1, int(6 / template.spacing_mm)))
        field_ = smooth_noise(rng, shape, 2.0 / template.spacing_mm * 2)
        load = rng.uniform(0.5, 2.0)
        wmh = np.clip((field_ - 2.2 + 0.6 * load) * 1.5, 0, 1) * (near_ventricles & (template.wm > 0.5))
        wmh = ndimage.gaussian_filter(wmh.astype(np.float32), 0.5)
        description["wmh_ml"] = float((wmh > 0.5).sum() * template.spacing_mm ** 3 / 1000)
    chronic = np.zeros(shape, np.float32)
    if prior_stroke and rng.random() < 0.6 * rate:
        c = _random_point(rng, free & (template.territory > 0))
        if c is not None:
            chronic = _fraction(_blob(template, rng, c, float(rng.lognormal(np.log(3.0), 0.8)), free, 0.3))
            description["chronic_infarct_ml"] = float((chronic >= 0.5).sum() * template.spacing_mm ** 3 / 1000)
    artefact = np.zeros(shape, np.float32)
    if rng.random() < 0.35 * rate:
        ras_z = template.geometry.ijk_to_ras[2, 3] + np.arange(shape[0]) * template.spacing_mm
        low = (ras_z < -10)[:, None, None] & (template.brain > 0.5)
        edge = low & ~ndimage.binary_erosion(template.brain > 0.5, iterations=max(1, int(6 / template.spacing_mm)))
        c = _random_point(rng, edge)
        if c is not None:
            artefact = _fraction(_blob(template, rng, c, float(rng.uniform(1.0, 6.0)), template.brain > 0.5, 0.5))
            artefact *= float(rng.uniform(0.4, 1.0))
            description["susceptibility_artefact"] = True
    return Mimics(shine, wmh.astype(np.float32), chronic, artefact, description)
