"""Monte-Carlo-dropout inference: from DWI/ADC/FLAIR volumes and clinical values to a Prediction.

How the Monte-Carlo samples are made cheap: :class:`~StrokePredictorLib.network.StrokeNet` has a
single dropout, channel-wise, on the last decoder features just before its 1x1x1 head. Everything
up to that dropout (encoder, fusion, decoder) runs **once** per case; the ``N`` samples only
re-draw the dropout masks and apply the 1x1x1 head, which for all samples together is one matrix
product ``(N, C) @ (C, voxels)``. Twenty samples therefore cost a few percent of one forward pass
(measured in ``Testing/benchmarks/bench_inference.py``). The masks are drawn from a CPU random
generator seeded with ``seed``, so results are reproducible and identical on CPU and CUDA up to
floating-point precision.

Outputs (all resampled by world position onto the input DWI grid):

* ``probability``: mean over the samples of the voxel probability (0..1);
* ``entropy``: **predictive entropy** of that mean probability, in bits (0..1): total uncertainty;
* ``std``: **Monte-Carlo standard deviation** of the probability over the samples (model uncertainty);
* ``mask``: ``probability >= threshold`` (uint8 0/1) after every component rule of the bundle's
  post-processing (:meth:`~StrokePredictorLib.postprocess.PostProcessing.apply`): size, ADC gate,
  mean probability and the stricter ADC gate of small components;
* ``samples_volume_ml``: lesion volume of each sample (voxels with ``p >= threshold`` on the model
  grid, components removed by the same rules, the mean-probability rule reading that sample's
  probabilities, times the model voxel volume), giving the median and the 95% interval;
* ``feature_attention`` and ``spatial_attention``: see :mod:`StrokePredictorLib.network`.

Predictions outside the brain mask found by preprocessing are set to 0. The threshold, the
left-right flip averaging (the network also sees the mirrored input; each Monte-Carlo sample uses
the same dropout mask for both views), the smallest component kept and the ADC gate come from the bundle
(:mod:`StrokePredictorLib.postprocess`) unless the caller overrides them. On CUDA the network runs
under bf16 autocast; sampling and statistics are float32.

An outcome network that grows by volume with a ``growth_seed`` block
(:attr:`~StrokePredictorLib.bundle.Bundle.growth_seed`) grows from the core the acute model reports,
not from its deterministic core: the core head's Monte-Carlo mean probability (the same samples
and seed, both views averaged when the block flips), thresholded and filtered by that block's
component rules, is the seed of :meth:`~StrokePredictorLib.network.StrokeNet.growth_channel`. The
grown map is computed once, on the unmirrored view, and mirrored for the other (the growth is
left-right symmetric, see ``_grown_core``). When the block reports no core, the most likely core
grows instead: that probability at or above the block's threshold, without its component rules
(a missed core would cost the whole final infarct: outcome card, runs g27/g28); the prediction
says so in its warnings, and when even that is empty, that no final infarct could be grown.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from StrokePredictorLib.bundle import Bundle, load_bundle, resolve_device
from StrokePredictorLib.clinical import FEATURE_NAMES, ClinicalRecord, encode
from StrokePredictorLib.errors import StrokePredictorError
from StrokePredictorLib.io import Geometry, Volume, read_volume
from StrokePredictorLib.network import ImagingFeatures
from StrokePredictorLib.postprocess import PostProcessing, interval_capped, volume_interval
from StrokePredictorLib.preprocess import Normalization, PreprocessedCase, preprocess

logger = logging.getLogger(__name__)

#: This Predictor applies every rule of :class:`PostProcessing` (``apply``), including the combined
#: component rules; ``python -m Training postprocess`` reads this before it writes such a setting.
COMPONENT_RULE = True

Progress = Callable[[float, str], None]

#: Most Monte-Carlo samples one prediction may draw: the samples are held together in memory
#: (about 6 MB each on the lite grid, 1.1 GB at the cap; the Slicer form allows as many), and the
#: 2.5%/97.5% interval is stable long before.
MAX_MC_SAMPLES = 200
#: Seeds are 64-bit signed integers for torch's generator.
MAX_SEED = 2**63 - 1
#: A lesion larger than this share of the brain mask is flagged: no arterial territory, not even a
#: whole hemisphere's, is half the brain.
LESION_SHARE_WARN = 0.5

#: What :attr:`Prediction.feature_effects` measures (written next to the numbers).
OFFSET_MEANING = (
    "acts_through = how the feature reaches the prediction: \"cross-attention\" (its token is attended to, "
    "so its weight reflects its value), or \"growth offset\" (the outcome model's growth head alone reads it; "
    "the cross-attention sees it as missing, so its weight is that of the missing token; its effect_ml, when "
    "measured, is the way to read it)."
)
EFFECT_MEANING = (
    "effect_ml = predicted lesion volume with this feature set to missing minus the volume with the values as "
    "given (mL; deterministic network output, dropout off, unmirrored view only, on the model grid, thresholded "
    "and post-processed as the lesion mask; the imaging features are computed once, one pass of the clinical part "
    "of the network per given feature). Negative: the given value raises the prediction. null: the feature is "
    "missing already."
)

UNCERTAINTY_MEANING = {
    "entropy": "predictive entropy of the mean Monte-Carlo probability, in bits (0 = certain, 1 = p of 0.5)",
    "std": "standard deviation of the lesion probability over the Monte-Carlo dropout samples",
}


@dataclass
class Prediction:
    """Result of one case, on the input DWI grid (arrays indexed ``[k, j, i]``).

    Attributes:
        probability: float32 mean lesion probability over the MC samples, 0..1.
        entropy: float32 predictive entropy of ``probability`` in bits, 0..1.
        std: float32 MC standard deviation of the probability.
        mask: uint8 0/1, ``probability >= threshold`` without components under ``min_component_ml``
            or with a median ADC at or above ``max_component_adc``.
        spatial_attention: float32 0..1, where the clinical tokens attended.
        geometry: the DWI grid.
        threshold: probability threshold of ``mask``.
        samples_volume_ml: (N,) lesion volume of each MC sample in mL.
        volume_ml: ``{"mask": mL of mask, "median": median of the samples, "ci95": the 95% interval,
            "mc_ci95": [2.5%, 97.5%] of the samples}``; ``ci95`` is ``mc_ci95`` widened by the
            bundle's conformal margin (:func:`StrokePredictorLib.postprocess.volume_interval`).
        feature_attention: clinical feature name -> weight (sums to 1).
        n_components: connected lesion components in ``mask`` (26-connectivity).
        timings: seconds per step.
        mc_samples, seed, device, deterministic: how it was computed.
        clinical: the clinical record used (missing features are None).
        flair_present: whether a FLAIR was used.
        adc_unit: the detected ADC unit.
        registration: FLAIR-to-DWI registration parameters, or None.
        warnings: what the user should know about this prediction: unusual input (an ADC outside
            the usual range, an image without orientation, a FLAIR left out) and implausible output
            (a lesion larger than half the brain, an interval wider than the brain).
        postprocessing: the post-processing used (a dict, see :class:`PostProcessing`).
        brain_volume_ml: volume of the brain mask found on the DWI, in mL (0 when unknown).
        input_statistics: the plausibility measurements of the inputs (see
            :func:`StrokePredictorLib.preprocess.input_statistics`), or None.
        feature_effects: clinical feature name -> measured effect in mL: the change of the
            predicted lesion volume when that feature alone is set to missing (see
            :data:`EFFECT_MEANING`); None for a feature that is missing already; empty when not
            measured.
        offset_features: clinical features that act only through the outcome model's growth
            offset, not through the cross-attention (their attention weight is that of the
            "missing" token; see :attr:`StrokePredictorLib.network.StrokeNet.offset_features`).
    """

    probability: np.ndarray
    entropy: np.ndarray
    std: np.ndarray
    mask: np.ndarray
    spatial_attention: np.ndarray
    geometry: Geometry
    threshold: float
    samples_volume_ml: np.ndarray
    volume_ml: dict
    feature_attention: dict[str, float]
    n_components: int
    timings: dict[str, float] = field(default_factory=dict)
    mc_samples: int = 0
    seed: int = 0
    device: str = "cpu"
    deterministic: bool = False
    clinical: ClinicalRecord = field(default_factory=ClinicalRecord)
    flair_present: bool = False
    adc_unit: str = ""
    registration: dict | None = None
    warnings: list[str] = field(default_factory=list)
    postprocessing: dict = field(default_factory=dict)
    brain_volume_ml: float = 0.0
    input_statistics: dict | None = None
    feature_effects: dict[str, float | None] = field(default_factory=dict)
    offset_features: tuple[str, ...] = ()
    growth_seed: dict = field(default_factory=dict)  # the block of the core that grew (growth by volume), if any

    @property
    def mean_uncertainty_in_lesion(self) -> float:
        """Mean predictive entropy (bits) inside the mask; 0 when the mask is empty."""
        inside = self.mask.astype(bool)
        return float(self.entropy[inside].mean()) if inside.any() else 0.0


@dataclass
class EncodedCase:
    """A preprocessed case with its imaging encoder output (see :meth:`Predictor.encode`).

    Attributes:
        case: the preprocessed case.
        features: :class:`~StrokePredictorLib.network.ImagingFeatures` of the image.
        mirrored: those of the left-right mirrored image, or None without flip averaging.
        encode_s: seconds the encoder took.
    """

    case: PreprocessedCase
    features: ImagingFeatures
    mirrored: ImagingFeatures | None
    encode_s: float = 0.0
    #: the last decoder output, kept for a what-if change of the outcome model's offset features
    #: alone (:meth:`Predictor._decode`): key -> (output, mirrored output or None)
    decoded: dict = field(default_factory=dict, repr=False, compare=False)
    #: what the growth seed's fallback did, for the prediction's warnings ("" when the block reported a core)
    seed_warning: str = field(default="", repr=False, compare=False)


def adc_of(case: PreprocessedCase, normalization: Normalization) -> np.ndarray:
    """The ADC of a preprocessed case on the model grid in 10^-3 mm^2/s (0 outside the brain)."""
    return case.image[1] * np.float32(1000.0 / normalization.adc_scale)


def model_voxel_ml(case: PreprocessedCase) -> float:
    """The volume (mL) of one voxel of the model grid."""
    return float(np.prod(case.mapping.model.spacing)) / 1000.0


def binary_entropy_bits(p: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Entropy of a Bernoulli probability in bits, 0 at p in {0, 1} and 1 at p = 0.5."""
    if isinstance(p, torch.Tensor):
        q = p.clamp(1e-7, 1 - 1e-7)
        return -(q * torch.log2(q) + (1 - q) * torch.log2(1 - q))
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return (-(q * np.log2(q) + (1 - q) * np.log2(1 - q))).astype(np.float32)


def output_warnings(volume_ml: dict, brain_ml: float) -> list[str]:
    """Warnings about an implausible result: a lesion larger than :data:`LESION_SHARE_WARN` of the
    brain, or a 95% interval that reaches the whole brain's volume, where :func:`volume_interval` caps it
    (``volume_ml`` as in :class:`Prediction`)."""
    if brain_ml <= 0:
        return []
    warnings = []
    lesion = float(volume_ml["mask"])
    if lesion > LESION_SHARE_WARN * brain_ml:
        warnings.append(
            f"The lesion ({lesion:.0f} mL) covers {lesion / brain_ml:.0%} of the brain mask ({brain_ml:.0f} mL), more "
            "than any arterial territory: check that the inputs are a DWI and its ADC of the same patient."
        )
    low, high = (float(v) for v in volume_ml["ci95"])
    if interval_capped(high, brain_ml, lesion, float(volume_ml.get("mc_ci95", volume_ml["ci95"])[1])):
        warnings.append(
            f"The 95% volume interval ({low:.0f}-{high:.0f} mL) reaches the volume of the whole brain mask "
            f"({brain_ml:.0f} mL), where it is capped: this model's volumes are far from certain for this input."
        )
    return warnings


class Predictor:
    """Runs a bundle on cases.

    Args:
        bundle: a loaded :class:`Bundle` or the path of a bundle folder.
        device: ``auto`` (CUDA when present, else CPU with a warning), ``cpu``, ``cuda``.
        mc_samples: Monte-Carlo dropout samples N (at least 1).
        seed: seed of the dropout masks (same seed, same result).
        threshold: probability threshold of the lesion mask, in (0, 1); None: the bundle's.
        deterministic: dropout off: all samples equal the deterministic prediction (zero spread).
        min_component_ml: remove lesion components smaller than this (mL); None: the bundle's.
        flip_tta: average with the left-right mirrored input; None: the bundle's.
        max_component_adc: remove lesion components whose median ADC is at least this
            (10^-3 mm^2/s; 0: none); None: the bundle's.
        feature_effects: also measure each given clinical feature's effect on the volume
            (:attr:`Prediction.feature_effects`; one decoder pass per given feature).

    Raises:
        StrokePredictorError: bad device, sample count, threshold or component size; BundleError
            for a bad bundle.
    """

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        device: str = "auto",
        mc_samples: int = 20,
        seed: int = 0,
        threshold: float | None = None,
        deterministic: bool = False,
        min_component_ml: float | None = None,
        flip_tta: bool | None = None,
        max_component_adc: float | None = None,
        feature_effects: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        if not 1 <= int(mc_samples) <= MAX_MC_SAMPLES:
            raise StrokePredictorError(
                f"The number of Monte-Carlo samples must lie between 1 and {MAX_MC_SAMPLES}, got {mc_samples}."
            )
        if not 0 <= int(seed) <= MAX_SEED:
            raise StrokePredictorError(f"The seed must lie between 0 and 2**63 - 1 ({MAX_SEED}), got {seed}.")
        if threshold is not None and not 0.0 < float(threshold) < 1.0:
            raise StrokePredictorError(f"The probability threshold must lie strictly between 0 and 1, got {threshold}.")
        if isinstance(bundle, Bundle):
            bundle.model.to(self.device).eval()
            self.bundle = bundle
        else:
            self.bundle = load_bundle(bundle, device=self.device)
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        try:
            self.postprocessing = self.bundle.postprocessing.replace(
                threshold=None if threshold is None else float(threshold),
                min_component_ml=None if min_component_ml is None else float(min_component_ml),
                flip_tta=None if flip_tta is None else bool(flip_tta),
                max_component_adc=None if max_component_adc is None else float(max_component_adc),
            )
        except ValueError as error:
            raise StrokePredictorError(f"Invalid post-processing setting: {error}.") from None
        self.deterministic = bool(deterministic)
        self.feature_effects = bool(feature_effects)

    @property
    def threshold(self) -> float:
        """Probability threshold of the lesion mask."""
        return self.postprocessing.threshold

    # -- public API ----------------------------------------------------------------------
    def predict(
        self,
        dwi: Volume,
        adc: Volume,
        flair: Volume | None = None,
        clinical: ClinicalRecord | None = None,
        progress: Progress | None = None,
    ) -> Prediction:
        """Predict one case.

        Args:
            dwi: DWI (b=1000 or b=800 trace) volume; every output lies on its grid.
            adc: ADC map (any of the three ISLES units; may be on another overlapping grid).
            flair: optional FLAIR on any grid (registered rigidly onto the DWI).
            clinical: clinical values; None means every feature missing.
            progress: callback(fraction 0..1, message).

        Raises:
            InputImageError: an unusable image (see :func:`StrokePredictorLib.preprocess.preprocess`).
        """
        report = progress or (lambda fraction, message: None)
        report(0.0, "preprocessing")
        case = preprocess(
            dwi, adc, flair, grid=self.bundle.grid, normalization=self.bundle.normalization,
            progress=lambda f, m: report(0.4 * f / 0.3 if f <= 0.3 else 0.4, m),
        )
        return self.predict_preprocessed(case, clinical, progress=report)

    def predict_files(
        self,
        dwi: str | os.PathLike,
        adc: str | os.PathLike,
        flair: str | os.PathLike | None = None,
        clinical: ClinicalRecord | None = None,
        progress: Progress | None = None,
    ) -> Prediction:
        """Read the files and :meth:`predict`."""
        start = time.perf_counter()
        dwi_volume = read_volume(dwi, role="DWI")
        adc_volume = read_volume(adc, role="ADC")
        flair_volume = read_volume(flair, role="FLAIR") if flair else None
        read_s = time.perf_counter() - start
        prediction = self.predict(dwi_volume, adc_volume, flair_volume, clinical, progress)
        prediction.timings = {"read_s": read_s, **prediction.timings}
        prediction.timings["total_s"] = prediction.timings.get("total_s", 0.0) + read_s
        return prediction

    def encode(self, case: PreprocessedCase) -> EncodedCase:
        """Run the imaging encoder (no clinical input) on a preprocessed case, and on its
        left-right mirror when the post-processing averages both views. What-if updates
        (:mod:`StrokePredictorLib.whatif`) keep this and re-run only :meth:`predict_encoded`."""
        tick = time.perf_counter()
        model = self.bundle.model
        device = self.device
        with torch.inference_mode():
            image = torch.from_numpy(np.ascontiguousarray(case.image))[None].to(device)
            flair = torch.tensor([case.flair_present], device=device)
            seed_flips = self.bundle.growth_seed is not None and self.bundle.growth_seed.flip_tta
            with self._autocast():
                encoded = model.encode_image(image, flair)
                # left-right mirror: the i axis of the model grid (last array axis) points left
                mirrored = (model.encode_image(image.flip(-1), flair) if self.postprocessing.flip_tta or seed_flips
                            else None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return EncodedCase(case, encoded, mirrored, time.perf_counter() - tick)

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _decode(self, encoded: EncodedCase, record: ClinicalRecord, mirrored: bool = True, keep: bool = True
                ) -> tuple[dict, dict | None]:
        """Fusion, decoder and expansion for ``record`` on the cached encoder output (both views,
        or only the unmirrored one with ``mirrored`` False).

        For an outcome model whose onset time and treatment act only through the growth offset
        (:attr:`~StrokePredictorLib.network.StrokeNet.offset_features`), the decoder's output is
        kept on ``encoded`` (unless ``keep`` is False); a record that differs from the kept one only
        in those features re-runs just the growth offset
        (:meth:`~StrokePredictorLib.network.StrokeNet.growth_channel`), with the same result as a
        full pass."""
        values, missing = encode(record)
        device = self.device
        inputs = (torch.from_numpy(values)[None].to(device), torch.from_numpy(missing)[None].to(device))
        model = self.bundle.model
        views = (encoded.features,) + ((encoded.mirrored,) if encoded.mirrored is not None and mirrored else ())
        key = self._decoder_key(values, missing, len(views))
        seeded = self.bundle.growth_seed is not None
        with torch.inference_mode(), self._autocast():
            kept = encoded.decoded.get(key) if key is not None else None
            if kept is None:
                outs = tuple(model.decode(view, *inputs, grow=not seeded) for view in views)
                seed = None
                if seeded:
                    seed, encoded.seed_warning = self._growth_seed(encoded.case, outs)
                    outs = self._grown(outs, views, inputs, seed)
                if key is not None and keep:  # one entry: the scenario being explored
                    encoded.decoded.clear()
                    encoded.decoded[key] = (outs, seed)
            else:
                kept_outs, seed = kept
                outs = tuple({**out, "features": out["features"][:, :-1]} for out in kept_outs)
                outs = self._grown(outs, views, inputs, seed)
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def _grown(self, outs: tuple, views: tuple, inputs: tuple, seed: torch.Tensor | None) -> tuple:
        """``outs`` (decoder outputs without the growth channel) with the growth channel appended:
        each view its own, or, from a reported ``seed`` (model grid, unmirrored), one grown map,
        mirrored for the mirrored view."""
        model = self.bundle.model
        if seed is None:
            channels = [model.growth_channel(out["features"], out["clinical_tokens"], *inputs, view.tissue)
                        for out, view in zip(outs, views)]  # noqa: B905 (Python 3.9 in Slicer)
        else:
            grown = model.growth_channel(outs[0]["features"], outs[0]["clinical_tokens"], *inputs,
                                         views[0].tissue, seed=seed)
            channels = [grown, grown.flip(-1)][:len(outs)]
        return tuple({**out, "features": torch.cat([out["features"], channel], dim=1)}
                     for out, channel in zip(outs, channels))  # noqa: B905

    def _growth_seed(self, case: PreprocessedCase, outs: tuple) -> tuple[torch.Tensor, str]:
        """The core that grows (:attr:`Bundle.growth_seed`): the core head's Monte-Carlo mean
        probability over the brain (the predictor's samples and seed; both views averaged, one
        dropout mask per sample for both, when the block flips and both were decoded), turned into a
        mask by the block's threshold and component rules; when they leave nothing, the most likely
        core: the same probability at or above the threshold, without the component rules.

        Returns:
            (1, K, J, I) bool on the model grid, and a warning for the prediction ("" when the block
            reported a core).
        """
        block = self.bundle.growth_seed
        mirrored = outs[1] if block.flip_tta and len(outs) > 1 else None
        probs, index = self._brain_samples(case, outs[0], mirrored, core_only=True)
        mean = torch.zeros(case.brain.size, device=self.device)
        mean[index] = probs.mean(dim=0)
        probability = mean.reshape(case.brain.shape).detach().float().cpu().numpy()
        voxel_ml = model_voxel_ml(case)
        adc = adc_of(case, self.bundle.normalization) if block.needs_adc else None
        seed = block.apply(probability, voxel_ml, adc)
        warning = ""
        if not seed.any():
            seed = probability >= block.threshold
            warning = (f"The acute model reports no lesion at its operating point (probability >= {block.threshold:g} "
                       f"and its component rules): the final infarct grew from the most likely core instead, "
                       f"{seed.sum() * voxel_ml:.2f} mL at that probability without the component rules."
                       if seed.any() else
                       f"The acute model sees no core (no voxel at probability >= {block.threshold:g}): no final "
                       f"infarct could be grown from this scan.")
        return torch.from_numpy(np.ascontiguousarray(seed))[None].to(self.device), warning

    def _brain_samples(self, case: PreprocessedCase, out: dict, mirrored: dict | None, core_only: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Monte-Carlo probabilities at the brain voxels: (N, Vb) (one row when deterministic) and the
        voxels' flat indices. Only brain voxels are sampled (outside the brain the probability is 0),
        so the tail's cost scales with the brain, not the grid; with ``mirrored`` both views are one
        batch of voxels (each sample, one dropout mask for both) and their probabilities averaged.
        ``core_only``: a growth network's core head alone (the growth seed)."""
        index = torch.nonzero(torch.from_numpy(case.brain).to(self.device).flatten()).flatten()
        features = out["features"].flatten(2)[:, :, index]  # (1, C, Vb)
        if mirrored is not None:
            features = torch.cat([features, mirrored["features"].flip(-1).flatten(2)[:, :, index]], dim=2)
        generator = torch.Generator().manual_seed(self.seed)
        n_computed = 1 if self.deterministic else self.mc_samples
        probs = torch.sigmoid(self.bundle.model.sample_logits(
            features[..., None, None], n_computed, generator, self.deterministic, core_only=core_only).flatten(1))
        if mirrored is not None:
            probs = 0.5 * (probs[:, : index.numel()] + probs[:, index.numel():])
        return probs, index

    def _decoder_key(self, values: np.ndarray, missing: np.ndarray, views: int) -> tuple | None:
        """What the decoder's output depends on besides the image: the clinical values and missing
        flags other than the offset features', the number of views and the autocast state; None
        when the model has no offset features (every clinical change re-runs the decoder)."""
        offset = [FEATURE_NAMES.index(name) for name in self.bundle.model.offset_features]
        if not offset:
            return None
        values, missing = values.copy(), missing.copy()
        values[offset], missing[offset] = 0, False
        autocast = torch.is_autocast_enabled(self.device.type)
        return values.tobytes(), missing.tobytes(), views, autocast, id(self.bundle.model)

    def predict_preprocessed(
        self, case: PreprocessedCase, clinical: ClinicalRecord | None = None, progress: Progress | None = None
    ) -> Prediction:
        """Run the network and the Monte-Carlo sampling on a preprocessed case."""
        report = progress or (lambda fraction, message: None)
        report(0.45, "running the network")
        return self.predict_encoded(self.encode(case), clinical, progress=report)

    def predict_encoded(
        self, encoded: EncodedCase, clinical: ClinicalRecord | None = None, progress: Progress | None = None,
        effects: bool | None = None,
    ) -> Prediction:
        """The part of a prediction that depends on the clinical values: fusion, decoder, Monte-Carlo
        sampling, post-processing and resampling onto the DWI grid, from :meth:`encode`'s output.
        Identical to :meth:`predict_preprocessed` with the same ``clinical``.

        ``timings["network_s"]`` counts the encoder once (as a full prediction does);
        ``timings["decode_s"]`` is the part re-run by a what-if update. ``effects`` (default: the
        predictor's ``feature_effects``) also measures :attr:`Prediction.feature_effects`.
        """
        report = progress or (lambda fraction, message: None)
        case = encoded.case
        timings = {f"preprocess_{k}": v for k, v in case.timings.items()}
        start = time.perf_counter()
        record = clinical if clinical is not None else ClinicalRecord()
        device = self.device
        tick = time.perf_counter()
        post = self.postprocessing
        with torch.inference_mode():
            out, mirrored = self._decode(encoded, record)
            if not post.flip_tta:  # decoded for the growth seed's flip averaging alone
                mirrored = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings["decode_s"] = time.perf_counter() - tick
            timings["network_s"] = encoded.encode_s + timings["decode_s"]
            report(0.7, f"sampling {self.mc_samples} Monte-Carlo dropout masks")
            tick = time.perf_counter()
            probs, index = self._brain_samples(case, out, mirrored)
            n_computed = probs.shape[0]  # 1 when deterministic: every sample is the same
            mean = torch.zeros(case.brain.size, device=device)
            std = torch.zeros(case.brain.size, device=device)
            mean[index] = probs.mean(dim=0)
            if n_computed > 1:
                # the population standard deviation; torch.std over the sample axis is ~6x slower here
                std[index] = (probs - mean[index]).square_().mean(dim=0).sqrt_()
            mean = mean.reshape(case.brain.shape)
            std = std.reshape(case.brain.shape)
            voxel_ml = model_voxel_ml(case)
            adc_model = adc_of(case, self.bundle.normalization) if post.needs_adc else None
            sample_volumes = self._sample_volumes(probs, index, case.brain.shape, voxel_ml, adc_model)
            if n_computed != self.mc_samples:
                sample_volumes = np.repeat(sample_volumes, self.mc_samples)
            mean_np = mean.float().cpu().numpy()
            std_np = std.float().cpu().numpy()
            spatial = out["spatial_attention"][0, 0].float()
            weights = out["feature_attention"][0].double()
            if mirrored is not None:
                spatial = 0.5 * (spatial + mirrored["spatial_attention"][0, 0].float().flip(-1))
                weights = 0.5 * (weights + mirrored["feature_attention"][0].double())
            spatial_np = spatial.cpu().numpy()
            weights = weights.cpu().numpy()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings["sampling_s"] = time.perf_counter() - tick
        report(0.8, "resampling onto the DWI grid")
        tick = time.perf_counter()
        mapping = case.mapping
        probability = np.clip(mapping.to_source(mean_np, order=1), 0.0, 1.0).astype(np.float32)
        std_source = np.clip(mapping.to_source(std_np, order=1), 0.0, 0.5).astype(np.float32)
        spatial = np.clip(mapping.to_source(spatial_np, order=1), 0.0, 1.0).astype(np.float32)
        entropy = binary_entropy_bits(probability)
        adc_source = None if adc_model is None else mapping.to_source(adc_model, order=1)
        mask, n_components = post.apply_counted(probability, mapping.source.voxel_volume_ml, adc_source)
        mask = mask.astype(np.uint8)
        timings["resample_s"] = time.perf_counter() - tick
        weights = weights / weights.sum()
        geometry = mapping.source
        mc_interval = [float(np.percentile(sample_volumes, 2.5)), float(np.percentile(sample_volumes, 97.5))]
        mask_ml = float(mask.sum() * geometry.voxel_volume_ml)
        volume = {
            "mask": mask_ml,
            "median": float(np.median(sample_volumes)),
            "ci95": volume_interval(mask_ml, mc_interval, post.volume_log_margin, case.brain_volume_ml),
            "mc_ci95": mc_interval,
        }
        effects_ml: dict[str, float | None] = {}
        if self.feature_effects if effects is None else effects:
            report(0.85, "measuring the clinical features' effects")
            tick = time.perf_counter()
            effects_ml = self._feature_effects(encoded, record, self._deterministic_volume(case, out, None))
            timings["effects_s"] = time.perf_counter() - tick
        timings["inference_s"] = time.perf_counter() - start + encoded.encode_s
        timings["total_s"] = timings["inference_s"] + case.timings.get("total_s", 0.0)
        report(0.9, "prediction done")
        return Prediction(
            probability=probability,
            entropy=entropy,
            std=std_source,
            mask=mask,
            spatial_attention=spatial,
            geometry=geometry,
            threshold=post.threshold,
            samples_volume_ml=sample_volumes.astype(np.float64),
            volume_ml=volume,
            feature_attention={name: float(w) for name, w in zip(FEATURE_NAMES, weights)},  # noqa: B905
            n_components=int(n_components),
            timings=timings,
            mc_samples=self.mc_samples,
            seed=self.seed,
            device=str(device),
            deterministic=self.deterministic,
            clinical=record,
            flair_present=bool(case.flair_present),
            adc_unit=case.adc_unit,
            registration=case.registration.to_dict() if case.registration is not None else None,
            warnings=(list(case.warnings) + ([encoded.seed_warning] if encoded.seed_warning else [])
                      + output_warnings(volume, case.brain_volume_ml)),
            postprocessing=post.to_dict(),
            brain_volume_ml=float(case.brain_volume_ml),
            input_statistics=case.statistics.to_dict() if case.statistics is not None else None,
            feature_effects=effects_ml,
            offset_features=tuple(self.bundle.model.offset_features),
            growth_seed=self.bundle.growth_seed.to_dict() if self.bundle.growth_seed is not None else {},
        )

    def _deterministic_volume(self, case: PreprocessedCase, out: dict, mirrored: dict | None) -> float:
        """Lesion volume (mL, model grid) of the dropout-free output: both views averaged, outside
        the brain 0, thresholded and post-processed as the mask is."""
        model = self.bundle.model
        post = self.postprocessing
        with torch.inference_mode():
            probability = torch.sigmoid(model.sample_logits(out["features"], 1, deterministic=True)[0, 0])
            if mirrored is not None:
                flipped = model.sample_logits(mirrored["features"], 1, deterministic=True)[0, 0].flip(-1)
                probability = 0.5 * (probability + torch.sigmoid(flipped))
            probability = probability.float().cpu().numpy() * case.brain.astype(bool)
        voxel_ml = model_voxel_ml(case)
        adc = adc_of(case, self.bundle.normalization) if post.needs_adc else None
        return float(post.apply(probability, voxel_ml, adc).sum()) * voxel_ml

    def _feature_effects(self, encoded: EncodedCase, record: ClinicalRecord, baseline_ml: float
                         ) -> dict[str, float | None]:
        """Each given feature's effect (mL): the volume with it set to missing minus ``baseline_ml``
        (both from the unmirrored view only: one decoder pass per feature, also with flip averaging)."""
        effects: dict[str, float | None] = {}
        for name in FEATURE_NAMES:
            if record.values[name] is None:
                effects[name] = None
                continue
            without = ClinicalRecord({**record.values, name: None})
            out, _ = self._decode(encoded, without, mirrored=False, keep=False)
            effects[name] = self._deterministic_volume(encoded.case, out, None) - baseline_ml
        return effects

    def _sample_volumes(self, probs: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...],
                        voxel_ml: float, adc: np.ndarray | None = None) -> np.ndarray:
        """Lesion volume (mL) of every Monte-Carlo sample on the model grid, post-processed as
        the mask is (:meth:`PostProcessing.kept_voxels`, the voxel count of
        :meth:`PostProcessing.apply`, on each sample's probabilities; ``probs`` (N, Vb) at the
        brain voxels ``index``; ``adc``: model grid, 10^-3 mm^2/s, needed when a rule reads it)."""
        post: PostProcessing = self.postprocessing
        above = probs >= post.threshold  # (N, Vb)
        if not post.filters_components:
            return above.sum(dim=1).double().cpu().numpy() * voxel_ml
        rows = above.cpu().numpy()
        volumes = np.zeros(rows.shape[0])
        columns = np.flatnonzero(rows.any(axis=0))  # brain voxels above the threshold in some sample
        if columns.size == 0:
            return volumes
        # Components are labelled only inside the box around every sample's lesion voxels (plus one
        # empty voxel each side): the same components as on the whole grid, at a fraction of the cost.
        kji = np.stack(np.unravel_index(index.cpu().numpy()[columns], shape), axis=1)
        low = np.maximum(kji.min(axis=0) - 1, 0)
        high = np.minimum(kji.max(axis=0) + 2, shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))  # noqa: B905
        box_shape = tuple(int(b - a) for a, b in zip(low, high))  # noqa: B905
        local = np.ravel_multi_index(tuple((kji - low).T), box_shape)  # each column's place in the box
        rows = rows[:, columns]
        values = probs[:, torch.from_numpy(columns)].float().cpu().numpy() if post.min_component_probability > 0 \
            else None
        adc_box = adc[box] if adc is not None else None

        def count(n: int) -> int:
            mask = np.zeros(int(np.prod(box_shape)), dtype=bool)
            mask[local[rows[n]]] = True
            probability = None
            if values is not None:  # below the threshold stays 0, as in the full map
                probability = np.zeros(mask.size, dtype=np.float32)
                probability[local[rows[n]]] = values[n, rows[n]]
                probability = probability.reshape(box_shape)
            return post.kept_voxels(mask.reshape(box_shape), probability, voxel_ml, adc_box)

        # scipy's labelling releases the GIL: on 2 threads the 20 samples of the sample case took 54 ms
        # instead of 98 ms
        workers = max(1, min(torch.get_num_threads(), rows.shape[0]))
        if workers == 1:
            counts = [count(n) for n in range(rows.shape[0])]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                counts = list(pool.map(count, range(rows.shape[0])))
        volumes[:] = np.asarray(counts, dtype=np.float64) * voxel_ml
        return volumes

