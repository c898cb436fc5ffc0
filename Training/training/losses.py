"""Segmentation losses that see every lesion, not only the volume.

A Dice loss over the whole image (or batch) is dominated by the largest lesion: a 0.05 mL
embolic focus next to a 60 mL territorial infarct moves it by less than 0.1%, so a network can
drop every small focus at almost no cost. Yet ISLES 2022 scores lesion-wise F1 too, and most of
its lesions are small. :class:`LesionWiseLoss` adds the "blob loss" term of Kofler et al. (2022,
*blob loss: instance imbalance aware loss functions for semantic segmentation*): one soft Dice
per ground-truth lesion, computed with every *other* lesion masked out (so that predicting the
neighbours is neither a reward nor a false positive for this one), averaged over the lesions of
each image and then over the images that hold a lesion.

Lesions are the target's 26-connected components, as in the lesion-wise metrics of
:mod:`Training.evaluation.metrics`. The sums per lesion are one ``index_add`` over the labelled
image, so the term costs one pass over the voxels whatever the number of lesions; the labelling
runs on the CPU with SciPy (about 15 ms for a 80x112x96 volume).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import ndimage

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def lesion_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Mean over lesions of ``1 - soft Dice``, each lesion scored with the other lesions masked out.

    Args:
        logits: ``(B, 1, K, J, I)`` logits (a sigmoid gives the probabilities).
        target: ``(B, 1, K, J, I)`` binary target (values above 0.5 are lesion).
        smooth: added to the numerator and denominator of each Dice.

    Returns:
        A scalar: per image the mean over its lesions of ``1 - Dice_l``, where ``Dice_l`` uses the
        lesion's voxels and the background (``p`` summed over lesion ``l`` and over voxels of no
        lesion), then the mean over the images that hold a lesion; 0 (with a gradient path) when
        no image does.
    """
    if logits.shape != target.shape or logits.ndim != 5 or logits.shape[1] != 1:
        raise ValueError(f"lesion_dice_loss expects logits and target of one shape (B, 1, K, J, I); "
                         f"got {tuple(logits.shape)} and {tuple(target.shape)}.")
    prob = torch.sigmoid(logits.float())
    masks = (target.detach() > 0.5).cpu().numpy()
    terms = []
    for b in range(prob.shape[0]):
        labels, count = ndimage.label(masks[b, 0], structure=_STRUCTURE)
        if count == 0:
            continue
        index = torch.from_numpy(labels.reshape(-1).astype(np.int64)).to(prob.device)
        p = prob[b, 0].reshape(-1)
        p_sum = torch.zeros(count + 1, dtype=p.dtype, device=p.device).index_add_(0, index, p)
        size = torch.bincount(index, minlength=count + 1).to(p.dtype)
        overlap = p_sum[1:]  # p summed over each lesion
        dice = (2 * overlap + smooth) / (p_sum[0] + overlap + size[1:] + smooth)
        terms.append(1 - dice.mean())
    if not terms:
        return prob.sum() * 0
    return torch.stack(terms).mean()


class LesionWiseLoss(torch.nn.Module):
    """``base(logits, target) + weight * lesion_dice_loss(logits, target)``.

    Kofler et al. weigh the global loss 2 and the per-lesion term 1, i.e. ``weight = 0.5`` here.
    With ``weight == 0`` it is exactly ``base``.
    """

    def __init__(self, base: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weight: float) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"The lesion-wise loss weight must be >= 0, not {weight}.")
        self.base, self.weight = base, float(weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.base(logits, target)
        if self.weight:
            loss = loss + self.weight * lesion_dice_loss(logits, target)
        return loss


def with_lesion_term(base: Any, weight: float) -> Any:
    """``base`` itself when ``weight`` is 0, else :class:`LesionWiseLoss` around it."""
    return LesionWiseLoss(base, weight) if weight else base
