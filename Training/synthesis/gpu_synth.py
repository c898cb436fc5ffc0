"""On-the-fly, domain-randomised training data on the GPU (SynthSeg / SynthStroke style).

Training images are synthesised from label maps every step instead of being read from disk, so
the network never sees the same image twice and cannot rely on one simulator's look:

* **Pack** (built once on the CPU, :func:`build_pack`): the MNI152 2009 tissue maps (GM, WM,
  CSF, brain) and arterial territories of :func:`Training.synthesis.anatomy.load_template` at 2 mm,
  and every SOOP lesion mask (real acute lesions in MNI space) as a partial-volume fraction on the
  same grid, with its participant's real age, sex, NIHSS and prior stroke. 15% of the
  participants (by a hash of their id, :func:`participant_split`) are held out: 5% for
  validation during training, 10% for testing; neither is ever used for training.
* **Labels** (CPU workers, :class:`LabelSampler`): one lesion (sometimes several small ones,
  sometimes none, a single small one or a cardio-embolic shower of 0.02-0.5 mL foci), its
  depth-dependent severity, the real-scan mimic maps, the simulated clinical record and the outcome
  infarct from the data generator's models (:mod:`Training.synthesis.clinical_sim`,
  :mod:`Training.synthesis.outcome`), so that the outcome depends on clinical values the image lacks.
* **Images** (GPU, :func:`synthesize`): a random affine plus smooth elastic deformation maps the
  labels onto the model grid; MR physics with randomised parameters: per-class S0 (T2) and ADC
  with scanner-to-scanner variability (the cerebellar cortex below the tentorium with its own, lower
  ADC, so that its normal DWI brightness is no lesion cue), ``S_b = S0 exp(-b ADC)`` with b = 800-1000, Rician noise on
  b0 and b-images, ADC recomputed from the noisy pair (so its noise is as in real ADC maps), bias
  fields and regional hyperintensities on b0 and b-image alike (bright DWI, normal ADC),
  random slice thickness and in-plane blur, random per-class gains and gamma on DWI,
  lesion contrast from barely visible to strong with a core-to-rim gradient, T2 shine-through
  mimics (bright on DWI, normal ADC), FLAIR with random contrast whose lesion signal appears with
  time since onset and a random gain below the tentorium, FLAIR missing in 30% of cases; the
  real-scan mimics of :mod:`Training.synthesis.mimics` (drawn by the sampler as template-space kind and
  weight maps with per-kind S0, ADC, FLAIR and ADC-noise multipliers, rendered here with the same
  formula as the CPU generator) and embolic showers and small lesions in the labels. The
  result is normalised exactly like :func:`StrokePredictorLib.preprocess.normalize_channels` (DWI
  and FLAIR over their brain median, ADC in 10^-3 mm^2/s), so training and inference see the same
  input definition.

The GPU part needs only torch; the pack is a plain ``.npz`` (no pickle).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from StrokePredictorLib.clinical import encode
from StrokePredictorLib.preprocess import Normalization
from Training.synthesis.anatomy import posterior_fossa_weight
from Training.synthesis.mimics import factors as mimic_factors

logger = logging.getLogger(__name__)

PACK_VERSION = 1


# ----------------------------------------------------------------------------------------
# The pack
# ----------------------------------------------------------------------------------------
VAL_FRACTION = 0.05
TEST_FRACTION = 0.10


def participant_split(participant: str) -> str:
    """``train`` (85%), ``val`` (5%) or ``test`` (10%), fixed by a hash of the participant id."""
    digest = hashlib.sha256(participant.encode()).digest()
    position = int.from_bytes(digest[:4], "little") / 2**32
    if position < VAL_FRACTION:
        return "val"
    return "test" if position < VAL_FRACTION + TEST_FRACTION else "train"


def build_pack(soop_dir: str | Path, out: str | Path, *, workers: int = 2) -> Path:
    """Build the synthesis pack from the SOOP library (CPU, once; about a minute).

    Args:
        soop_dir: the SOOP folder (``lesions/``, ``participants.tsv``).
        out: the ``.npz`` file to write.
        workers: processes used to read the lesion masks.
    """
    from concurrent.futures import ProcessPoolExecutor

    from StrokePredictorLib.io import atomic_path
    from Training.synthesis.anatomy import load_template
    from Training.synthesis.lesions import load_soop

    template = load_template(2)
    library = load_soop(soop_dir)
    paths = [str(path) for _, path in library.files]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        crops = list(pool.map(_lesion_on_template, paths, chunksize=16))
    buffers, boxes, meta = [], [], []
    offset = 0
    for (participant, _), (box, data) in zip(library.files, crops, strict=True):
        values = library.participants.get(participant, {})
        buffers.append(data.ravel())
        boxes.append([offset, *box])
        offset += data.size
        meta.append([
            np.nan if values.get("age") is None else values["age"],
            {"F": 0.0, "M": 1.0}.get(values.get("sex") or "", np.nan),
            np.nan if values.get("nihss") is None else values["nihss"],
            {"no": 0.0, "yes": 1.0}.get(values.get("prior_stroke") or "", np.nan),
            float(participant_split(participant) != "train"),
        ])
    arrays = {
        "version": np.array(PACK_VERSION),
        "affine_lps": template.geometry.ijk_to_lps.astype(np.float64),
        "size": np.array(template.geometry.size),
        "gm": template.gm.astype(np.float16), "wm": template.wm.astype(np.float16),
        "csf": template.csf.astype(np.float16), "brain": template.brain.astype(np.float16),
        "territory": template.territory.astype(np.uint8),
        "lesion_data": np.concatenate(buffers) if buffers else np.zeros(0, np.uint8),
        "lesion_boxes": np.asarray(boxes, dtype=np.int64).reshape(-1, 7),
        "lesion_meta": np.asarray(meta, dtype=np.float32).reshape(-1, 5),
        "participants": np.array([p for p, _ in library.files]),
    }
    out = Path(out)
    with atomic_path(out, overwrite=True) as temporary:
        with temporary.open("wb") as handle:
            np.savez_compressed(handle, **arrays)
    held_out = int(arrays["lesion_meta"][:, 4].sum())
    logger.info("Pack %s: %d lesions (%d held out for validation and testing).", out, len(paths), held_out)
    return out


def _lesion_on_template(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """One SOOP mask as a uint8 partial-volume fraction (x255) on the 2 mm template, cropped."""
    import nibabel as nib
    from scipy import ndimage

    from Training.synthesis.anatomy import load_template
    from Training.synthesis.lesions import resample_to_template

    template = load_template(2)
    image = nib.load(path)
    data = (np.asarray(image.dataobj) > 0.5).astype(np.float32)
    smooth = ndimage.uniform_filter(data, size=2)  # 2 mm partial volume before sampling at 2 mm
    fraction = np.clip(resample_to_template(smooth, image.affine, template), 0, 1)
    where = np.argwhere(fraction > 0.02)
    if where.size == 0:
        return (0, 0, 0, 1, 1, 1), np.zeros((1, 1, 1), np.uint8)
    lo, hi = where.min(axis=0), where.max(axis=0) + 1
    crop = fraction[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return (*lo.tolist(), *crop.shape), np.round(crop * 255).astype(np.uint8)


@dataclass
class Pack:
    """The synthesis pack in memory (see :func:`build_pack`)."""

    affine_lps: np.ndarray
    size: tuple[int, int, int]
    maps: dict[str, np.ndarray]
    territory: np.ndarray
    lesion_data: np.ndarray
    lesion_boxes: np.ndarray
    lesion_meta: np.ndarray
    participants: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: str | Path) -> Pack:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != PACK_VERSION:
                raise ValueError(f"Synthesis pack {path} has version {int(data['version'])}; rebuild it.")
            maps = {name: data[name].astype(np.float32) for name in ("gm", "wm", "csf", "brain")}
            return cls(data["affine_lps"], tuple(int(v) for v in data["size"]), maps, data["territory"],
                       data["lesion_data"], data["lesion_boxes"], data["lesion_meta"],
                       tuple(str(p) for p in data["participants"]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size[2], self.size[1], self.size[0])

    def indices(self, subset: str) -> np.ndarray:
        """Lesion indices of the ``train``, ``val`` or ``test`` participants."""
        if subset == "all":
            return np.arange(len(self.lesion_boxes))
        return np.flatnonzero([participant_split(p) == subset for p in self.participants])

    def lesion(self, index: int) -> np.ndarray:
        """Lesion fraction float32 ``[k, j, i]`` on the template grid."""
        offset, k0, j0, i0, dk, dj, di = (int(v) for v in self.lesion_boxes[index])
        out = np.zeros(self.shape, np.float32)
        crop = self.lesion_data[offset:offset + dk * dj * di].reshape(dk, dj, di).astype(np.float32) / 255.0
        out[k0:k0 + dk, j0:j0 + dj, i0:i0 + di] = crop
        return out

    def template(self):  # noqa: ANN201 - Training.synthesis.anatomy.Template, imported lazily
        from StrokePredictorLib.io import Geometry
        from Training.synthesis.anatomy import Template

        lps = self.affine_lps.copy()
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        geometry = Geometry.from_ijk_to_ras(ras, self.size)
        zeros = np.zeros(self.shape, np.float32)
        spacing = float(np.linalg.norm(lps[:3, 0]))
        return Template(geometry, self.maps["csf"], self.maps["gm"], self.maps["wm"], self.maps["brain"],
                        zeros, zeros, zeros, self.territory, spacing)


# ----------------------------------------------------------------------------------------
# Label-level samples (CPU workers)
# ----------------------------------------------------------------------------------------
class LabelSampler(torch.utils.data.Dataset):
    """Label-level training samples: lesion, severity, outcome and clinical values.

    Item ``n`` is deterministic for a given ``seed`` (so a run can be replayed); ``length`` only
    sets the epoch size of the DataLoader.

    Lesions and mimics (:mod:`Training.synthesis.mimics`, shared with the CPU generator): a case is empty
    with ``empty_probability``, else it holds a real SOOP lesion of the ``subset`` (plus, with
    ``multi_probability``, one or two small SOOP lesions elsewhere). Of the non-empty cases, a
    fraction ``small_probability`` has a single small lesion of 0.02-1 mL instead, and a fraction
    ``shower_probability`` gets a cardio-embolic shower (3-40 foci of 0.02-0.5 mL over 1-3
    territories, half of them from the small components of another SOOP lesion of the subset), which
    replaces the lesion in half of those cases and joins it in the other half. With
    ``mimic_probability`` a case gets the real-scan mimics (susceptibility at air-bone interfaces,
    bright cortical ribbon, T2 shine-through, midline and choroid-plexus spots, chronic infarcts and
    lacunes, white-matter hyperintensities) as the ``mimic_kind``/``mimic_weight`` maps and the
    ``mimic_table`` of multipliers that :class:`GpuSynthesizer` renders. The shower, small-lesion and
    mimic draws use their own random stream ``[seed, index, 7]``: with the three probabilities at 0
    every item equals the one of the earlier sampler, apart from the added (all-zero) mimic keys, and
    :class:`GpuSynthesizer` renders such a batch exactly as it did before the mimics existed.
    With ``scenarios`` > 0 each item also holds that many counterfactual outcomes of the same case
    (:meth:`_alternatives`; ``outcome_alt``, ``clinical_values_alt``, ``clinical_missing_alt``), from a
    stream of their own: the other keys are unchanged.
    """

    def __init__(self, pack: Pack, *, subset: str = "train", seed: int = 0, length: int = 10_000,
                 empty_probability: float = 0.03, multi_probability: float = 0.15,
                 shower_probability: float = 0.25, small_probability: float = 0.15,
                 mimic_probability: float = 0.8, scenarios: int = 0) -> None:
        self.pack = pack
        self.pool = pack.indices(subset)
        self.seed = seed
        self.length = length
        self.empty_probability = empty_probability
        self.multi_probability = multi_probability
        self.shower_probability = shower_probability
        self.small_probability = small_probability
        self.mimic_probability = mimic_probability
        self.scenarios = scenarios
        self._template = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        from Training.synthesis.clinical_sim import simulate_clinical
        from Training.synthesis.lesions import severity_map, smooth_noise
        from Training.synthesis.mimics import draw_mimic_maps, embolic_shower, empty_maps, small_lesion
        from Training.synthesis.outcome import outcome_fraction

        if self._template is None:
            self._template = self.pack.template()
        template = self._template
        rng = np.random.default_rng([self.seed, index])
        draw = rng.random()
        fraction = np.zeros(self.pack.shape, np.float32)
        real = None
        if draw >= self.empty_probability:
            first = int(rng.choice(self.pool))
            fraction = self.pack.lesion(first)
            meta = self.pack.lesion_meta[first]
            real = {
                "age": None if np.isnan(meta[0]) else float(meta[0]),
                "sex": None if np.isnan(meta[1]) else ("M" if meta[1] > 0.5 else "F"),
                "nihss": None if np.isnan(meta[2]) else float(meta[2]),
                "prior_stroke": None if np.isnan(meta[3]) else ("yes" if meta[3] > 0.5 else "no"),
            }
            if rng.random() < self.multi_probability:  # extra small (embolic) lesions elsewhere
                for extra in rng.choice(self.pool, size=int(rng.integers(1, 3))):
                    other = self.pack.lesion(int(extra))
                    if (other >= 0.5).sum() * 0.008 < 5.0:
                        fraction = np.maximum(fraction, other)
        # showers, small lesions and mimics: their own stream, so that probabilities 0 change nothing above
        extra = np.random.default_rng([self.seed, index, 7])
        focus_severity = None
        kind = "soop" if real else "empty"
        if real is not None and (self.small_probability > 0 or self.shower_probability > 0):
            choice = extra.random()
            if choice < self.small_probability:
                fraction, focus_severity, _ = small_lesion(template, extra)
                real, kind = None, "small"
            elif choice < self.small_probability + self.shower_probability:
                replace = extra.random() < 0.5
                source = self.pack.lesion(int(extra.choice(self.pool)))
                shower, focus_severity, _ = embolic_shower(template, extra, source=source,
                                                           avoid=None if replace else fraction)
                fraction = shower if replace else np.maximum(fraction, shower)
                if replace:
                    real, kind = None, "embolic"
        binary = fraction >= 0.5
        volume_ml = float(binary.sum() * 0.008)
        territory = 0
        if binary.any():
            labels = template.territory[binary]
            labels = labels[labels > 0]
            territory = int(np.bincount(labels).argmax()) if labels.size else 0
        record, hidden = simulate_clinical(rng, kind=kind, volume_ml=volume_ml, territory=territory, real=real)
        severity = severity_map(binary, 2.0, rng, float(rng.uniform(0.15, 0.6)))
        if focus_severity is not None:
            severity = np.maximum(severity, focus_severity)
        if self.mimic_probability > 0 and extra.random() < self.mimic_probability:
            mimics = draw_mimic_maps(template, extra, avoid=fraction)
        else:
            mimics = empty_maps(self.pack.shape)
        noise = smooth_noise(rng, fraction.shape, 3.0)
        outcome, _ = outcome_fraction(template, fraction, nihss=hidden.nihss, onset_h=hidden.onset_h,
                                      treatment=hidden.treatment, collateral=hidden.collateral,
                                      glucose=hidden.glucose, noise=noise)
        values, missing = encode(record)
        alternatives = self._alternatives(index, template, fraction, record, hidden, noise) if self.scenarios else {}
        return {**alternatives,
            "lesion": fraction.astype(np.float16), "severity": severity.astype(np.float16),
            "outcome": outcome.astype(np.float16), "clinical_values": values, "clinical_missing": missing,
            "onset_h": np.float32(hidden.onset_h), "seed": np.int64(rng.integers(2**62)),
            "mimic_kind": mimics.kind, "mimic_weight": mimics.weight.astype(np.float16),
            "mimic_table": mimics.table,
        }

    def _alternatives(self, index: int, template: object, fraction: np.ndarray, record: object, hidden: object,
                      noise: np.ndarray) -> dict[str, np.ndarray]:
        """``scenarios`` counterfactual outcomes of the same case: onset time (log-uniform 0.5-24 h) and
        treatment (uniform) redrawn from their own stream ``[seed, index, 11]``, everything else (core,
        hidden NIHSS, collaterals, glucose, the random field) kept; the record's onset and treatment set to
        them. The same image then comes with several clinical scenarios and their final infarcts, which
        teaches what onset time and treatment change far more directly than one scenario per image."""
        from StrokePredictorLib.clinical import validate
        from Training.synthesis.outcome import TREATMENT_BENEFIT, outcome_fraction

        draw = np.random.default_rng([self.seed, index, 11])
        known = {k: v for k, v in record.values.items() if v is not None}  # type: ignore[attr-defined]
        outcomes, values, missing = [], [], []
        for _ in range(self.scenarios):
            onset = float(np.exp(draw.uniform(np.log(0.5), np.log(24.0))))
            treatment = str(draw.choice(list(TREATMENT_BENEFIT)))
            grown, _ = outcome_fraction(template, fraction, nihss=hidden.nihss, onset_h=onset,  # type: ignore
                                        treatment=treatment, collateral=hidden.collateral,  # type: ignore
                                        glucose=hidden.glucose, noise=noise)  # type: ignore[attr-defined]
            v, m = encode(validate({**known, "onset_to_imaging_h": round(onset, 3), "treatment": treatment}))
            outcomes.append(grown.astype(np.float16))
            values.append(v)
            missing.append(m)
        return {"outcome_alt": np.stack(outcomes), "clinical_values_alt": np.stack(values),
                "clinical_missing_alt": np.stack(missing)}


# ----------------------------------------------------------------------------------------
# Images (GPU)
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthConfig:
    """Ranges of the domain randomisation (uniform unless stated)."""

    rotation_deg: float = 12.0
    scale: float = 0.12
    translation_mm: float = 8.0
    elastic_mm: float = 3.0
    flair_probability: float = 0.7
    b_value: tuple[float, float] = (0.8, 1.0)  # s/mm^2 / 1000, so that b * ADC(10^-3 mm^2/s) is unitless
    adc_wm: float = 0.72  # 10^-3 mm^2/s, literature and ISLES 2022 medians
    adc_gm: float = 0.90
    # cerebellar cortex (posterior fossa, template territories 7 and 8): ADC well below the cerebral
    # cortex's (mean 0.68, range 0.59-0.82 in Peker et al., J Ankara Univ Fac Med 2019; cerebral cortex
    # 0.89 in Helenius et al., AJNR 2002), hence bright on DWI with a low-normal ADC, as in real scans
    fossa_adc_gm: tuple[float, float] = (0.6, 0.85)
    fossa_flair: tuple[float, float] = (1.0, 1.3)  # FLAIR gain below the tentorium (brainstem, cerebellum)
    adc_csf: tuple[float, float] = (2.3, 3.2)
    adc_variability: float = 0.15  # scanner-to-scanner, per tissue
    adc_drop: tuple[float, float] = (0.12, 0.55)  # lesion ADC reduction in the core (barely visible to strong)
    s0_gm: tuple[float, float] = (0.9, 1.5)  # relative to white matter
    csf_dwi_ratio: tuple[float, float] = (0.25, 1.0)  # CSF / WM on the b-image
    lesion_t2: tuple[float, float] = (0.0, 0.5)  # T2 increase of the lesion (shine-through)
    noise: tuple[float, float] = (0.01, 0.07)  # Rician sigma relative to white-matter b-image signal
    # Rician sigma (relative to the white-matter b-image signal) added AFTER the acquisition blur, spatially
    # correlated and of unit variance, as the test-set generator adds it (Training/synthesis/case.py:
    # b0 SNR 18-40 at b = 1000 is (0.05, 0.11) here); (0, 0): off, the images render as before. The noise
    # above is added before the blur, which averages most of it away.
    grid_noise: tuple[float, float] = (0.0, 0.0)
    grid_noise_corr_vox: tuple[float, float] = (0.6, 1.1)  # in-plane Gaussian correlation (0.6x through-plane)
    slice_mm: tuple[float, float] = (2.0, 6.5)
    inplane_sigma_vox: tuple[float, float] = (0.3, 1.0)
    bias: float = 0.5
    regional_gain: float = 0.8  # regional DWI hyperintensity with normal ADC (artefact mimics)
    class_gain: float = 0.2
    gamma_sd: float = 0.15
    mimic_rate: float = 2.0  # mean number of T2 shine-through mimics per case

    @classmethod
    def with_grid_noise(cls, values: tuple[float, ...] | list[float]) -> SynthConfig:
        """The default ranges with ``grid_noise`` set from a command line's ``LO,HI``.

        Raises:
            ValueError: not two numbers with 0 <= LO <= HI <= 1 (the message names the values).
        """
        if len(values) != 2 or not 0 <= values[0] <= values[1] <= 1:
            raise ValueError(f"must be LO,HI with 0 <= LO <= HI <= 1 (relative to the white-matter signal), not "
                             f"{','.join(map(str, values))}")
        return cls(grid_noise=(float(values[0]), float(values[1])))


def _uniform(generator: torch.Generator, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _smooth_field(generator: torch.Generator, n: int, shape: tuple[int, int, int], coarse: tuple[int, int, int],
                  device: torch.device) -> torch.Tensor:
    """Smooth random field (n, 1, *shape), unit-ish amplitude, by upsampling coarse noise."""
    noise = torch.randn((n, 1, *coarse), generator=generator, device=device)
    return F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (n, 3, 3) from Euler angles (n, 3) in radians."""
    cx, cy, cz = torch.cos(angles).unbind(-1)
    sx, sy, sz = torch.sin(angles).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ ry @ rx


def _blur(volume: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (n, c, D, H, W) with per-sample sigmas (n, 3) in voxels (k, j, i)."""
    n = volume.shape[0]
    out = volume
    radius = 6
    offsets = torch.arange(-radius, radius + 1, device=volume.device, dtype=volume.dtype)
    for axis in range(3):
        sigma = sigmas[:, axis].clamp(min=1e-3).view(n, 1)
        kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (n, 2r+1)
        shape = [1, 1, 1]
        shape[axis] = 2 * radius + 1
        channels = out.shape[1]
        weight = kernel.repeat_interleave(channels, dim=0).view(n * channels, 1, *shape)
        padding = [0, 0, 0]
        padding[axis] = radius
        flat = out.reshape(1, n * channels, *out.shape[2:])
        out = F.conv3d(flat, weight, padding=tuple(padding), groups=n * channels).view_as(out)
    return out


def _rician(signal: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator,
            corr_vox: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitude of ``signal`` (n, 1, D, H, W) plus complex Gaussian noise of standard deviation ``sigma`` per
    channel; with ``corr_vox`` (n,) each channel's noise is smoothed by a Gaussian of that many voxels in-plane
    (0.6 times that through-plane, as :func:`Training.synthesis.acquisition.correlated_noise`) and rescaled to
    unit variance per sample."""
    def field() -> torch.Tensor:
        noise = torch.randn(signal.shape, generator=generator, device=signal.device)
        if corr_vox is None:
            return noise
        noise = _blur(noise, torch.stack([corr_vox * 0.6, corr_vox, corr_vox], dim=1))
        return noise / noise.flatten(1).std(dim=1).clamp(min=1e-6).view(-1, 1, 1, 1, 1)

    real = signal + sigma * field()
    imaginary = sigma * field()
    return torch.sqrt(real**2 + imaginary**2)


def _median_in(volume: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample median of (n, 1, ...) over ``mask`` (n, 1, ...), shape (n, 1, 1, 1, 1)."""
    medians = []
    for value, inside in zip(volume, mask, strict=True):
        selected = value[inside & (value > 0)]
        medians.append(selected.median() if selected.numel() else value.new_tensor(1.0))
    return torch.stack(medians).view(-1, 1, 1, 1, 1).clamp(min=1e-6)


class GpuSynthesizer:
    """Turns label-level batches into network-ready, normalised image batches on a device.

    Args:
        pack: the synthesis pack.
        grid_size: model grid (i, j, k) voxels; spacing is the pack's (2 mm).
        device: where to synthesise (a CUDA device in training; CPU works for tests).
        config: randomisation ranges.
        normalization: the intensity normalisation of :mod:`StrokePredictorLib.preprocess` (the same
            definition as at inference; its clip values and ADC scale are applied here on the GPU).
    """

    def __init__(self, pack: Pack, grid_size: tuple[int, int, int], device: torch.device | str,
                 config: SynthConfig = SynthConfig(), normalization: Normalization | None = None) -> None:
        self.device = torch.device(device)
        self.config = config
        self.normalization = normalization or Normalization()
        self.grid_size = tuple(int(v) for v in grid_size)
        self.spacing = float(np.linalg.norm(pack.affine_lps[:3, 0]))
        fossa = posterior_fossa_weight(pack.territory)
        anatomy = np.stack([*(pack.maps[name] for name in ("gm", "wm", "csf", "brain")), fossa])
        self.anatomy = torch.from_numpy(anatomy).to(self.device)[None]  # (1, 5, Kt, Jt, It)
        brain = pack.maps["brain"] > 0.5
        kji = np.argwhere(brain)
        center_ijk = (kji.min(axis=0) + kji.max(axis=0))[::-1] / 2.0
        self.center_lps = torch.tensor(pack.affine_lps[:3, :3] @ center_ijk + pack.affine_lps[:3, 3],
                                       dtype=torch.float32, device=self.device)
        self.lps_to_index = torch.tensor(np.linalg.inv(pack.affine_lps), dtype=torch.float32, device=self.device)
        size = torch.tensor(self.grid_size, dtype=torch.float32, device=self.device)
        k, j, i = torch.meshgrid(*(torch.arange(n, device=self.device, dtype=torch.float32)
                                   for n in self.grid_size[::-1]), indexing="ij")
        # model-grid points relative to its centre, LPS mm (canonical axes i=L, j=P, k=S)
        self.points = (torch.stack([i, j, k], -1) - (size - 1) / 2) * self.spacing  # (K, J, I, 3)
        self.template_size = torch.tensor(pack.size, dtype=torch.float32, device=self.device)

    def _sampling_grid(self, n: int, generator: torch.Generator) -> torch.Tensor:
        c, dev = self.config, self.device
        angles = (torch.rand((n, 3), generator=generator, device=dev) * 2 - 1) * math.radians(c.rotation_deg)
        scales = 1 + (torch.rand((n, 3), generator=generator, device=dev) * 2 - 1) * c.scale
        flips = torch.where(torch.rand(n, generator=generator, device=dev) < 0.5, -1.0, 1.0)
        scales[:, 0] *= flips  # left-right mirror (the MNI template is symmetric)
        matrix = _rotation(angles) * scales[:, None, :]
        shift = (torch.rand((n, 3), generator=generator, device=dev) * 2 - 1) * c.translation_mm
        points = torch.einsum("nab,kjib->nkjia", matrix, self.points)
        coarse = (4, 5, 4)
        elastic = torch.cat([_smooth_field(generator, n, self.points.shape[:3], coarse, dev)
                             for _ in range(3)], dim=1) * c.elastic_mm
        points = points + elastic.permute(0, 2, 3, 4, 1) + (self.center_lps + shift)[:, None, None, None, :]
        index = points @ self.lps_to_index[:3, :3].T + self.lps_to_index[:3, 3]  # template (i, j, k)
        return 2 * index / (self.template_size - 1) - 1  # grid_sample's (x=i, y=j, z=k) in [-1, 1]

    @torch.no_grad()
    def __call__(self, labels: dict[str, torch.Tensor], generator: torch.Generator,
                 task: str = "acute") -> dict[str, torch.Tensor]:
        """Synthesise a batch.

        Args:
            labels: a collated :class:`LabelSampler` batch.
            generator: torch random generator on ``self.device``.
            task: ``acute`` or ``outcome`` (which target to return).

        Returns:
            image (n, 3, K, J, I), target (n, 1, K, J, I) float 0/1 of ``task`` (``acute`` and
            ``outcome`` hold both targets), brain (n, 1, K, J, I) bool,
            clinical_values (n, 10), clinical_missing (n, 10), flair_present (n,).
        """
        c, dev = self.config, self.device
        # label batches of older samplers have no mimic maps; a batch without any mimic renders (and draws
        # from the generator) exactly as before the mimics existed
        with_mimics = "mimic_kind" in labels and bool(labels["mimic_weight"].any())
        names = ("lesion", "severity", "outcome") + (("mimic_weight",) if with_mimics else ())
        per_case = torch.stack([labels[name].to(dev, non_blocking=True).float() for name in names], dim=1)
        alternatives = labels["outcome_alt"].to(dev).float() if "outcome_alt" in labels else None
        if alternatives is not None:  # counterfactual outcomes ride along as extra channels: same warp, no draws
            per_case = torch.cat([per_case, alternatives], dim=1)
        n = per_case.shape[0]
        grid = self._sampling_grid(n, generator)
        anatomy = F.grid_sample(self.anatomy.expand(n, -1, -1, -1, -1), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=True)
        lesion_maps = F.grid_sample(per_case, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        gm, wm, csf, brain_p, fossa = (t[:, None] for t in anatomy.unbind(1))
        lesion, severity, outcome = (t[:, None] for t in lesion_maps[:, :3].unbind(1))
        mimic_s0 = mimic_adc = mimic_flair = None
        if with_mimics:  # real-scan mimics: kind by nearest neighbour, weight bilinear, the shared formula
            kind = F.grid_sample(labels["mimic_kind"].to(dev).float()[:, None], grid, mode="nearest",
                                 padding_mode="zeros", align_corners=True).long()
            table = labels["mimic_table"].to(dev).float()  # (n, kinds + 1, 4)
            per_voxel = table[torch.arange(n, device=dev).view(n, 1, 1, 1, 1), kind]  # (n, 1, K, J, I, 4)
            mimic_s0, mimic_adc, mimic_flair, mimic_noise = mimic_factors(per_voxel, lesion_maps[:, 3:4])
            fine = F.interpolate(torch.randn((n, 1, *(max(2, s // 2) for s in gm.shape[2:])), generator=generator,
                                             device=dev), size=gm.shape[2:], mode="trilinear", align_corners=True)
            mimic_adc = mimic_adc * (1 + mimic_noise * fine).clamp(min=0.3)
        shape = gm.shape[2:]
        u = lambda lo, hi: _uniform(generator, n, lo, hi, dev).view(n, 1, 1, 1, 1)  # noqa: E731

        # tissue ADC (10^-3 mm^2/s) with scanner variability and texture, lesion reduction
        tissue = (gm + wm + csf).clamp(min=1e-3)
        variability = lambda: 1 + (2 * u(0, 1) - 1) * c.adc_variability  # noqa: E731
        adc_csf = u(*c.adc_csf)
        adc_gm = c.adc_gm * variability() * (1 - fossa) + u(*c.fossa_adc_gm) * fossa
        adc = (gm * adc_gm + wm * c.adc_wm * variability() + csf * adc_csf) / tissue
        adc = adc * (1 + 0.05 * _smooth_field(generator, n, shape, (12, 14, 12), dev))
        drop = u(*c.adc_drop)
        adc = adc * (1 - drop * (severity.clamp(0, 1.2) * lesion.clamp(0, 1)))
        if mimic_adc is not None:
            adc = adc * mimic_adc
        # T2-weighted S0 per class, lesion T2 increase, shine-through mimics (bright S0, normal ADC)
        b = u(*c.b_value)
        # CSF S0 chosen so that CSF/WM on DWI lies in the configured range (real: 0.45-0.6)
        s0_csf = u(*c.csf_dwi_ratio) * torch.exp(-b * c.adc_wm) / torch.exp(-b * adc_csf)
        s0 = gm * u(*c.s0_gm) + wm + csf * s0_csf
        s0 = s0 * (1 + 0.04 * _smooth_field(generator, n, shape, (16, 18, 16), dev))
        s0 = s0 * (1 + u(*c.lesion_t2) * lesion)
        mimic = self._mimics(n, generator, (gm + wm) * (1 - lesion), shape)
        s0 = s0 * (1 + mimic * u(0.5, 1.8))
        if mimic_s0 is not None:
            s0 = s0 * mimic_s0
        bias = torch.exp(c.bias * u(0, 1) * _smooth_field(generator, n, shape, (3, 4, 3), dev))
        # regional hyperintensity on b0 and b-image alike (susceptibility, coil, T2 effects: bright
        # DWI with normal ADC, e.g. the posterior fossa and temporal poles of many real scans)
        bias = bias * (1 + self._regional(n, generator, shape))
        wm_signal = torch.exp(-b * c.adc_wm)
        sigma = u(*c.noise) * wm_signal
        s_b = _rician(s0 * torch.exp(-b * adc) * bias, sigma, generator)
        s_0 = _rician(s0 * bias, sigma, generator)
        # acquisition resolution: thick slices (mostly along k) and in-plane blur, then interpolation
        thickness = u(*c.slice_mm).view(n) / self.spacing / 2.355
        inplane = u(*c.inplane_sigma_vox).view(n)
        sigmas = torch.stack([thickness, inplane, inplane], dim=1)
        swap = torch.rand(n, generator=generator, device=dev) < 0.15  # some sagittal/coronal stacks
        sigmas[swap] = sigmas[swap][:, [1, 0, 2]]
        s_b, s_0 = _blur(torch.cat([s_b, s_0], 1), sigmas).split(1, dim=1)
        if c.grid_noise[1] > 0:  # noise at the reconstructed resolution (drawn only when on)
            sigma_grid = u(*c.grid_noise) * wm_signal
            corr = u(*c.grid_noise_corr_vox).view(n)
            s_b = _rician(s_b, sigma_grid, generator, corr)
            s_0 = _rician(s_0, sigma_grid, generator, corr)
        adc_measured = (torch.log(s_0.clamp(min=1e-4)) - torch.log(s_b.clamp(min=1e-4))) / b
        adc_measured = adc_measured.clamp(0, 4.5)
        # DWI: beyond physics, random per-class gains and gamma so no single look is learnt
        gains = 1 + (gm * (2 * u(0, 1) - 1) + wm * (2 * u(0, 1) - 1) + csf * (2 * u(0, 1) - 1)) * c.class_gain
        dwi = (s_b * gains).clamp(min=0)
        gamma = torch.exp(c.gamma_sd * torch.randn((n, 1, 1, 1, 1), generator=generator, device=dev))
        dwi = (dwi / _median_in(dwi, brain_p > 0.5)) ** gamma
        # FLAIR: random contrast with dark CSF; lesion appears with time since onset
        onset = labels["onset_h"].to(dev).float().view(n, 1, 1, 1, 1)
        visible = ((onset - 2.0) / 6.0).clamp(0, 1) * u(0.2, 1.0)
        flair = gm * u(1.0, 1.5) + wm + csf * u(0.05, 0.45)
        flair = flair * (1 + 0.06 * _smooth_field(generator, n, shape, (16, 18, 16), dev))
        flair = flair * (1 + (u(*c.fossa_flair) - 1) * fossa)
        flair = flair * (1 + visible * severity.clamp(0, 1.2) * lesion * u(0.3, 1.2)) * bias
        if mimic_flair is not None:
            flair = flair * mimic_flair
        flair = _rician(flair, u(0.01, 0.05), generator)
        flair = _blur(flair, torch.stack([u(1.0, 7.0).view(n) / self.spacing / 2.355, inplane, inplane], 1))
        flair_present = torch.rand(n, generator=generator, device=dev) < c.flair_probability
        # brain mask as preprocessing would find it (slightly eroded or dilated at random)
        brain = brain_p > 0.5
        grow = torch.rand(n, generator=generator, device=dev)
        dilated = F.max_pool3d(brain.float(), 3, 1, 1) > 0.5
        eroded = -F.max_pool3d(-brain.float(), 3, 1, 1) > 0.5
        brain = torch.where((grow < 0.25).view(n, 1, 1, 1, 1), dilated,
                            torch.where((grow > 0.75).view(n, 1, 1, 1, 1), eroded, brain))
        norm = self.normalization
        image = torch.cat([
            (dwi / _median_in(dwi, brain)).clamp(0, norm.clip_relative),
            (adc_measured * norm.adc_scale / 1000.0).clamp(0, norm.adc_clip),  # ADC here is in 10^-3 mm^2/s
            (flair / _median_in(flair, brain)).clamp(0, norm.clip_relative) * flair_present.view(n, 1, 1, 1, 1),
        ], dim=1) * brain
        acute, grown = (lesion >= 0.5).float(), (outcome >= 0.5).float()
        extra = {}
        if alternatives is not None:
            extra = {"outcome_alt": (lesion_maps[:, -alternatives.shape[1]:] >= 0.5).float(),
                     "clinical_values_alt": labels["clinical_values_alt"].to(dev).float(),
                     "clinical_missing_alt": labels["clinical_missing_alt"].to(dev).bool()}
        return {**extra,
            "image": image.float(), "target": grown if task == "outcome" else acute,
            "acute": acute, "outcome": grown, "brain": brain,
            "clinical_values": labels["clinical_values"].to(dev).float(),
            "clinical_missing": labels["clinical_missing"].to(dev).bool(),
            "flair_present": flair_present,
        }

    def _regional(self, n: int, generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
        """Smooth regional gain >= 0: inferior brightening (half of the cases) plus large soft blobs."""
        dev, c = self.device, self.config
        k = torch.arange(shape[0], device=dev, dtype=torch.float32).view(1, 1, -1, 1, 1)
        level = _uniform(generator, n, 0.15, 0.45, dev).view(n, 1, 1, 1, 1) * shape[0]
        width = _uniform(generator, n, 2.0, 6.0, dev).view(n, 1, 1, 1, 1)
        gain = _uniform(generator, n, 0.0, c.regional_gain, dev).view(n, 1, 1, 1, 1)
        gain = gain * (torch.rand((n, 1, 1, 1, 1), generator=generator, device=dev) < 0.5)
        inferior = gain * torch.sigmoid((level - k) / width)
        blobs = torch.relu(_smooth_field(generator, n, shape, (5, 6, 5), dev) - 1.2)
        blobs = blobs * _uniform(generator, n, 0.0, c.regional_gain, dev).view(n, 1, 1, 1, 1)
        return inferior.expand(n, 1, *shape) + blobs

    def _mimics(self, n: int, generator: torch.Generator, allowed: torch.Tensor,
                shape: tuple[int, ...]) -> torch.Tensor:
        """Soft blobs (radius 2-7 mm) in tissue away from the lesion, Poisson-many per case."""
        dev = self.device
        out = torch.zeros((n, 1, *shape), device=dev)
        counts = torch.poisson(torch.full((n,), self.config.mimic_rate, device=dev), generator=generator)
        coords = [torch.arange(s, device=dev, dtype=torch.float32) for s in shape]
        for case in range(n):
            candidates = torch.nonzero(allowed[case, 0] > 0.8)
            for _ in range(int(counts[case])):
                if candidates.numel() == 0:
                    break
                pick = candidates[torch.randint(len(candidates), (1,), generator=generator, device=dev)][0]
                radius = float(_uniform(generator, 1, 1.0, 5.0, dev))
                blob = torch.exp(-sum(((coords[a] - pick[a]) ** 2).view([-1 if b == a else 1 for b in range(3)])
                                      for a in range(3)) / (2 * radius**2))
                out[case, 0] = torch.maximum(out[case, 0], blob)
        return out * allowed.clamp(0, 1)
