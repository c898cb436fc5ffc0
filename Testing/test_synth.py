"""Tests of the domain-randomised and out-of-distribution synthesis modes (Training.synthesis)."""

from __future__ import annotations

import numpy as np
import pytest

from Training.synthesis import acquisition
from Training.synthesis.case import SynthesisParams, synthesize_case

RANDOM = SynthesisParams(mode="randomized", tiny=True, lesion_kind="territorial", empty_fraction=0.0)


def test_same_seed_same_image() -> None:
    a = synthesize_case(1, 7, RANDOM)
    b = synthesize_case(1, 7, RANDOM)
    assert np.array_equal(a.dwi.array, b.dwi.array)
    assert np.array_equal(a.adc.array, b.adc.array)
    assert np.array_equal(a.flair.array, b.flair.array)
    assert np.array_equal(a.mask, b.mask)


def test_different_seeds_give_different_contrasts() -> None:
    ratios = []
    for seed in range(4):
        case = synthesize_case(1, seed, RANDOM)
        means = case.metadata["signal"]["dwi_class_means"]
        ratios.append((means["gm"], means["csf"]))
    assert len({round(g, 3) for g, _ in ratios}) == 4
    assert max(c for _, c in ratios) - min(c for _, c in ratios) > 0.1


def test_adc_stays_in_physical_ranges() -> None:
    for seed in range(3):
        case = synthesize_case(1, seed, RANDOM)
        adc = case.adc_mm2s
        brain = case.dwi.array > 0
        assert adc.min() > -1e-4 and adc.max() <= 5e-3 + 1e-9
        assert 0.55e-3 < np.median(adc[brain]) < 1.4e-3
        factor = case.metadata["signal"]["scanner_adc_factor"]
        assert 0.85 <= factor <= 1.15
        mask = case.mask > 0
        if mask.sum() > 5:
            assert np.median(adc[mask]) < np.median(adc[brain])


def test_lesion_masks_unchanged_by_intensity_randomisation() -> None:
    base = synthesize_case(2, 0, RANDOM)
    other = synthesize_case(2, 0, SynthesisParams(**{**RANDOM.__dict__, "intensity_seed": 99}))
    assert np.array_equal(base.mask, other.mask) and np.array_equal(base.outcome, other.outcome)
    assert base.dwi.geometry == other.dwi.geometry and base.mask.sum() > 0
    assert not np.allclose(base.dwi.array, other.dwi.array)
    assert base.metadata["signal"]["dwi_class_means"] != other.metadata["signal"]["dwi_class_means"]


def test_ood_set_uses_unseen_grids_and_is_not_skull_stripped() -> None:
    params = SynthesisParams(ood=True, lesion_kind="small", dwi_grid="3x3x6", flair_grid="2D-1.2x1.2x7")
    case = synthesize_case(1, 0, params)
    assert case.metadata["acquisition"]["dwi_grid"] in {g.name for g in acquisition.OOD_DWI_GRIDS}
    assert case.b_value in (500.0, 1500.0, 2000.0)
    assert not case.metadata["skull_stripped"]
    # signal outside the brain (skull, scalp): more non-zero voxels than the brain alone
    assert (case.dwi.array != 0).mean() > 0.3


@pytest.mark.parametrize("mode", ["physical", "randomized"])
def test_in_memory_case_has_consistent_shapes(mode: str) -> None:
    case = synthesize_case(3, 1, SynthesisParams(**{**RANDOM.__dict__, "mode": mode}))
    shape = case.dwi.geometry.shape
    assert case.adc.array.shape == shape and case.mask.shape == shape and case.outcome.shape == shape
    assert case.mask.dtype == np.uint8 and set(np.unique(case.mask)) <= {0, 1}
    assert np.all(case.outcome >= case.mask)


def test_regional_mimics_brighten_dwi_without_changing_adc_or_labels() -> None:
    plain = SynthesisParams(tiny=True, lesion_kind="territorial", empty_fraction=0.0)
    with_regional = SynthesisParams(**{**plain.__dict__, "regional_mimics": 1.0})
    a, b = synthesize_case(3, 5, plain), synthesize_case(3, 5, with_regional)
    info = b.metadata["mimics"]["regional_dwi_hyperintensity"]
    assert "regional_dwi_hyperintensity" not in a.metadata["mimics"] and info["regional_ml"] > 0
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.outcome, b.outcome)  # labels untouched
    brain = a.dwi.array > 0
    ratio = b.dwi.array[brain].astype(np.float64) / np.maximum(a.dwi.array[brain], 1e-6)
    assert np.percentile(ratio, 99) > 1.1 and np.percentile(ratio, 1) > 0.97  # brighter, never darker
    assert np.median(b.adc_mm2s[brain]) == pytest.approx(np.median(a.adc_mm2s[brain]), rel=0.02)
    again = synthesize_case(3, 5, with_regional)
    assert np.array_equal(again.dwi.array, b.dwi.array)  # same seed, same image


@pytest.mark.parametrize("mode", ["physical", "randomized"])
def test_cerebellar_cortex_adc_lowers_only_posterior_fossa_adc(mode: str) -> None:
    plain = SynthesisParams(tiny=True, lesion_kind="territorial", empty_fraction=0.0, mode=mode)
    with_cerebellum = SynthesisParams(**{**plain.__dict__, "cerebellar_adc": 1.0})
    a, b = synthesize_case(3, 5, plain), synthesize_case(3, 5, with_cerebellum)
    info = b.metadata["mimics"]["cerebellar_cortex"]
    assert "cerebellar_cortex" not in a.metadata["mimics"] and 0.6e-3 <= info["gm_adc_mm2s"] <= 0.85e-3
    assert info["fossa_ml"] > 50  # the cerebellum and brainstem of the template
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.outcome, b.outcome)  # labels untouched
    brain = a.dwi.array > 0
    changed = brain & (np.abs(b.adc_mm2s - a.adc_mm2s) > 0.02e-3)
    assert 0.01 < changed.sum() / brain.sum() < 0.3  # the posterior fossa only
    assert np.median((b.adc_mm2s - a.adc_mm2s)[changed]) < 0  # lower ADC there
    if mode == "physical":  # lower ADC, same S0: brighter on DWI
        assert np.median((b.dwi.array.astype(np.float64) - a.dwi.array)[changed]) > 0
    again = synthesize_case(3, 5, with_cerebellum)
    assert np.array_equal(again.adc_mm2s, b.adc_mm2s)  # same seed, same image
