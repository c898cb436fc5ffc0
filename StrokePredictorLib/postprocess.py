"""Post-processing of the lesion probability: the bundle's threshold, flip averaging and the
removal of small components, chosen on validation data and stored in the bundle.

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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class PostProcessing:
    """How the probability becomes the lesion mask (see the module docstring).

    Attributes:
        threshold: probability threshold, strictly between 0 and 1.
        flip_tta: average with the prediction of the left-right mirrored input.
        min_component_ml: smallest lesion component kept, in mL (0 keeps all).
        selected_on: where the values were chosen (free text, for the model card).
    """

    threshold: float = 0.5
    flip_tta: bool = False
    min_component_ml: float = 0.0
    selected_on: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and 0.0 < float(self.threshold) < 1.0):
            raise ValueError(f"postprocessing.threshold must lie strictly between 0 and 1, got {self.threshold!r}")
        if not (isinstance(self.min_component_ml, (int, float)) and math.isfinite(self.min_component_ml)
                and self.min_component_ml >= 0):
            raise ValueError(f"postprocessing.min_component_ml must be a number >= 0 (mL), "
                             f"got {self.min_component_ml!r}")
        if not isinstance(self.flip_tta, bool):
            raise ValueError(f"postprocessing.flip_tta must be true or false, got {self.flip_tta!r}")

    def replace(self, **changes: object) -> PostProcessing:
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        values = asdict(self)
        values.update({key: value for key, value in changes.items() if value is not None})
        return PostProcessing(**values)

    def to_dict(self) -> dict:
        return asdict(self)

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
        return ", ".join(parts)


DEFAULT = PostProcessing()


def remove_small_components(mask: np.ndarray, min_ml: float, voxel_ml: float) -> np.ndarray:
    """``mask`` (bool or 0/1) without its 26-connected components smaller than ``min_ml`` mL.

    Returns a bool array of the same shape (the input itself, as bool, when ``min_ml`` is 0).
    """
    mask = np.asarray(mask, dtype=bool)
    if min_ml <= 0 or not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=CONNECTIVITY)
    sizes_ml = np.bincount(labels.ravel(), minlength=count + 1)[1:] * float(voxel_ml)
    keep = np.concatenate([[False], sizes_ml >= min_ml])
    return keep[labels]


def count_components(mask: np.ndarray) -> int:
    """Number of 26-connected components of ``mask``."""
    return int(ndimage.label(np.asarray(mask, dtype=bool), structure=CONNECTIVITY)[1])
