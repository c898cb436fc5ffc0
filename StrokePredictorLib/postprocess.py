"""Post-processing of the lesion probability: the bundle's threshold, flip averaging, the
removal of small components and of components without restricted diffusion, chosen on
validation data and stored in the bundle.

As nnU-Net does, the post-processing is part of the model: ``python -m Training postprocess``
measures every combination on validation cases that the network never trained on (never on test
or real validation cases) and writes the best into the bundle's ``model.json`` under
``postprocessing``. A bundle without that block gets :data:`DEFAULT` (threshold 0.5, nothing else),
which is how every bundle behaved before the block existed.

* ``threshold``: a voxel is lesion when the mean Monte-Carlo probability reaches it.
* ``flip_tta``: the network also runs on the left-right mirrored input (the i axis of the model
  grid points left), and the two probabilities are averaged (one more forward pass).
* ``min_component_ml``: connected lesion components (26-connectivity) smaller than this are
  removed from the mask and from every Monte-Carlo sample's volume.
* ``max_component_adc``: components whose median ADC (10^-3 mm^2/s, the unit of the network's
  ADC channel) is at least this are removed the same way (0 keeps all). An acute infarct restricts
  diffusion; a DWI-bright region with normal ADC is T2 shine-through, a susceptibility or
  B0-inhomogeneity artefact or another mimic, which is how radiologists read DWI with ADC.
* ``min_component_probability``: components whose mean probability is below this are removed
  (0 keeps all). The predictive entropy of the Monte-Carlo mean is a function of that mean, so this
  is also the rule on a component's uncertainty.
* ``small_component_ml`` and ``small_component_adc``: components smaller than ``small_component_ml``
  must also have a median ADC below ``small_component_adc`` (both > 0 to act): a stricter ADC gate
  for small components, which on real scans are mostly mimics with a normal ADC (susceptibility,
  midline spots), while a small embolus restricts diffusion. Small true lesions are kept, unlike
  with a plain ``min_component_ml``.
  All component rules act together (:meth:`PostProcessing.keep`); :meth:`PostProcessing.apply`
  turns a probability map into the mask.
* ``volume_log_margin``: the 95% lesion-volume interval. Monte-Carlo dropout alone (one dropout
  layer before the head) gives far too narrow an interval (13% coverage measured on simulated test
  cases), so the interval is widened to at least ``[(V + 1) e^-m - 1, (V + 1) e^m - 1]`` mL around
  the mask volume ``V``, with ``m`` the split-conformal 95% quantile of
  ``|log((V_true + 1) / (V + 1))|`` over the validation cases (the +1 mL keeps empty and tiny
  lesions finite). 0 keeps the Monte-Carlo interval.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from StrokePredictorLib.errors import StrokePredictorError

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
VOLUME_OFFSET_ML = 1.0


@dataclass(frozen=True)
class PostProcessing:
    """How the probability becomes the lesion mask (see the module docstring).

    Attributes:
        threshold: probability threshold, strictly between 0 and 1.
        flip_tta: average with the prediction of the left-right mirrored input.
        min_component_ml: smallest lesion component kept, in mL (0 keeps all).
        max_component_adc: components with a median ADC at or above this (10^-3 mm^2/s) are
            removed (0 keeps all).
        volume_log_margin: conformal margin of the 95% volume interval (natural log; 0: Monte-Carlo only).
        selected_on: where the values were chosen (free text, for the model card).
        min_component_probability: components with a lower mean probability are removed (0 keeps all).
        small_component_ml: components smaller than this (mL) must have a median ADC below
            ``small_component_adc`` (0 keeps all).
        small_component_adc: the stricter ADC gate of small components (10^-3 mm^2/s; 0: off).
    """

    threshold: float = 0.5
    flip_tta: bool = False
    min_component_ml: float = 0.0
    max_component_adc: float = 0.0
    volume_log_margin: float = 0.0
    selected_on: str = ""
    min_component_probability: float = 0.0
    small_component_ml: float = 0.0
    small_component_adc: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and 0.0 < float(self.threshold) < 1.0):
            raise ValueError(f"postprocessing.threshold must lie strictly between 0 and 1, got {self.threshold!r}")
        if not (isinstance(self.min_component_ml, (int, float)) and math.isfinite(self.min_component_ml)
                and self.min_component_ml >= 0):
            raise ValueError(f"postprocessing.min_component_ml must be a number >= 0 (mL), "
                             f"got {self.min_component_ml!r}")
        if not (isinstance(self.max_component_adc, (int, float)) and math.isfinite(self.max_component_adc)
                and self.max_component_adc >= 0):
            raise ValueError(f"postprocessing.max_component_adc must be a number >= 0 (10^-3 mm^2/s), "
                             f"got {self.max_component_adc!r}")
        if not (isinstance(self.volume_log_margin, (int, float)) and math.isfinite(self.volume_log_margin)
                and self.volume_log_margin >= 0):
            raise ValueError(f"postprocessing.volume_log_margin must be a number >= 0, got {self.volume_log_margin!r}")
        if not isinstance(self.flip_tta, bool):
            raise ValueError(f"postprocessing.flip_tta must be true or false, got {self.flip_tta!r}")
        if not (isinstance(self.min_component_probability, (int, float))
                and 0.0 <= float(self.min_component_probability) < 1.0):
            raise ValueError(f"postprocessing.min_component_probability must lie in [0, 1), "
                             f"got {self.min_component_probability!r}")
        for name in ("small_component_ml", "small_component_adc"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"postprocessing.{name} must be a number >= 0, got {value!r}")

    @property
    def needs_adc(self) -> bool:
        """Whether a rule reads the components' median ADC."""
        return self.max_component_adc > 0 or self.small_rule

    @property
    def small_rule(self) -> bool:
        """Whether the stricter ADC gate for small components acts."""
        return self.small_component_ml > 0 and self.small_component_adc > 0

    @property
    def filters_components(self) -> bool:
        """Whether any rule removes components (size, ADC, mean probability): otherwise the mask
        is the thresholded map and needs no labelling."""
        return self.min_component_ml > 0 or self.needs_adc or self.component_rule

    @property
    def component_rule(self) -> bool:
        """Whether a rule beyond size and one ADC gate acts (mean probability or the small-component gate)."""
        return self.min_component_probability > 0 or self.small_rule

    def keep(self, sizes_ml: np.ndarray, medians_adc: np.ndarray | None = None,
             mean_probability: np.ndarray | None = None) -> np.ndarray:
        """Which components are kept (bool per component) under every rule together.

        Args:
            sizes_ml: component sizes (mL).
            medians_adc: their median ADC (10^-3 mm^2/s); needed when :attr:`needs_adc`.
            mean_probability: their mean probability; needed when ``min_component_probability`` > 0.
        """
        keep = kept_components(sizes_ml, self.min_component_ml, medians_adc, self.max_component_adc)
        if self.min_component_probability > 0:
            if mean_probability is None:
                raise ValueError("the components' mean probability is needed when min_component_probability > 0")
            keep &= np.asarray(mean_probability) >= self.min_component_probability
        if self.small_rule:
            if medians_adc is None:
                raise ValueError("the components' median ADC is needed for the small-component ADC gate")
            keep &= (np.asarray(sizes_ml) >= self.small_component_ml) | (medians_adc < self.small_component_adc)
        return keep

    def apply(self, probability: np.ndarray, voxel_ml: float, adc: np.ndarray | None = None) -> np.ndarray:
        """The lesion mask (bool) of a probability map: ``probability >= threshold`` and every component rule.

        Args:
            probability: voxel probabilities.
            voxel_ml: voxel volume (mL).
            adc: ADC of the same shape (10^-3 mm^2/s); needed when :attr:`needs_adc`.
        """
        mask = np.asarray(probability) >= self.threshold
        if not mask.any() or not self.filters_components:
            return mask
        labels, _, kept = self._components(mask, probability, voxel_ml, adc)
        return select_components(labels, kept)

    def apply_counted(self, probability: np.ndarray, voxel_ml: float, adc: np.ndarray | None = None
                      ) -> tuple[np.ndarray, int]:
        """:meth:`apply` and the number of 26-connected components of its mask, from the one labelling
        (removing components never joins or splits the others)."""
        mask = np.asarray(probability) >= self.threshold
        if not mask.any():
            return mask, 0
        if not self.filters_components:
            return mask, count_components(mask)
        labels, _, kept = self._components(mask, probability, voxel_ml, adc)
        return select_components(labels, kept), int(np.count_nonzero(kept))

    def kept_voxels(self, mask: np.ndarray, probability: np.ndarray | None, voxel_ml: float,
                    adc: np.ndarray | None = None) -> int:
        """How many voxels :meth:`apply` keeps, from its thresholded ``mask`` (bool), without
        building the filtered mask: the Monte-Carlo samples' volumes need only this.
        ``probability`` (same shape) is read only by the mean-probability rule."""
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return 0
        if not self.filters_components:
            return int(np.count_nonzero(mask))
        _, voxels, kept = self._components(mask, probability, voxel_ml, adc)
        return int(voxels[kept].sum())

    def _components(self, mask: np.ndarray, probability: np.ndarray | None, voxel_ml: float,
                    adc: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The labels of ``mask``'s components, their voxel counts and which the rules keep."""
        if self.needs_adc and (adc is None or np.shape(adc) != mask.shape):
            raise ValueError("PostProcessing.apply needs an ADC array of the probability's shape for its ADC rules")
        if self.min_component_probability > 0 and (probability is None or np.shape(probability) != mask.shape):
            raise ValueError("PostProcessing: the mean-probability rule needs the probability map of the mask's shape")
        labels, count = ndimage.label(mask, structure=CONNECTIVITY)
        voxels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        sizes_ml = voxels * float(voxel_ml)  # as label_components reports them
        medians = component_medians(adc, labels, count) if self.needs_adc else None
        means = component_means(probability, labels, count) if self.min_component_probability > 0 else None
        return labels, voxels, self.keep(sizes_ml, medians, means)

    def replace(self, **changes: object) -> PostProcessing:
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        values = asdict(self)
        values.update({key: value for key, value in changes.items() if value is not None})
        return PostProcessing(**values)

    def to_dict(self) -> dict:
        """The ``model.json`` block; the component-rule fields added later are left out while off,
        so that a block without them reads and compares as before (and older readers accept it)."""
        block = asdict(self)
        for name in _LATER_FIELDS:
            if not block[name]:
                block.pop(name)
        return block

    @classmethod
    def from_dict(cls, data: dict | None) -> PostProcessing:
        """From ``model.json``; missing keys take the defaults, unknown keys are refused."""
        if not data:
            return DEFAULT
        if not isinstance(data, dict):
            raise ValueError(f"postprocessing must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(asdict(DEFAULT)))
        if unknown:
            raise ValueError(f"postprocessing has unknown keys {unknown}; expected {sorted(asdict(DEFAULT))}")
        return cls(**data)

    def describe(self) -> str:
        """One line for logs and summaries."""
        parts = [f"threshold {self.threshold:g}"]
        if self.flip_tta:
            parts.append("left-right flip averaging")
        if self.min_component_ml > 0:
            parts.append(f"components under {self.min_component_ml:g} mL removed")
        if self.max_component_adc > 0:
            parts.append(f"components with median ADC >= {self.max_component_adc:g} x10^-3 mm^2/s removed")
        if self.min_component_probability > 0:
            parts.append(f"components with mean probability < {self.min_component_probability:g} removed")
        if self.small_rule:
            parts.append(f"components under {self.small_component_ml:g} mL kept only with median ADC < "
                         f"{self.small_component_adc:g} x10^-3 mm^2/s")
        if self.volume_log_margin > 0:
            parts.append(f"volume interval at least x/÷ {math.exp(self.volume_log_margin):.2f} (conformal)")
        return ", ".join(parts)


#: Fields added after bundles had been shipped; :meth:`PostProcessing.to_dict` writes them only when on.
_LATER_FIELDS = ("min_component_probability", "small_component_ml", "small_component_adc")
DEFAULT = PostProcessing()


def label_components(mask: np.ndarray, voxel_ml: float) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of ``mask``: the label array and each component's size in mL
    (``sizes_ml[n - 1]`` for label ``n``)."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=CONNECTIVITY)
    return labels, np.bincount(labels.ravel(), minlength=count + 1)[1:] * float(voxel_ml)


def component_medians(values: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Median of ``values`` over each of the ``count`` labelled components (``[n - 1]`` for label ``n``)."""
    if count == 0:
        return np.zeros(0)
    flat = np.asarray(labels).ravel()
    inside = flat > 0
    label, value = flat[inside], np.asarray(values, dtype=np.float64).ravel()[inside]
    order = np.lexsort((value, label))  # by component, then by value: one sort instead of one per component
    label, value = label[order], value[order]
    sizes = np.bincount(label, minlength=count + 1)[1:]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    low, high = starts + (sizes - 1) // 2, starts + sizes // 2
    safe = sizes > 0
    medians = np.full(count, np.nan)
    medians[safe] = 0.5 * (value[low[safe]] + value[high[safe]])
    return medians


def component_means(values: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Mean of ``values`` over each of the ``count`` labelled components (``[n - 1]`` for label ``n``)."""
    if count == 0:
        return np.zeros(0)
    sums = np.bincount(labels.ravel(), weights=np.asarray(values, dtype=np.float64).ravel(), minlength=count + 1)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return sums[1:] / np.maximum(sizes[1:], 1)


def kept_components(sizes_ml: np.ndarray, min_ml: float, medians_adc: np.ndarray | None = None,
                    max_adc: float = 0.0) -> np.ndarray:
    """Which components are kept (bool per component): at least ``min_ml`` mL and, when ``max_adc``
    > 0, a median ADC (``medians_adc``, from :func:`component_medians`) below ``max_adc``."""
    keep = np.asarray(sizes_ml) >= min_ml
    if max_adc > 0:
        if medians_adc is None:
            raise ValueError("the components' median ADC is needed when max_adc > 0")
        keep &= medians_adc < max_adc
    return keep


def select_components(labels: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Bool mask of the components of :func:`label_components` for which ``kept`` (per component) is true."""
    return np.concatenate([[False], kept])[labels]


def filter_components(mask: np.ndarray, voxel_ml: float, min_ml: float = 0.0,
                      adc: np.ndarray | None = None, max_adc: float = 0.0) -> np.ndarray:
    """``mask`` (bool or 0/1) without its 26-connected components smaller than ``min_ml`` mL and,
    when ``max_adc`` > 0, without those whose median ``adc`` (same shape, 10^-3 mm^2/s) is at least
    ``max_adc``.

    Returns a bool array of the same shape (the input itself, as bool, when nothing is filtered).
    """
    mask = np.asarray(mask, dtype=bool)
    if (min_ml <= 0 and max_adc <= 0) or not mask.any():
        return mask
    if max_adc > 0 and (adc is None or np.shape(adc) != mask.shape):
        raise ValueError("filter_components needs an ADC array of the mask's shape when max_adc > 0")
    labels, sizes_ml = label_components(mask, voxel_ml)
    medians = component_medians(adc, labels, sizes_ml.size) if max_adc > 0 else None
    return select_components(labels, kept_components(sizes_ml, min_ml, medians, max_adc))


def remove_small_components(mask: np.ndarray, min_ml: float, voxel_ml: float) -> np.ndarray:
    """``mask`` (bool or 0/1) without its 26-connected components smaller than ``min_ml`` mL
    (a bool array; the input itself, as bool, when ``min_ml`` is 0)."""
    return filter_components(mask, voxel_ml, min_ml)


def volume_interval(volume_ml: float, mc_interval_ml: tuple[float, float], log_margin: float,
                    brain_ml: float = 0.0) -> list[float]:
    """The 95% lesion-volume interval: the Monte-Carlo interval widened to at least the conformal
    band ``[(V + 1) e^-m - 1, (V + 1) e^m - 1]`` around the mask volume ``V`` (mL, never below 0).

    With ``brain_ml`` > 0 (the brain mask's volume) the conformal upper bound is capped there, never
    below ``V`` or the Monte-Carlo interval: no lesion is larger than the brain, so the cap keeps the
    coverage, and a wide margin no longer reports tens of litres.
    """
    low, high = float(mc_interval_ml[0]), float(mc_interval_ml[1])
    mc_high = high
    if log_margin > 0:
        base = float(volume_ml) + VOLUME_OFFSET_ML
        low = max(0.0, min(low, base * math.exp(-log_margin) - VOLUME_OFFSET_ML))
        high = max(high, base * math.exp(log_margin) - VOLUME_OFFSET_ML)
    if brain_ml > 0:
        high = max(min(high, float(brain_ml)), mc_high, float(volume_ml))
    return [low, high]


def interval_capped(high_ml: float, brain_ml: float, volume_ml: float, mc_high_ml: float = 0.0) -> bool:
    """Whether :func:`volume_interval` capped the upper bound ``high_ml`` at the brain's volume:
    it equals ``brain_ml`` and lies above the mask volume and the Monte-Carlo bound, which the cap never cuts."""
    return brain_ml > 0 and math.isclose(high_ml, brain_ml, rel_tol=1e-9) and high_ml > max(volume_ml, mc_high_ml)


def conformal_log_margin(true_ml: np.ndarray, predicted_ml: np.ndarray, coverage: float = 0.95) -> float:
    """Split-conformal margin: the ``ceil((n + 1) coverage) / n`` quantile of
    ``|log((V_true + 1) / (V_pred + 1))|`` over ``n`` calibration cases (their largest value when
    ``n`` is too small for the requested coverage)."""
    residual = np.sort(np.abs(np.log((np.asarray(true_ml, float) + VOLUME_OFFSET_ML)
                                     / (np.asarray(predicted_ml, float) + VOLUME_OFFSET_ML))))
    if residual.size == 0:
        raise ValueError("conformal_log_margin needs at least one calibration case")
    rank = min(int(math.ceil((residual.size + 1) * coverage)), residual.size)
    return float(residual[rank - 1])


def count_components(mask: np.ndarray) -> int:
    """Number of 26-connected components of ``mask``."""
    return int(ndimage.label(np.asarray(mask, dtype=bool), structure=CONNECTIVITY)[1])


def read_block(path: str | Path, option: str) -> PostProcessing:
    """The post-processing block of a JSON file with a ``postprocessing`` object (``model.json``,
    ``python -m Training postprocess``'s ``postprocess.json``, a guard file). ``option`` names the
    flag that gave ``path``, for the error.

    Raises:
        StrokePredictorError: the file cannot be read, or holds no valid block.
    """
    try:
        data = json.loads(Path(path).read_text())
        return PostProcessing.from_dict(data["postprocessing"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StrokePredictorError(f"{option} {path}: expected a JSON object with a 'postprocessing' block "
                                   f"({error}).") from None
