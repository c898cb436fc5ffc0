"""From DWI/ADC/FLAIR volumes to network-ready tensors, with an exact way back to the DWI grid.

Steps (:func:`preprocess`):

1. check every input (3-D, finite, not constant);
2. bring the ADC onto the DWI grid when it is on another grid that overlaps physically, and
   detect its unit (mm^2/s, 10^-3 mm^2/s or 10^-6 mm^2/s all occur in ISLES 2022);
3. register the FLAIR rigidly onto the DWI (Mattes mutual information, multi-resolution) and
   resample it onto the DWI grid; FLAIR may be absent;
4. compute a brain mask that works on skull-stripped and non-skull-stripped DWI;
5. normalise intensities (:class:`Normalization`, the single definition shared with training);
6. resample onto the model grid (model spacing, a canonical axis order close to LPS, centred on
   the brain) and return a :class:`GridMapping` that maps any network output back onto the DWI
   grid by physical resampling.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from StrokePredictorLib._lazy import sitk
from StrokePredictorLib.errors import InputImageError
from StrokePredictorLib.io import Geometry, Volume, check_volume, read_volume

logger = logging.getLogger(__name__)

CHANNELS = ("dwi", "adc", "flair")

# Factor that converts each known ADC unit to mm^2/s.
ADC_UNITS: dict[str, float] = {"mm2/s": 1.0, "1e-3 mm2/s": 1e-3, "1e-6 mm2/s": 1e-6}


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelGrid:
    """The grid the network sees: voxels along (i, j, k) and their spacing in mm."""

    size: tuple[int, int, int] = (96, 96, 64)
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing)}

    @classmethod
    def from_dict(cls, data: dict) -> ModelGrid:
        return cls(tuple(int(v) for v in data["size"]), tuple(float(v) for v in data["spacing"]))


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation, defined once for training and inference.

    * DWI and FLAIR are not quantitative: divided by their median inside the brain mask (robust
      to lesions and CSF, unlike a mean and standard deviation), then clipped to
      ``[0, clip_relative]``.
    * ADC is quantitative: converted to mm^2/s, then multiplied by ``adc_scale`` (1000 gives
      10^-3 mm^2/s, so that normal tissue is about 0.7-0.9) and clipped to ``[0, adc_clip]``.
    * Voxels outside the brain mask are set to 0.
    """

    clip_relative: float = 6.0
    adc_scale: float = 1000.0
    adc_clip: float = 4.0

    def to_dict(self) -> dict:
        return {"method": "brain-median (DWI, FLAIR); physical mm2/s x adc_scale (ADC)", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        return cls(**{k: data[k] for k in ("clip_relative", "adc_scale", "adc_clip") if k in data})


# ----------------------------------------------------------------------------------------
# Resampling and the grid mapping
# ----------------------------------------------------------------------------------------
def _reference(geometry: Geometry) -> sitk.Image:
    return geometry.apply_to(sitk.Image(list(geometry.size), sitk.sitkUInt8))


def resample(
    array: np.ndarray,
    source: Geometry,
    target: Geometry,
    *,
    order: int = 1,
    transform: sitk.Transform | None = None,
    default: float = 0.0,
) -> np.ndarray:
    """Resample a ``[k, j, i]`` array from ``source`` onto ``target`` by physical position.

    Args:
        order: 0 nearest neighbour, 1 linear, 3 B-spline.
        transform: optional SimpleITK transform mapping target points to source points.
        default: value for target voxels outside the source.
    """
    interpolator = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}[order]
    if transform is None and source.same_grid(target, 1e-4):
        return array.copy()
    image = source.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    result = sitk.Resample(
        image, _reference(target), transform or sitk.Transform(), interpolator, default, image.GetPixelID()
    )
    return sitk.GetArrayFromImage(result)


def canonical_direction(direction: np.ndarray) -> np.ndarray:
    """Permute and flip the columns of a direction matrix so that i, j, k point as close as
    possible to +L, +P, +S (LPS). The result keeps any obliquity of the acquisition but is
    right-handed, so the network always sees brains in one orientation."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    result = np.zeros((3, 3))
    used: set[int] = set()
    for axis in np.argsort(-np.abs(direction).max(axis=1)):  # world axes, most decisive first
        candidates = [c for c in range(3) if c not in used]
        column = max(candidates, key=lambda c: abs(direction[axis, c]))
        used.add(column)
        result[:, axis] = direction[:, column] * np.sign(direction[axis, column] or 1.0)
    return result


@dataclass(frozen=True)
class GridMapping:
    """Physical mapping between the DWI grid and the model grid.

    ``to_model`` resamples a DWI-grid array onto the model grid; ``to_source`` resamples a
    model-grid array (e.g. the network's probability) back onto the DWI grid. Both resample by
    world position, so a voxel keeps its physical location to within interpolation accuracy.
    """

    source: Geometry
    model: Geometry

    def to_model(self, array: np.ndarray, order: int = 1, default: float = 0.0) -> np.ndarray:
        return resample(array, self.source, self.model, order=order, default=default)

    def to_source(self, array: np.ndarray, order: int = 1, default: float = 0.0) -> np.ndarray:
        return resample(np.asarray(array, dtype=np.float32) if order else array, self.model, self.source,
                        order=order, default=default)

    def to_dict(self) -> dict:
        return {"source": self.source.to_dict(), "model": self.model.to_dict()}


def model_geometry(source: Geometry, grid: ModelGrid, center_lps: np.ndarray) -> Geometry:
    """The model grid: ``grid`` voxels at ``grid.spacing``, axes from :func:`canonical_direction`
    of the source, centred on ``center_lps``."""
    direction = canonical_direction(source.direction_matrix)
    half_extent = direction @ (np.asarray(grid.spacing) * (np.asarray(grid.size) - 1) / 2.0)
    origin = np.asarray(center_lps, dtype=float) - half_extent
    # The model axes are parallel to the source axes: snap the origin onto a source voxel centre,
    # so that a model grid with the source's spacing coincides with it voxel for voxel (no blur).
    origin = source.index_to_lps(np.round(source.lps_to_index(origin)))
    return Geometry(grid.size, grid.spacing, tuple(origin), tuple(direction.ravel()))


# ----------------------------------------------------------------------------------------
# ADC units
# ----------------------------------------------------------------------------------------
def detect_adc_unit(adc: np.ndarray, mask: np.ndarray | None = None) -> tuple[str, float]:
    """Detect the unit of an ADC map from its brain median.

    Brain ADC lies between about 0.6 and 3 x 10^-3 mm^2/s (tissue to CSF), so the median of the
    positive voxels is about 0.0008 in mm^2/s, 0.8 in 10^-3 mm^2/s and 800 in 10^-6 mm^2/s.
    Decision boundaries sit at the geometric middles (0.03 and 30).

    Returns:
        (unit name, factor to multiply by to obtain mm^2/s).

    Raises:
        InputImageError: no positive voxel, so no unit can be inferred.
    """
    values = adc[mask] if mask is not None else adc
    values = values[values > 0]
    if values.size == 0:
        raise InputImageError("The ADC map has no positive voxel inside the brain; is it really an ADC map?")
    median = float(np.median(values))
    if median < 0.03:
        unit = "mm2/s"
    elif median < 30.0:
        unit = "1e-3 mm2/s"
    else:
        unit = "1e-6 mm2/s"
    if not 0.2e-3 < median * ADC_UNITS[unit] < 4e-3:
        logger.warning("ADC brain median %.4g %s is unusual for brain tissue.", median, unit)
    return unit, ADC_UNITS[unit]


# ----------------------------------------------------------------------------------------
# Plausibility of the inputs (after the unit detection, before the network)
# ----------------------------------------------------------------------------------------
# All ADC figures in 10^-3 mm^2/s. Physics and the measured medians of ARCHITECTURE.md: white
# matter 0.72, grey matter 0.89-0.91, CSF 2.5-2.9; free water at 37 degC diffuses at 3.0; the
# most restricted tissue, an acute infarct core, at about 0.35-0.5.
#: A brain median outside this range is impossible: below it the whole brain would be more restricted
#: than an infarct core; above it more than half of the brain mask would be CSF.
ADC_MEDIAN_POSSIBLE = (0.35, 2.5)
#: A brain median outside this range is unusual (a brain of white and grey matter with some CSF lies
#: at 0.75-1.1; a very large infarct lowers it, atrophy raises it).
ADC_MEDIAN_USUAL = (0.6, 1.3)
#: ADC at or above this is CSF-like (no tissue reaches it; CSF is 2.5-2.9).
ADC_CSF = 2.0
#: An ADC map has CSF in the brain mask (ventricles, sulci): at least this fraction of CSF-like voxels.
CSF_FRACTION_MIN = 0.01
#: 99th percentile of the brain ADC above this is beyond free water (3.0) plus noise: scaling error.
ADC_P99_MAX = 5.0
#: Rank correlation of DWI and ADC in the brain at or above which they are the same image (up to
#: a scale). Real and simulated pairs measured -0.46 to -0.75; the brain-mask border, where both fall
#: to 0 together, can make a phantom's positive (+0.75 for the test phantom without noise).
RHO_SAME = 0.98
#: CSF (ADC >= ADC_CSF) over tissue (0 < ADC < 1.5) on the DWI. At b=1000 CSF keeps
#: S0_CSF/S0_WM * exp(-b * (2.9 - 0.72) x10^-3) = about 5 * 0.11 = 0.56 of white matter (measured
#: 0.45-0.6); it reaches 1 only below b of about 700 and about 5 at b=0 (T2 weighting).
DWI_CSF_RATIO_WARN = 1.0
DWI_CSF_RATIO_IMPOSSIBLE = 2.0
#: Fewest CSF-like voxels for the ratio to be measured.
CSF_VOXELS_MIN = 50
#: More than this fraction of brain voxels negative (real scans have a few dozen) or, for the ADC,
#: zero, means the image is not what it should be (a difference image, another mask, misalignment).
NEGATIVE_FRACTION_MAX = 0.05
ADC_ZERO_FRACTION_MAX = 0.25


@dataclass(frozen=True)
class InputStatistics:
    """What :func:`check_inputs` measured inside the brain mask (ADC in 10^-3 mm^2/s)."""

    adc_median: float
    adc_p99: float
    csf_fraction: float
    rho: float
    dwi_csf_over_tissue: float | None
    dwi_as_adc_median: float
    dwi_as_adc_csf_fraction: float
    dwi_negative_fraction: float
    adc_negative_fraction: float
    adc_zero_fraction: float

    def to_dict(self) -> dict:
        return {k: None if v is None else round(float(v), 4) for k, v in asdict(self).items()}


def _rank_correlation(a: np.ndarray, b: np.ndarray, max_voxels: int = 200_000) -> float:
    """Spearman correlation of two 1-D arrays (a regular subsample of at most ``max_voxels``)."""
    if a.size < 3:
        return 0.0
    step = max(1, a.size // max_voxels)
    a, b = a[::step].astype(np.float64), b[::step].astype(np.float64)
    ra = np.empty(a.size)
    rb = np.empty(b.size)
    ra[np.argsort(a, kind="stable")] = np.arange(a.size)
    rb[np.argsort(b, kind="stable")] = np.arange(b.size)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0


def _as_adc(values: np.ndarray) -> tuple[float, float]:
    """Brain median (10^-3 mm^2/s) and CSF-like fraction of ``values`` read as an ADC map in the
    unit :func:`detect_adc_unit` would choose."""
    positive = values[values > 0]
    if positive.size == 0:
        return 0.0, 0.0
    median = float(np.median(positive))
    unit = "mm2/s" if median < 0.03 else ("1e-3 mm2/s" if median < 30.0 else "1e-6 mm2/s")
    scale = ADC_UNITS[unit] * 1000.0
    return median * scale, float((values * scale >= ADC_CSF).mean())


def input_statistics(dwi: np.ndarray, adc_raw: np.ndarray, adc_factor: float, brain: np.ndarray) -> InputStatistics:
    """Measure the inputs inside ``brain`` (DWI and raw ADC on the DWI grid, before clipping;
    ``adc_factor`` converts the ADC to mm^2/s)."""
    d = dwi[brain].astype(np.float64)
    a_raw = adc_raw[brain].astype(np.float64)
    a = a_raw * adc_factor * 1000.0
    positive = a[a > 0]
    both = (d > 0) & (a > 0)
    dwi_median, dwi_csf = _as_adc(d)
    n = max(a.size, 1)
    csf = a >= ADC_CSF
    tissue = (a > 0) & (a < 1.5)
    ratio = None
    if csf.sum() >= CSF_VOXELS_MIN and tissue.any():
        tissue_dwi = float(np.median(d[tissue]))
        ratio = float(np.median(d[csf])) / tissue_dwi if tissue_dwi > 0 else None
    return InputStatistics(
        adc_median=float(np.median(positive)) if positive.size else 0.0,
        adc_p99=float(np.percentile(positive, 99)) if positive.size else 0.0,
        csf_fraction=float(csf.sum() / n),
        rho=_rank_correlation(d[both], a[both]),
        dwi_csf_over_tissue=ratio,
        dwi_as_adc_median=dwi_median,
        dwi_as_adc_csf_fraction=dwi_csf,
        dwi_negative_fraction=float((d < 0).sum() / n),
        adc_negative_fraction=float((a < 0).sum() / n),
        adc_zero_fraction=float((a == 0).sum() / n),
    )


def _looks_like_adc(median: float, csf_fraction: float) -> bool:
    return ADC_MEDIAN_USUAL[0] <= median <= ADC_MEDIAN_USUAL[1] and csf_fraction >= CSF_FRACTION_MIN


def check_inputs(stats: InputStatistics, adc_unit: str, *, dwi_name: str = "<in-memory volume>",
                 adc_name: str = "<in-memory volume>") -> list[str]:
    """Refuse clearly impossible DWI/ADC pairs; return warnings for unusual ones.

    Raises:
        InputImageError: the ADC is the DWI (or the same image scaled), DWI and ADC look swapped,
            the ADC's brain median is physically impossible (a wrong unit or scale), or CSF is far
            brighter than tissue on the DWI (a b=0 or T2 image, not a b=1000 trace).
    """
    warnings: list[str] = []
    median = stats.adc_median
    if stats.rho >= RHO_SAME:
        raise InputImageError(
            f"DWI {dwi_name} and ADC {adc_name} are the same image (rank correlation {stats.rho:+.2f} in the brain; "
            "a DWI and its ADC are anti-correlated, CSF being dark on DWI and bright on ADC). "
            "Pass the ADC map as --adc and the b=1000 (or b=800) trace as --dwi."
        )
    adc_ok = _looks_like_adc(median, stats.csf_fraction)
    if _looks_like_adc(stats.dwi_as_adc_median, stats.dwi_as_adc_csf_fraction) and not adc_ok:
        raise InputImageError(
            f"DWI and ADC look swapped: {dwi_name}, given as DWI, has the values of an ADC map (brain median "
            f"{stats.dwi_as_adc_median:.2f} x10^-3 mm^2/s, {stats.dwi_as_adc_csf_fraction:.0%} CSF-like voxels), "
            f"while {adc_name}, given as ADC, does not (median {median:.2f} x10^-3 mm^2/s, "
            f"{stats.csf_fraction:.1%} of voxels at CSF diffusivity). Swap --dwi and --adc."
        )
    if not ADC_MEDIAN_POSSIBLE[0] <= median <= ADC_MEDIAN_POSSIBLE[1]:
        raise InputImageError(
            f"ADC {adc_name}: the brain median is {median:.3g} x10^-3 mm^2/s once read as {adc_unit}, outside the "
            f"physically possible {ADC_MEDIAN_POSSIBLE[0]}-{ADC_MEDIAN_POSSIBLE[1]} (white matter 0.72, grey matter "
            "0.9, CSF 2.5-2.9). The map is probably scaled (e.g. by 10^4 or 10^-2) or is not an ADC map: pass an "
            "ADC in mm^2/s, 10^-3 mm^2/s or 10^-6 mm^2/s."
        )
    if not ADC_MEDIAN_USUAL[0] <= median <= ADC_MEDIAN_USUAL[1]:
        warnings.append(
            f"The ADC's brain median is {median:.2f} x10^-3 mm^2/s (read as {adc_unit}), outside the usual "
            f"{ADC_MEDIAN_USUAL[0]}-{ADC_MEDIAN_USUAL[1]}: check the ADC's unit and scaling; the lesion volume "
            "may be wrong."
        )
    ratio = stats.dwi_csf_over_tissue
    if ratio is not None and ratio >= DWI_CSF_RATIO_IMPOSSIBLE:
        raise InputImageError(
            f"DWI {dwi_name}: CSF (where the ADC is at least {ADC_CSF} x10^-3 mm^2/s) is {ratio:.1f} times as bright "
            "as brain tissue, where on a b=1000 (or b=800) DWI it is about half as bright: this is a b=0, T2-weighted "
            "or ADC image. Pass the b=1000 trace as --dwi."
        )
    if ratio is not None and ratio >= DWI_CSF_RATIO_WARN:
        warnings.append(
            f"On the DWI, CSF is {ratio:.1f} times as bright as brain tissue (about 0.5 on a b=1000 DWI): CSF "
            "should be dark on the DWI where it is bright on the ADC. Check that the DWI is the b=1000 (or b=800) "
            "trace."
        )
    if stats.adc_p99 > ADC_P99_MAX:
        warnings.append(
            f"1% of the brain has an ADC above {stats.adc_p99:.1f} x10^-3 mm^2/s, beyond free water (3.0 at 37 degC): "
            "the ADC map may be scaled or corrupted."
        )
    for what, fraction in (("DWI", stats.dwi_negative_fraction), ("ADC", stats.adc_negative_fraction)):
        if fraction > NEGATIVE_FRACTION_MAX:
            warnings.append(
                f"{fraction:.0%} of the brain voxels of the {what} are negative (real scans have a few dozen); "
                "negative values were set to 0. Is it a difference or a filtered image?"
            )
    if stats.adc_zero_fraction > ADC_ZERO_FRACTION_MAX:
        warnings.append(
            f"The ADC is 0 in {stats.adc_zero_fraction:.0%} of the DWI's brain mask: it may be masked differently, "
            "misaligned or from another patient."
        )
    return warnings


# ----------------------------------------------------------------------------------------
# Brain mask
# ----------------------------------------------------------------------------------------
def _otsu(values: np.ndarray, bins: int = 128) -> float:
    histogram, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight1 = np.cumsum(histogram)
    weight2 = weight1[-1] - weight1
    mean1 = np.cumsum(histogram * centers) / np.maximum(weight1, 1)
    total = (histogram * centers).sum()
    mean2 = (total - np.cumsum(histogram * centers)) / np.maximum(weight2, 1)
    between = weight1 * weight2 * (mean1 - mean2) ** 2
    return float(centers[int(np.argmax(between))])


def _ball(radius_vox: np.ndarray) -> np.ndarray:
    r = np.maximum(np.round(radius_vox).astype(int), 0)
    grids = np.ogrid[tuple(slice(-n, n + 1) for n in r)]
    distance = sum((g / max(float(rr), 0.5)) ** 2 for g, rr in zip(grids, radius_vox))  # noqa: B905
    return distance <= 1.0


def brain_mask(dwi: np.ndarray, spacing: tuple[float, float, float], erosion_mm: float = 7.0) -> np.ndarray:
    """Brain mask of a DWI volume ``[k, j, i]`` (bool, same shape).

    Works on skull-stripped images (where it is essentially the non-zero head) and on clinical
    images with skull and scalp: threshold (Otsu on the smoothed positive intensities); the part
    above the threshold, smoothed more strongly (4 mm), is eroded by ``erosion_mm`` to cut the thin
    bridges between scalp and brain, its largest connected component is dilated back within the
    foreground (above 0.6 x the threshold), and holes are filled slice by slice and in 3-D. The
    strong smoothing of the seed matters for noisy and thick-slice (5-6 mm) clinical DWI, whose
    bright part is otherwise too ragged to survive the erosion.
    """
    spacing_kji = np.asarray(spacing[::-1], dtype=float)
    data = dwi.astype(np.float32)
    smooth = ndimage.gaussian_filter(data, sigma=2.0 / spacing_kji)
    positive = smooth[smooth > 0]
    if positive.size < 10:
        return np.zeros(dwi.shape, dtype=bool)
    threshold = _otsu(np.clip(positive, 0, np.percentile(positive, 99.5)))
    foreground = smooth > threshold * 0.6
    skull_stripped = float((dwi <= 0).mean()) > 0.25 and float((dwi > 0).mean()) > 0.05
    radius = erosion_mm / spacing_kji
    if skull_stripped:
        core = foreground
    else:
        # the seed is eroded from the brighter part only: noise and scalp sit near the threshold
        seed = ndimage.gaussian_filter(data, sigma=np.maximum(4.0 / spacing_kji, 0.5)) > threshold
        core = ndimage.binary_erosion(seed, _ball(radius))
    labels, count = ndimage.label(core)
    if count == 0:
        return foreground
    sizes = ndimage.sum_labels(core, labels, index=np.arange(1, count + 1))
    largest = labels == (1 + int(np.argmax(sizes)))
    if not skull_stripped:
        largest = ndimage.binary_dilation(largest, _ball(radius)) & foreground
    largest = ndimage.binary_closing(largest, _ball(np.full(3, 1.0)), iterations=2)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in largest])
    return ndimage.binary_fill_holes(filled)


# ----------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrationResult:
    """Rigid transform mapping DWI (fixed) points to FLAIR (moving) points, in LPS mm."""

    transform: sitk.Euler3DTransform
    metric: float
    iterations: int

    @property
    def rotation_deg(self) -> float:
        matrix = np.asarray(self.transform.GetMatrix()).reshape(3, 3)
        return math.degrees(math.acos(np.clip((np.trace(matrix) - 1) / 2, -1, 1)))

    def to_dict(self) -> dict:
        return {
            "type": "Euler3D (DWI point -> FLAIR point, LPS mm)",
            "center": list(self.transform.GetCenter()),
            "parameters": list(self.transform.GetParameters()),
            "matrix": list(self.transform.GetMatrix()),
            "translation": list(self.transform.GetTranslation()),
            "rotation_deg": self.rotation_deg,
            "metric": self.metric,
            "iterations": self.iterations,
        }


def _downsample_for_registration(volume: Volume, target_mm: float) -> sitk.Image:
    image = volume.to_sitk()
    spacing = np.asarray(volume.geometry.spacing)
    factors = np.maximum(np.floor(target_mm / spacing), 1).astype(int)
    if np.all(factors == 1):
        return image
    return sitk.BinShrink(image, [int(f) for f in factors])


def register_rigid(
    fixed: Volume,
    moving: Volume,
    *,
    fixed_mask: np.ndarray | None = None,
    sampling: tuple[float, float, float] = (0.5, 0.2, 0.05),
    seed: int = 7,
) -> RegistrationResult:
    """Rigidly register ``moving`` (FLAIR) onto ``fixed`` (DWI) with Mattes mutual information.

    Multi-resolution (shrink 4, 2, 1 with smoothing; ``sampling`` is the fraction of fixed
    voxels sampled at each level), regular-step gradient descent with physical-shift scaling,
    initialised by aligning the images' intensity centres of mass.
    The moving image is first binned to about 1.2 mm in-plane, which loses nothing at the DWI's
    resolution and makes the metric cheap.
    """
    fixed_image = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    moving_image = sitk.Cast(_downsample_for_registration(moving, 1.2), sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(
        fixed_image, moving_image, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    # Coarse-to-fine; a schedule that an image is too small or too thin for is replaced by a
    # shorter one rather than failing the whole prediction.
    schedules = (([4, 2, 1], [2.0, 1.0, 0.0]), ([2, 1], [1.0, 0.0]), ([1], [0.0]))
    errors = []
    for shrink, sigmas in schedules:
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentagePerLevel(list(sampling[-len(shrink):]), seed)
        if fixed_mask is not None:
            mask_image = fixed.geometry.apply_to(sitk.GetImageFromArray(
                ndimage.binary_dilation(fixed_mask, iterations=2).astype(np.uint8)))
            method.SetMetricFixedMask(mask_image)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-4, numberOfIterations=100, relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-8,
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(shrink)
        method.SetSmoothingSigmasPerLevel(sigmas)
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        method.SetInitialTransform(initial, inPlace=False)
        try:
            final = method.Execute(fixed_image, moving_image)
            break
        except RuntimeError as error:
            errors.append(str(error).strip().splitlines()[-1])
    else:
        raise InputImageError(f"FLAIR {moving.name} could not be registered to the DWI: {errors[-1]}")
    if isinstance(final, sitk.CompositeTransform):
        final = final.GetNthTransform(0)
    euler = sitk.Euler3DTransform(final)
    return RegistrationResult(euler, float(method.GetMetricValue()), int(method.GetOptimizerIteration()))


# ----------------------------------------------------------------------------------------
# The whole step
# ----------------------------------------------------------------------------------------
@dataclass
class PreprocessedCase:
    """Network-ready input of one case.

    Attributes:
        image: float32 ``(3, K, J, I)`` on the model grid; channels :data:`CHANNELS`
            (FLAIR is all zeros when absent).
        flair_present: whether channel 2 holds a real FLAIR.
        brain: bool ``(K, J, I)`` brain mask on the model grid.
        mapping: model grid <-> DWI grid.
        adc_unit: detected unit of the input ADC.
        registration: FLAIR-to-DWI registration, or None.
        timings: seconds per step.
        warnings: what the user should know (e.g. a FLAIR that could not be registered, an
            unusual ADC).
        statistics: the plausibility measurements of :func:`input_statistics`, or None.
        brain_volume_ml: volume of the brain mask on the DWI grid, in mL (0 when unknown).
    """

    image: np.ndarray
    flair_present: bool
    brain: np.ndarray
    mapping: GridMapping
    adc_unit: str
    registration: RegistrationResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    statistics: InputStatistics | None = None
    brain_volume_ml: float = 0.0


def _on_dwi_grid(volume: Volume, dwi: Volume, role: str) -> np.ndarray:
    if volume.geometry.same_grid(dwi.geometry, tolerance_mm=0.05):
        return volume.array
    overlap = dwi.geometry.overlap_fraction(volume.geometry)
    if overlap < 0.5:
        raise InputImageError(
            f"{role} {volume.name} is on another grid than the DWI {dwi.name} and covers only "
            f"{overlap:.0%} of it physically; the {role} must show the same head as the DWI."
        )
    logger.warning("%s is on another grid than the DWI; resampling it onto the DWI grid.", role)
    return resample(volume.array, volume.geometry, dwi.geometry, order=1)


def normalize_channels(
    dwi: np.ndarray,
    adc_mm2s: np.ndarray,
    flair: np.ndarray | None,
    brain: np.ndarray,
    normalization: Normalization = Normalization(),
) -> np.ndarray:
    """Normalise DWI, ADC (already in mm^2/s) and FLAIR on one grid; returns ``(3, K, J, I)``.

    This is the single normalisation used by inference and by the training data cache.
    """
    channels = np.zeros((3, *dwi.shape), dtype=np.float32)
    if brain.any():
        for index, array in ((0, dwi), (2, flair)):
            if array is None:
                continue
            inside = array[brain]
            median = float(np.median(inside[inside > 0])) if np.any(inside > 0) else 1.0
            channels[index] = np.clip(array / max(median, 1e-6), 0, normalization.clip_relative)
        channels[1] = np.clip(adc_mm2s * normalization.adc_scale, 0, normalization.adc_clip)
    channels *= brain[None]
    return channels


def preprocess(
    dwi: Volume,
    adc: Volume,
    flair: Volume | None = None,
    *,
    grid: ModelGrid = ModelGrid(),
    normalization: Normalization = Normalization(),
    register_flair: bool = True,
    check_plausibility: bool = True,
    progress: Callable[[float, str], None] | None = None,
) -> PreprocessedCase:
    """Turn DWI, ADC and optional FLAIR volumes into the network input.

    With ``check_plausibility`` (the default) the DWI/ADC pair is checked after the ADC's unit is
    detected (:func:`check_inputs`): impossible input raises, unusual input adds warnings.

    Raises:
        InputImageError: an input is unusable; the message names the file and the problem.
    """
    timings: dict[str, float] = {}
    warnings: list[str] = []
    start = time.perf_counter()
    report = progress or (lambda fraction, message: None)
    check_volume(dwi, "DWI")
    check_volume(adc, "ADC")
    if flair is not None:
        check_volume(flair, "FLAIR")
        if dwi.geometry.overlap_fraction(flair.geometry) < 0.2:
            raise InputImageError(
                f"FLAIR {flair.name} does not overlap the DWI {dwi.name} physically "
                f"(less than 20% of the DWI's extent); check that both show the same patient and session."
            )
    warnings.extend(w for volume in (dwi, adc, flair) if volume is not None for w in volume.warnings)
    dwi_array = np.clip(dwi.array.astype(np.float32, copy=False), 0, None)
    adc_raw = _on_dwi_grid(adc, dwi, "ADC").astype(np.float32, copy=False)
    adc_array = np.clip(adc_raw, 0, None)
    timings["checks_s"] = time.perf_counter() - start

    tick = time.perf_counter()
    brain = brain_mask(dwi_array, dwi.geometry.spacing)
    if not brain.any():
        raise InputImageError(f"No brain could be found in the DWI {dwi.name}; is it a DWI volume?")
    adc_unit, factor = detect_adc_unit(adc_array, brain)
    statistics = input_statistics(dwi.array, adc_raw, factor, brain)
    if check_plausibility:
        warnings.extend(check_inputs(statistics, adc_unit, dwi_name=dwi.name, adc_name=adc.name))
    adc_mm2s = adc_array * factor
    timings["brain_mask_s"] = time.perf_counter() - tick
    report(0.1, "brain mask")

    registration = None
    flair_on_dwi = None
    if flair is not None:
        tick = time.perf_counter()
        transform: sitk.Transform | None = None
        try:
            if register_flair:
                registration = register_rigid(dwi, flair, fixed_mask=brain)
                transform = registration.transform
        except InputImageError as error:
            # A FLAIR that overlaps the DWI but cannot be registered is left out, not fatal: the
            # network was trained with FLAIR missing in 30% of cases.
            logger.warning("%s Predicting without FLAIR.", error)
            warnings.append(f"{error} The prediction was made without FLAIR.")
            flair = None
        if flair is not None:
            flair_on_dwi = np.clip(
                resample(flair.array.astype(np.float32), flair.geometry, dwi.geometry, order=1, transform=transform),
                0, None,
            )
        timings["registration_s"] = time.perf_counter() - tick
        report(0.25, "FLAIR registered")

    tick = time.perf_counter()
    channels = normalize_channels(dwi_array, adc_mm2s, flair_on_dwi, brain, normalization)
    kji = np.argwhere(brain)
    center_ijk = (kji.min(axis=0) + kji.max(axis=0))[::-1] / 2.0
    mapping = GridMapping(dwi.geometry, model_geometry(dwi.geometry, grid, dwi.geometry.index_to_lps(center_ijk)))
    image = np.stack([mapping.to_model(channel, order=1) for channel in channels]).astype(np.float32)
    brain_model = mapping.to_model(brain.astype(np.uint8), order=0).astype(bool)
    image *= brain_model[None]
    timings["normalize_resample_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - start
    report(0.3, "preprocessed")
    brain_ml = float(brain.sum()) * dwi.geometry.voxel_volume_ml
    return PreprocessedCase(image, flair is not None, brain_model, mapping, adc_unit, registration, timings, warnings,
                            statistics, brain_ml)


def preprocess_files(
    dwi: str, adc: str, flair: str | None = None, **kwargs: object
) -> tuple[PreprocessedCase, Volume]:
    """Read the files and run :func:`preprocess`. Returns the case and the DWI volume."""
    dwi_volume = read_volume(dwi, role="DWI")
    adc_volume = read_volume(adc, role="ADC")
    flair_volume = read_volume(flair, role="FLAIR") if flair else None
    return preprocess(dwi_volume, adc_volume, flair_volume, **kwargs), dwi_volume  # type: ignore[arg-type]
