"""The per-lesion Dice term: every lesion counts, whatever its size, and the others are masked out."""

from __future__ import annotations

import pytest
import torch

from Training.training.losses import LesionWiseLoss, lesion_dice_loss, with_lesion_term

BIG = 30.0  # logits: sigmoid(30) = 1 - 1e-13


def _volume(shape: tuple[int, int, int] = (24, 24, 24)) -> torch.Tensor:
    return torch.zeros((1, 1, *shape))


def _two_lesions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 10^3 lesion and a 2^3 lesion far from it (1,000 and 8 voxels)."""
    target = _volume()
    large, small = torch.zeros_like(target, dtype=torch.bool), torch.zeros_like(target, dtype=torch.bool)
    large[..., 2:12, 2:12, 2:12] = True
    small[..., 18:20, 18:20, 18:20] = True
    target[large | small] = 1.0
    return target, large, small


def test_a_missed_small_lesion_costs_half_the_term_while_the_global_dice_barely_moves() -> None:
    target, large, small = _two_lesions()
    logits = torch.full_like(target, -BIG)
    logits[large] = BIG  # the large lesion found, the small one missed
    assert float(lesion_dice_loss(logits, target)) == pytest.approx(0.5, abs=1e-6)
    global_dice = 2 * 1000 / (1000 + 1008)
    assert 1 - global_dice < 0.005
    logits[small] = BIG
    assert float(lesion_dice_loss(logits, target)) == pytest.approx(0.0, abs=1e-6)


def test_each_lesion_is_scored_with_the_other_lesions_masked_out() -> None:
    target, large, small = _two_lesions()
    perfect = torch.where(target > 0.5, BIG, -BIG)
    # a false positive in the background counts against every lesion's Dice ...
    with_fp = perfect.clone()
    with_fp[..., 20:22, 2:4, 2:4] = BIG  # 8 voxels
    expected = 1 - (2 * 1000 / (8 + 1000 + 1000) + 2 * 8 / (8 + 8 + 8)) / 2
    assert float(lesion_dice_loss(with_fp, target)) == pytest.approx(expected, abs=1e-5)
    # ... but predicting the other lesion does not: the same value as the perfect prediction
    assert float(lesion_dice_loss(perfect, target)) == pytest.approx(0.0, abs=1e-6)


def test_images_are_averaged_over_those_with_a_lesion_and_gradients_reach_the_small_one() -> None:
    target, large, small = _two_lesions()
    empty = _volume()
    logits = torch.full((2, 1, 24, 24, 24), -BIG)
    logits[0][large[0]] = BIG
    logits = logits.clone().requires_grad_(True)
    loss = lesion_dice_loss(logits, torch.cat([target, empty]))
    assert float(loss.detach()) == pytest.approx(0.5, abs=1e-6)  # the empty image does not dilute the mean
    # both lesions half-predicted (p = 0.5), no background: each lesion's Dice is 2/3 and its per-voxel
    # gradient is about 0.89 / its size, so a voxel of the 8-voxel lesion pulls 125 times harder
    mild = torch.where(target > 0.5, 0.0, -BIG).requires_grad_(True)
    lesion_dice_loss(mild, target).backward()
    pull_small, pull_large = float(mild.grad[small].mean()), float(mild.grad[large].mean())
    assert pull_small < 0 and pull_large < 0
    assert pull_small / pull_large == pytest.approx(125, rel=0.02)
    none = torch.zeros((1, 1, 8, 8, 8), requires_grad=True)
    value = lesion_dice_loss(none, torch.zeros((1, 1, 8, 8, 8)))
    value.backward()
    assert float(value.detach()) == 0.0 and none.grad is not None


def test_diagonal_neighbours_are_one_lesion_26_connected() -> None:
    target = _volume((8, 8, 8))
    target[0, 0, 2, 2, 2] = target[0, 0, 3, 3, 3] = 1.0  # corner contact only
    logits = torch.full_like(target, -BIG)
    logits[0, 0, 2, 2, 2] = BIG
    assert float(lesion_dice_loss(logits, target)) == pytest.approx(1 - 2 / 3, abs=1e-5)  # one lesion, half found


def test_the_wrapper_adds_the_weighted_term_and_refuses_bad_input() -> None:
    target, large, _ = _two_lesions()
    logits = torch.full_like(target, -BIG)
    logits[large] = BIG

    def base(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tensor(0.25)
    assert float(LesionWiseLoss(base, 0.5)(logits, target)) == pytest.approx(0.25 + 0.5 * 0.5, abs=1e-6)
    assert with_lesion_term(base, 0.0) is base
    with pytest.raises(ValueError, match=">= 0"):
        LesionWiseLoss(base, -1.0)
    with pytest.raises(ValueError, match="one shape"):
        lesion_dice_loss(logits, target[..., :-1])
