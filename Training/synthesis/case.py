"""One synthetic case, in memory: anatomy + lesion + clinical -> warped -> scanner grids -> signal.

:func:`synthesize_case` is the whole generator for one case and returns arrays (no files), so a
training loop can synthesise on the fly; ``Training.synthesis.generate`` writes its result in the ISLES
2022 layout. Steps (every random choice is drawn from ``np.random.default_rng([seed, index])``
and recorded in :attr:`SyntheticCase.metadata`, so a case is reproducible on its own):

1. template anatomy (MNI152 2009c, :mod:`Training.synthesis.anatomy`) at the working spacing;
2. acute lesion: a real SOOP mask (with its participant's age, sex, NIHSS, prior stroke) or a
   procedural lesion in an arterial territory; mimics; clinical record and hidden state;
3. simulated follow-up infarct (:mod:`Training.synthesis.outcome`);
4. noise-free template-space images (:mod:`Training.synthesis.physics`, physical or randomised);
5. random affine + smooth non-rigid deformation (subject anatomy);
6. head pose and scanner grids: DWI/ADC/masks on one grid, FLAIR on its own grid with a random
   rigid offset from the DWI (``flair_transform``: DWI point -> FLAIR point, LPS mm);
7. signal formation on the scanner grids: bias field, Rician noise, ADC from the noisy b0/b
   pair, skull stripping (optional), small negative interpolation values; randomised mode adds
   random resolution/slice thickness, several noise kinds, gamma and blur.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from StrokePredictorLib.clinical import ClinicalRecord
from StrokePredictorLib.io import Geometry, Volume
from Training.synthesis import acquisition as acq
from Training.synthesis.anatomy import Template, brain_center_lps, load_template
from Training.synthesis.clinical_sim import simulate_clinical
from Training.synthesis.lesions import (
    Lesion,
    draw_cerebellar,
    draw_mimics,
    draw_regional,
    load_soop,
    procedural_lesion,
    smooth_noise,
    soop_lesion,
    territory_name,
)
from Training.synthesis.mimics import draw_mimic_maps, embolic_shower, small_lesion
from Training.synthesis.outcome import outcome_fraction, scenario_volumes
from Training.synthesis.physics import physical_images, randomized_images

logger = logging.getLogger(__name__)

MODES = ("physical", "randomized")
#: ADC unit scales written at random: name -> factor from mm^2/s to the written value.
ADC_SCALES: dict[str, float] = {"mm2/s": 1.0, "1e-3 mm2/s": 1e3, "1e-6 mm2/s": 1e6}


@dataclass(frozen=True)
class SynthesisParams:
    """Everything that shapes a synthetic case besides the seed (recorded in dataset.json)."""

    mode: str = "physical"                 # "physical" or "randomized"
    ood: bool = False                      # out-of-distribution resolutions, contrasts, noise; not skull-stripped
    skull: bool = False                    # keep skull and scalp (non-skull-stripped images)
    tiny: bool = False                     # tiny grids and a 4 mm template (test fixtures)
    work_mm: int = 2                       # template working spacing (mm, whole number)
    lesions: str | None = None             # SOOP lesion library folder; None = procedural lesions
    empty_fraction: float = 0.02           # probability of a case without lesion
    wakeup_fraction: float = 0.22          # probability of an unknown (wake-up) onset
    flair_rotation_deg: tuple[float, float] = (2.0, 8.0)   # range of the FLAIR-to-DWI rotation
    flair_translation_mm: tuple[float, float] = (1.0, 6.0)  # range of the FLAIR-to-DWI shift
    head_rotation_deg: float = 6.0         # maximum head rotation in the DWI scanner frame
    noise: bool = True                     # False: noise-free images (tests of the signal model)
    mimic_rate: float = 1.0                # scales how often mimics occur
    regional_mimics: float = 0.0           # probability of a broad regional DWI hyperintensity (normal ADC)
    cerebellar_adc: float = 0.0            # probability of the cerebellar cortex's own (lower) ADC
    scan_mimics: float = 0.0               # probability of the real-scan mimics (Training.synthesis.mimics)
    showers: float = 0.0                   # probability that a lesion gains (or becomes) an embolic shower
    small_lesions: float = 0.0             # probability that a lesion becomes a single small one (0.02-1 mL)
    adc_unit: str | None = None            # force one ADC unit scale (None: random of three)
    lesion_kind: str | None = None         # force a procedural lesion kind (territorial, embolic, small, empty)
    dwi_grid: str | None = None            # force a DWI grid by name (acquisition.DWI_GRIDS)
    flair_grid: str | None = None          # force a FLAIR grid by name (acquisition.FLAIR_GRIDS)
    intensity_seed: int | None = None      # seed of the intensity stream only (None: from seed and index)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'.")
        if self.adc_unit is not None and self.adc_unit not in ADC_SCALES:
            raise ValueError(f"adc_unit must be one of {', '.join(ADC_SCALES)}, got '{self.adc_unit}'.")
        if not 0 <= self.empty_fraction <= 1 or not 0 <= self.wakeup_fraction <= 1:
            raise ValueError("empty_fraction and wakeup_fraction must lie in [0, 1].")
        for name in ("scan_mimics", "showers", "small_lesions"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}.")
        if self.showers + self.small_lesions > 1.0:
            raise ValueError(f"showers + small_lesions must not exceed 1, got {self.showers + self.small_lesions}.")

    @property
    def skull_stripped(self) -> bool:
        return not (self.skull or self.ood)

    def template_mm(self) -> int:
        return 4 if self.tiny else int(self.work_mm)

    def to_dict(self) -> dict:
        """Every field; the opt-in options of :data:`OPT_IN` only when they are on, so that the
        dataset.json of an earlier dataset is reproduced byte for byte."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if not (k in OPT_IN and not v)}


#: Options added after datasets had been published; recorded only when on (own random streams:
#: scan_mimics 5, showers and small_lesions 6).
OPT_IN = ("scan_mimics", "showers", "small_lesions")


@dataclass
class SyntheticCase:
    """One generated case.

    Attributes:
        case_id: e.g. ``sub-strokecase0001``.
        dwi, adc, flair: volumes (float64 DWI/ADC, float32 FLAIR); ADC in unit ``adc_unit``.
        mask: uint8 ``[k, j, i]`` acute lesion on the DWI grid.
        outcome: uint8 ``[k, j, i]`` simulated follow-up infarct on the DWI grid (contains ``mask``).
        clinical: the reported clinical record (with missing values).
        flair_transform: 4x4 LPS matrix mapping a DWI-world point to the FLAIR-world point of
            the same anatomy (what a rigid FLAIR->DWI registration must recover).
        metadata: every drawn parameter (JSON-serialisable).
    """

    case_id: str
    dwi: Volume
    adc: Volume
    flair: Volume
    mask: np.ndarray
    outcome: np.ndarray
    clinical: ClinicalRecord
    flair_transform: np.ndarray
    adc_unit: str
    b_value: float
    metadata: dict = field(default_factory=dict)

    @property
    def adc_mm2s(self) -> np.ndarray:
        """ADC in mm^2/s (float64 ``[k, j, i]``)."""
        return self.adc.array / ADC_SCALES[self.adc_unit]


def case_id_for(index: int) -> str:
    """ISLES-style case id: 1 -> ``sub-strokecase0001``."""
    return f"sub-strokecase{index:04d}"


# ----------------------------------------------------------------------------------------
# Deformation
# ----------------------------------------------------------------------------------------
def deformation_coordinates(template: Template, rng: np.random.Generator, *, scale: float, rotation_deg: float,
                            shear: float, nonlinear_mm: float) -> tuple[np.ndarray, dict]:
    """Template voxel coordinates (float32 ``(3, K, J, I)``, k/j/i order) of every subject voxel
    under a random affine (about the brain centre) plus a smooth displacement field."""
    geometry = template.geometry
    center = brain_center_lps(template)
    scales = rng.uniform(1 - scale, 1 + scale, 3)
    rot = acq.rotation_matrix(rng.uniform(-rotation_deg, rotation_deg, 3))
    sh = np.eye(3) + np.triu(rng.uniform(-shear, shear, (3, 3)), 1)
    linear = rot @ np.diag(scales) @ sh
    coarse_shape = (5, 6, 5)
    disp = rng.standard_normal((3, *coarse_shape)).astype(np.float32) * nonlinear_mm
    shape = template.shape
    disp_full = np.stack([acq.smooth_upsample(d, shape) for d in disp])
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    m = geometry.ijk_to_lps
    pts = [m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] - center[r] for r in range(3)]
    moved = [sum(linear[r, c] * pts[c] for c in range(3)) + center[r] + disp_full[r] for r in range(3)]
    inv = np.linalg.inv(m)
    idx = [sum(inv[r, c] * moved[c] for c in range(3)) + inv[r, 3] for r in range(3)]  # i, j, k
    coords = np.stack([idx[2], idx[1], idx[0]]).astype(np.float32)
    info = {"scales": scales.tolist(), "linear": linear.tolist(), "nonlinear_mm": nonlinear_mm}
    return coords, info


def warp(array: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(array, coords, order=1, mode="constant", cval=0.0, prefilter=False)


# ----------------------------------------------------------------------------------------
# Signal on the scanner grid
# ----------------------------------------------------------------------------------------
def _degrade_resolution(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Random acquisition resolution / slice thickness, resampled back (randomised mode)."""
    factors = np.array([rng.uniform(1.0, 3.0), rng.uniform(1.0, 1.8), rng.uniform(1.0, 1.8)])  # k, j, i
    blurred = ndimage.gaussian_filter(image, np.maximum(factors - 1, 0) * 0.5 + 0.01)
    small = ndimage.zoom(blurred, 1.0 / factors, order=1, grid_mode=True, mode="nearest")
    back = ndimage.zoom(small, [s / t for s, t in zip(image.shape, small.shape, strict=True)], order=1,
                        grid_mode=True, mode="nearest")
    return back[: image.shape[0], : image.shape[1], : image.shape[2]].astype(np.float32), {
        "resolution_factors_kji": factors.tolist()}


def _randomize_contrast(image: np.ndarray, brain: np.ndarray, rng: np.random.Generator, *,
                        noise: bool, ood: bool) -> tuple[np.ndarray, dict]:
    """Bias, one of several noise kinds, gamma and partial-volume blur (randomised mode)."""
    info: dict = {}
    ref = float(np.percentile(image[brain], 99)) if brain.any() else float(image.max() or 1.0)
    image = image / max(ref, 1e-6)
    bias = float(rng.uniform(0.0, 0.6 if ood else 0.4))
    image = image * acq.bias_field(rng, image.shape, bias)
    info["bias_strength"] = bias
    blur = float(rng.uniform(0.0, 1.0))
    image = ndimage.gaussian_filter(image, blur) if blur > 0.05 else image
    info["blur_sigma_vox"] = blur
    if noise:
        kind = str(rng.choice(["gaussian", "rician", "correlated"]))
        sigma = float(rng.uniform(0.01, 0.15 if ood else 0.08))
        if kind == "gaussian":
            image = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
        elif kind == "rician":
            image = acq.rician(image, sigma, rng)
        else:
            image = image + sigma * acq.correlated_noise(rng, image.shape, float(rng.uniform(0.7, 1.5)))
        info.update({"noise_kind": kind, "noise_sigma": sigma})
    gamma = float(np.exp(rng.normal(0.0, 0.25)))
    image = np.clip(image, 0, None) ** gamma
    info["gamma"] = gamma
    return image.astype(np.float32), info


def _negatives(image: np.ndarray, keep: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A few dozen slightly negative voxels just outside the brain border (spline-interpolation
    undershoot, as in the ISLES 2022 files)."""
    shell = np.flatnonzero(ndimage.binary_dilation(keep) & ~keep)
    if shell.size == 0:
        return image
    count = min(int(rng.integers(10, 80)), shell.size)
    chosen = rng.choice(shell, size=count, replace=False)
    reference = float(np.percentile(image[keep], 50)) if keep.any() else 1.0
    image = image.copy()
    image.flat[chosen] = -reference * rng.uniform(0.001, 0.02, count)
    return image


def _named(name: str, grids: tuple[acq.GridSpec, ...]) -> acq.GridSpec:
    for grid in grids:
        if grid.name == name:
            return grid
    raise ValueError(f"Unknown grid '{name}'; known: {', '.join(g.name for g in grids)}.")


def _grid(name: str | None, params: SynthesisParams, rng: np.random.Generator, normal: tuple[acq.GridSpec, ...],
          ood: tuple[acq.GridSpec, ...], tiny: tuple[acq.GridSpec, ...]) -> acq.GridSpec:
    """A named grid, the tiny one, or one drawn from the normal or out-of-distribution variety."""
    if name:
        return _named(name, normal + ood + tiny)
    if params.tiny:
        return tiny[0]
    return acq.choose(rng, ood if params.ood else normal)


def _flair_grid(params: SynthesisParams, rng: np.random.Generator) -> acq.GridSpec:
    return _grid(params.flair_grid, params, rng, acq.FLAIR_GRIDS, acq.OOD_FLAIR_GRIDS, acq.TINY_FLAIR_GRIDS)


def _dwi_grid(params: SynthesisParams, rng: np.random.Generator) -> acq.GridSpec:
    return _grid(params.dwi_grid, params, rng, acq.DWI_GRIDS, acq.OOD_DWI_GRIDS, acq.TINY_DWI_GRIDS)


def _lesion(params: SynthesisParams, template: Template, rng: np.random.Generator) -> Lesion:
    if params.lesions:
        library = load_soop(str(params.lesions))
        if rng.random() < params.empty_fraction:
            lesion = procedural_lesion(template, rng, kind="empty")
            lesion.source = "soop-empty"
            return lesion
        return soop_lesion(library, template, rng)
    return procedural_lesion(template, rng, kind=params.lesion_kind, empty_fraction=params.empty_fraction)


def _shower_or_small(params: SynthesisParams, template: Template, lesion: Lesion,
                     rng: np.random.Generator) -> tuple[Lesion, dict]:
    """With ``small_lesions``, replace a non-empty lesion by a single small one; with ``showers``,
    give it a cardio-embolic shower (:mod:`Training.synthesis.mimics`), which replaces it in half of the
    cases. The source lesion's own small components may serve as shower foci."""
    if not (lesion.fraction >= 0.5).any():
        return lesion, {}
    choice = rng.random()
    if choice < params.small_lesions:
        fraction, severity, info = small_lesion(template, rng)
        return Lesion(fraction, severity, "small", int(info["territory"]), "small"), {"small_lesion": info}
    if choice < params.small_lesions + params.showers:
        replace = bool(rng.random() < 0.5)
        fraction, severity, info = embolic_shower(template, rng, source=lesion.fraction,
                                                  avoid=None if replace else lesion.fraction)
        info["replaces_lesion"] = replace
        if replace:
            territory = int(info["territories"][0]) if info["territories"] else 0
            return Lesion(fraction, severity, "embolic", territory, "shower"), {"embolic_shower": info}
        joined = Lesion(np.maximum(lesion.fraction, fraction), np.maximum(lesion.severity, severity), lesion.kind,
                        lesion.territory, lesion.source, lesion.clinical)
        return joined, {"embolic_shower": info}
    return lesion, {}


def synthesize_case(index: int, seed: int, params: SynthesisParams | None = None) -> SyntheticCase:
    """Synthesise case number ``index`` (1-based) of the dataset with ``seed``, in memory.

    The result depends only on ``(seed, index, params)``, not on other cases or workers. Three
    independent random streams are used: anatomy (lesion, clinical values, mimics, outcome),
    geometry (deformation, head pose, grids, FLAIR offset) and intensity (contrasts, noise, bias,
    ADC unit), so intensity randomisation never moves a mask (``intensity_seed`` replaces the
    intensity stream alone).

    Returns:
        :class:`SyntheticCase` (volumes on their scanner grids, masks, clinical record, metadata).
    """
    params = params or SynthesisParams()
    rng = np.random.default_rng([int(seed), int(index), 0])
    geo = np.random.default_rng([int(seed), int(index), 1])
    irng = np.random.default_rng([int(seed), int(index), 2] if params.intensity_seed is None
                                 else [int(params.intensity_seed), int(index), 2])
    template = load_template(params.template_mm())
    voxel_ml = template.spacing_mm ** 3 / 1000.0
    skull = not params.skull_stripped
    # -- lesion, clinical, mimics, outcome (template space) -----------------------------
    lesion = _lesion(params, template, rng)
    lesion_extra: dict = {}
    if params.showers > 0 or params.small_lesions > 0:  # own random stream: off, nothing else changes
        lesion, lesion_extra = _shower_or_small(params, template, lesion,
                                                np.random.default_rng([int(seed), int(index), 6]))
    volume = lesion.volume_ml(voxel_ml)
    record, hidden = simulate_clinical(rng, kind=lesion.kind, volume_ml=volume, territory=lesion.territory,
                                       real=lesion.clinical if lesion.source.startswith("sub-") else None,
                                       wakeup_fraction=params.wakeup_fraction)
    age = record["age"] if record["age"] is not None else 70.0
    mimics = draw_mimics(template, rng, lesion, age=float(age), prior_stroke=record["prior_stroke"] == "yes",
                         rate=params.mimic_rate)
    # own random stream: with regional_mimics = 0 every other draw, and so every file, is unchanged
    mimics.regional, regional_info = draw_regional(template, np.random.default_rng([int(seed), int(index), 3]),
                                                   params.regional_mimics)
    if regional_info:
        mimics.description["regional_dwi_hyperintensity"] = regional_info
    mimics.cerebellar, cerebellar_info = draw_cerebellar(template, np.random.default_rng([int(seed), int(index), 4]),
                                                         params.cerebellar_adc)
    if cerebellar_info:
        mimics.description["cerebellar_cortex"] = cerebellar_info
    if params.scan_mimics > 0:  # own random stream, as above
        scan_rng = np.random.default_rng([int(seed), int(index), 5])
        if scan_rng.random() < params.scan_mimics:
            mimics.scan = draw_mimic_maps(template, scan_rng, avoid=lesion.fraction)
            mimics.scan_noise = smooth_noise(scan_rng, template.shape, 0.7)
            mimics.description["real_scan_mimics"] = mimics.scan.description
    outcome_noise = smooth_noise(rng, template.shape, 1.5)
    outcome_frac, outcome_info = outcome_fraction(
        template, lesion.fraction, nihss=hidden.nihss, onset_h=hidden.onset_h, treatment=hidden.treatment,
        collateral=hidden.collateral, glucose=hidden.glucose, noise=outcome_noise)
    # the growth check's reference scenarios (no random draw: every other value is unchanged)
    scenarios = scenario_volumes(template, lesion.fraction, collateral=hidden.collateral, glucose=hidden.glucose,
                                 noise=outcome_noise)
    # -- images in template space --------------------------------------------------------
    make = physical_images if params.mode == "physical" else randomized_images
    images, signal_info = make(template, lesion, mimics, hidden, irng, skull=skull, ood=params.ood)
    b_value = float(signal_info["b_value"])
    # -- subject anatomy: random affine + non-rigid ----------------------------------------
    randomized = params.mode == "randomized"
    coords, deform_info = deformation_coordinates(
        template, geo, scale=0.12 if randomized else 0.06, rotation_deg=8.0 if randomized else 2.0,
        shear=0.05 if randomized else 0.02, nonlinear_mm=float(geo.uniform(1.0, 5.0 if randomized else 3.0)))
    head = np.clip(template.brain + (template.skull + template.scalp if skull else 0.0), 0, 1)
    subject = {name: warp(array, coords) for name, array in images.items()}
    subject.update({"lesion": warp(lesion.fraction, coords), "outcome": warp(outcome_frac, coords),
                    "brain": warp(template.brain, coords)})
    if skull:
        subject["head"] = warp(head, coords)
    # -- scanner frames -----------------------------------------------------------------
    center = brain_center_lps(template)
    head_rot = acq.random_rotation(geo, float(geo.uniform(0, params.head_rotation_deg * (3 if params.ood else 1))))
    pose = np.eye(4)
    pose[:3, :3] = head_rot
    pose[:3, 3] = center - head_rot @ center + geo.uniform(-4, 4, 3)
    head_center = pose[:3, :3] @ center + pose[:3, 3]
    dwi_spec = _dwi_grid(params, geo)
    oblique = acq.random_rotation(geo, float(geo.uniform(0, 3)))
    dwi_geom = acq.grid_geometry(dwi_spec, head_center + geo.uniform(-5, 5, 3), oblique)
    flair_angle = float(geo.uniform(*params.flair_rotation_deg))
    flair_shift = geo.standard_normal(3)
    flair_shift *= float(geo.uniform(*params.flair_translation_mm)) / np.linalg.norm(flair_shift)
    flair_rot = acq.random_rotation(geo, flair_angle)
    flair_transform = np.eye(4)  # DWI point -> FLAIR point
    flair_transform[:3, :3] = flair_rot
    flair_transform[:3, 3] = head_center - flair_rot @ head_center + flair_shift
    flair_spec = _flair_grid(params, geo)
    flair_center = flair_transform[:3, :3] @ head_center + flair_transform[:3, 3]
    flair_geom = acq.grid_geometry(flair_spec, flair_center + geo.uniform(-5, 5, 3),
                                   acq.random_rotation(geo, float(geo.uniform(0, 3))))
    to_subject_dwi = np.linalg.inv(pose)
    to_subject_flair = to_subject_dwi @ np.linalg.inv(flair_transform)
    on_dwi = {name: acq.resample_affine(subject[name], template.geometry, dwi_geom, to_subject_dwi)
              for name in subject if name != "flair"}
    on_flair = {name: acq.resample_affine(subject[name], template.geometry, flair_geom, to_subject_flair)
                for name in ("flair", "brain", "head") if name in subject}
    # -- signal on the DWI grid ---------------------------------------------------------------
    brain = on_dwi["brain"] >= 0.5
    head_mask = on_dwi["head"] >= 0.5 if skull else brain
    keep = brain if params.skull_stripped else head_mask
    mask = ((on_dwi["lesion"] >= 0.5) & brain).astype(np.uint8)
    outcome = (((on_dwi["outcome"] >= 0.5) & brain) | mask.astype(bool)).astype(np.uint8)
    scale = float(irng.uniform(300, 1500))
    snr = float(irng.uniform(6, 12) if params.ood else irng.uniform(18, 40))
    sigma = 1.0 / snr
    bias = acq.bias_field(irng, dwi_geom.shape, float(irng.uniform(0.05, 0.5 if params.ood else 0.25)))
    corr = float(irng.uniform(0.6, 1.1))
    s0 = on_dwi["s0"] * bias
    sb = on_dwi["sb"] * bias
    if params.noise:
        s0n = acq.rician(s0, sigma, irng, corr)
        sbn = acq.rician(sb, sigma, irng, corr)
    else:
        s0n, sbn = s0, sb
    eps = 1e-4
    adc = np.log(np.maximum(s0n, eps) / np.maximum(sbn, eps)) / b_value
    adc = np.clip(adc, 0.0, 5e-3)
    adc[~keep] = 0.0
    acq_info: dict = {}
    if randomized:
        dwi_img, res_info = _degrade_resolution(on_dwi["dwi"], irng)
        dwi_img, contrast_info = _randomize_contrast(dwi_img, brain, irng, noise=params.noise, ood=params.ood)
        acq_info.update(res_info)
        acq_info.update(contrast_info)
        if not params.skull_stripped and params.noise:
            dwi_img = np.where(keep, dwi_img, np.abs(sigma * 0.5 * irng.standard_normal(dwi_img.shape)))
    else:
        dwi_img = sbn
    dwi_img = np.where(keep | (not params.skull_stripped), dwi_img, 0.0).astype(np.float64) * scale
    if params.skull_stripped:
        dwi_img = _negatives(dwi_img, keep, irng)
    adc_unit = params.adc_unit or str(irng.choice(list(ADC_SCALES)))
    adc_written = adc.astype(np.float64) * ADC_SCALES[adc_unit]
    if params.skull_stripped:
        adc_written = _negatives(adc_written, keep, irng)
    # -- FLAIR -------------------------------------------------------------------------------
    flair_keep = (on_flair["head"] if skull else on_flair["brain"]) >= 0.5
    flair = on_flair["flair"]
    if randomized:
        flair, flair_info = _randomize_contrast(flair, flair_keep, irng, noise=params.noise, ood=params.ood)
        acq_info["flair"] = flair_info
    else:
        flair = flair * acq.bias_field(irng, flair_geom.shape, float(irng.uniform(0.05, 0.3)))
        if params.noise:
            flair = acq.rician(flair, float(irng.uniform(0.03, 0.07)), irng)
    flair_scale = float(irng.uniform(200, 900))
    flair = (np.where(flair_keep | (not params.skull_stripped), flair, 0.0) * flair_scale).astype(np.float32)
    # -- record ------------------------------------------------------------------------------
    case_id = case_id_for(index)
    flair_euler = acq.euler_transform(flair_transform, head_center)
    metadata = {
        "case_id": case_id, "index": index, "seed": seed, "mode": params.mode, "ood": params.ood,
        "skull_stripped": params.skull_stripped,
        "lesion": {"source": lesion.source, "kind": lesion.kind, "territory": territory_name(lesion.territory),
                   "template_volume_ml": volume, "components_template": lesion.n_components(),
                   "volume_ml": float(mask.sum() * dwi_geom.voxel_volume_ml), **lesion_extra},
        "outcome": {**outcome_info.to_dict(), "volume_ml_dwi_grid": float(outcome.sum() * dwi_geom.voxel_volume_ml),
                    "scenarios_template_ml": scenarios},
        "hidden": hidden.to_dict(),
        "mimics": mimics.description,
        "signal": signal_info,
        "acquisition": {"dwi_grid": dwi_spec.name, "flair_grid": flair_spec.name, "b_value": b_value,
                        "snr_b0_wm": snr, "noise_correlation_vox": corr, "intensity_scale": scale,
                        "adc_unit": adc_unit, **acq_info},
        "deformation": deform_info,
        "head_pose_lps": pose.tolist(),
        "flair_transform": {
            "convention": "4x4 LPS matrix mapping a DWI-world point to the FLAIR-world point of the same anatomy",
            "matrix": flair_transform.tolist(), "rotation_deg": flair_angle,
            "translation_mm": float(np.linalg.norm(flair_shift)), "center_lps": head_center.tolist(),
            "euler3d_parameters": list(flair_euler.GetParameters()),
        },
        "dwi_geometry": dwi_geom.to_dict(), "flair_geometry": flair_geom.to_dict(),
    }
    return SyntheticCase(case_id, Volume(dwi_img, dwi_geom), Volume(adc_written, dwi_geom),
                         Volume(flair, flair_geom), mask, outcome, record, flair_transform, adc_unit, b_value,
                         metadata)


def dwi_geometry_of(case: SyntheticCase) -> Geometry:
    return case.dwi.geometry
