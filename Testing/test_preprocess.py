"""StrokePredictorLib.preprocess: registration, ADC units, brain mask, the exact inverse mapping,
and refusal of bad inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import ADC_1E3, DWI_INTENSITY, FLAIR_INTENSITY, centered_geometry, rotation_direction, sample

from StrokePredictorLib.errors import InputImageError
from StrokePredictorLib.io import Geometry, Volume, discover_isles, read_volume
from StrokePredictorLib.preprocess import (
    GridMapping,
    ModelGrid,
    brain_mask,
    canonical_direction,
    detect_adc_unit,
    model_geometry,
    preprocess,
    register_rigid,
)

DWI_GEOMETRY = centered_geometry((80, 96, 36), (2.0, 2.0, 4.0), rotation_direction((6, -4, 3)))


def _dwi_adc(geometry: Geometry = DWI_GEOMETRY, scale: float = 1e-3, scalp: bool = False) -> tuple[Volume, Volume]:
    rng = np.random.default_rng(3)
    dwi = sample(geometry, DWI_INTENSITY, scalp=scalp, smooth_mm=1.5, rng=rng, noise=2.0)
    adc = sample(geometry, {k: v * 1e-3 / scale for k, v in ADC_1E3.items()}, scalp=scalp, smooth_mm=1.5)
    return Volume(np.clip(dwi, 0, None), geometry), Volume(adc, geometry)


# ---- registration ------------------------------------------------------------------------
def test_rigid_registration_recovers_8_degrees_and_6_mm() -> None:
    dwi, _ = _dwi_adc()
    truth = sitk.Euler3DTransform()
    truth.SetCenter((0.0, 0.0, 0.0))
    # 8 degrees about an oblique axis and a 6 mm shift: DWI point -> FLAIR point.
    axis = np.array([0.3, 0.5, 0.81])
    angle = math.radians(8.0)
    versor = sitk.VersorRigid3DTransform()
    versor.SetRotation(tuple(axis / np.linalg.norm(axis)), angle)
    truth.SetMatrix(versor.GetMatrix())
    truth.SetTranslation((4.0, -4.0, 2.0))  # |t| = 6.0 mm
    assert abs(np.linalg.norm(truth.GetTranslation()) - 6.0) < 0.05
    flair_geometry = centered_geometry((150, 170, 26), (1.0, 1.0, 5.0), rotation_direction((0, 0, 2)))
    flair = Volume(sample(flair_geometry, FLAIR_INTENSITY, transform=truth.GetInverse(), smooth_mm=1.0), flair_geometry)

    result = register_rigid(dwi, flair, fixed_mask=dwi.array > 20)

    points = np.array([[x, y, z] for x in (-50, 0, 50) for y in (-60, 0, 60) for z in (-40, 0, 40)], float)
    estimated = np.array([result.transform.TransformPoint(tuple(p)) for p in points])
    expected = np.array([truth.TransformPoint(tuple(p)) for p in points])
    error_mm = np.linalg.norm(estimated - expected, axis=1)
    assert error_mm.max() < 1.0, error_mm
    residual = np.asarray(result.transform.GetMatrix()).reshape(3, 3) @ np.asarray(truth.GetMatrix()).reshape(3, 3).T
    residual_deg = math.degrees(math.acos(np.clip((np.trace(residual) - 1) / 2, -1, 1)))
    assert residual_deg < 1.0
    assert abs(result.rotation_deg - 8.0) < 1.0


# ---- ADC units --------------------------------------------------------------------------------
@pytest.mark.parametrize(("scale", "unit"), [(1.0, "mm2/s"), (1e-3, "1e-3 mm2/s"), (1e-6, "1e-6 mm2/s")])
def test_adc_unit_detection_on_all_three_scales(scale: float, unit: str) -> None:
    _, adc = _dwi_adc(scale=scale)
    brain = sample(DWI_GEOMETRY, {1: 1, 2: 1, 3: 1, 4: 1}) > 0.5
    detected, factor = detect_adc_unit(adc.array, brain)
    assert detected == unit
    assert factor == pytest.approx(scale)
    assert 0.6e-3 < np.median(adc.array[brain] * factor) < 1.2e-3


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-6])
def test_preprocessed_adc_is_identical_whatever_the_unit(scale: float) -> None:
    dwi, adc = _dwi_adc(scale=scale)
    reference_dwi, reference_adc = _dwi_adc(scale=1e-3)
    case = preprocess(dwi, adc, grid=ModelGrid((48, 56, 40), (3.0, 3.0, 3.0)))
    reference = preprocess(reference_dwi, reference_adc, grid=ModelGrid((48, 56, 40), (3.0, 3.0, 3.0)))
    np.testing.assert_allclose(case.image[1], reference.image[1], atol=1e-4)
    wm = np.isclose(reference.image[1], 0.72, atol=0.02)
    assert wm.sum() > 100  # physical units: white matter ADC 0.72 x10^-3 mm^2/s stays 0.72


def test_adc_without_positive_voxels_is_refused() -> None:
    with pytest.raises(InputImageError, match="no positive voxel"):
        detect_adc_unit(np.zeros((4, 4, 4), np.float32))


# ---- brain mask -----------------------------------------------------------------------------
def test_brain_mask_on_skull_stripped_and_with_scalp() -> None:
    truth = sample(DWI_GEOMETRY, {0: 0, 1: 1, 2: 1, 3: 1, 4: 1, 5: 0}) > 0.5
    for scalp in (False, True):
        dwi, _ = _dwi_adc(scalp=scalp)
        mask = brain_mask(dwi.array, DWI_GEOMETRY.spacing)
        recall = (mask & truth).sum() / truth.sum()
        false_fraction = (mask & ~truth).sum() / mask.sum()
        assert recall > 0.95, (scalp, recall)
        assert false_fraction < 0.08, (scalp, false_fraction)
        if scalp:
            scalp_voxels = sample(DWI_GEOMETRY, {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1}, scalp=True) > 0.5
            assert scalp_voxels.sum() > 1000
            assert (mask & scalp_voxels).sum() / scalp_voxels.sum() < 0.05


def test_brain_mask_on_noisy_thick_slice_clinical_dwi() -> None:
    """Clinical DWI: 6 mm slices, skull and scalp, Rician noise at 60% of the brain signal. The
    bright part of such an image is too ragged to survive the scalp-cutting erosion unless the seed
    is smoothed (the mask used to keep a third of the brain here)."""
    geometry = centered_geometry((80, 80, 24), (3.0, 3.0, 6.0), rotation_direction((4, -3, 5)))
    truth = sample(geometry, {0: 0, 1: 1, 2: 1, 3: 1, 4: 1, 5: 0}) > 0.5
    clean = sample(geometry, DWI_INTENSITY, scalp=True, smooth_mm=1.5)
    rng = np.random.default_rng(7)
    sigma = 0.6 * float(np.median(clean[truth]))
    noisy = np.hypot(clean + rng.normal(0, sigma, clean.shape), rng.normal(0, sigma, clean.shape))
    mask = brain_mask(noisy.astype(np.float32), geometry.spacing)
    assert (mask & truth).sum() / truth.sum() > 0.95
    assert (mask & ~truth).sum() / mask.sum() < 0.08


# ---- the model grid and the inverse mapping -----------------------------------------------------
def test_canonical_direction_is_right_handed_and_close_to_lps() -> None:
    for direction in (rotation_direction((10, -5, 7), left_handed=True), np.diag([-1.0, -1, 1]),
                      np.array([[0, 0, 1.0], [1, 0, 0], [0, 1, 0]])):
        canonical = canonical_direction(direction)
        assert np.linalg.det(canonical) == pytest.approx(1.0)
        assert np.all(np.diag(canonical) > 0.9)


@pytest.mark.parametrize(
    "geometry",
    [
        centered_geometry((60, 64, 20), (1.8, 1.8, 4.8), rotation_direction((8, 5, -6), left_handed=True), (3, -2, 5)),
        centered_geometry((112, 112, 73), (2.0, 2.0, 2.0), np.diag([-1.0, -1.0, 1.0])),
        centered_geometry((100, 90, 30), (1.15, 1.15, 4.8), rotation_direction((-3, 12, 4))),
    ],
    ids=["left-handed-oblique-anisotropic", "RAS-isotropic", "oblique-thick-slices"],
)
def test_inverse_mapping_returns_marked_voxels_to_the_same_physical_point(geometry: Geometry) -> None:
    model = model_geometry(geometry, ModelGrid((48, 56, 40), (2.0, 2.0, 2.0)), np.zeros(3))
    mapping = GridMapping(geometry, model)
    rng = np.random.default_rng(0)
    for _ in range(5):
        # Model grid -> DWI grid: a marked 3x3x3 block (6 mm, so that thick DWI slices see it)
        # comes back centred on the same physical point, within half a DWI voxel.
        marked = np.zeros(model.shape, np.float32)
        k, j, i = (int(rng.integers(10, n - 10)) for n in model.shape)
        marked[k - 1 : k + 2, j - 1 : j + 2, i - 1 : i + 2] = 1.0
        back = mapping.to_source(marked, order=1)
        assert back.max() > 0.5
        weights = np.argwhere(back > 0)
        centroid_kji = (weights * back[back > 0][:, None]).sum(axis=0) / back[back > 0].sum()
        offset = geometry.lps_to_index(model.index_to_lps([i, j, k])) - centroid_kji[::-1]
        assert np.all(np.abs(offset) <= 0.5), offset
        # DWI voxel -> model grid -> DWI grid: back on the same voxel.
        dwi_marked = np.zeros(geometry.shape, np.float32)
        kk, jj, ii = (rng.integers(n // 3, 2 * n // 3) for n in geometry.shape)
        dwi_marked[kk, jj, ii] = 1.0
        there = mapping.to_model(dwi_marked, order=0)
        # (nearest neighbour: every model voxel that took the mark lies inside the DWI voxel)
        for location in np.argwhere(there):
            offset = geometry.lps_to_index(model.index_to_lps(location[::-1])) - np.array([ii, jj, kk])
            assert np.all(np.abs(offset) <= 0.5 + 1e-6), offset


def test_same_spacing_model_grid_round_trip_is_lossless() -> None:
    dwi, adc = _dwi_adc(centered_geometry((80, 96, 60), (2.0, 2.0, 2.0), np.diag([-1.0, -1.0, 1.0])))
    case = preprocess(dwi, adc, grid=ModelGrid((96, 112, 80), (2.0, 2.0, 2.0)))
    mask = (sample(dwi.geometry, {4: 1.0}) > 0.5).astype(np.float32)
    back = case.mapping.to_source(case.mapping.to_model(mask, order=1), order=1)
    np.testing.assert_array_equal(back > 0.5, mask > 0.5)


def test_preprocess_output_layout_and_normalisation() -> None:
    dwi, adc = _dwi_adc()
    grid = ModelGrid((64, 64, 48), (3.0, 3.0, 3.0))
    case = preprocess(dwi, adc, grid=grid)
    assert case.image.shape == (3, 48, 64, 64) and case.image.dtype == np.float32
    assert not case.flair_present and np.all(case.image[2] == 0)
    assert case.adc_unit == "1e-3 mm2/s"
    brain = case.brain
    assert np.median(case.image[0][brain]) == pytest.approx(1.0, abs=0.1)  # DWI / brain median
    assert np.all(case.image[:, ~brain] == 0)
    # The model grid is centred on the brain: the brain does not touch the grid border.
    assert not brain[0].any() and not brain[-1].any() and not brain[:, 0].any() and not brain[:, :, -1].any()


def test_flair_is_registered_and_resampled_into_channel_2() -> None:
    dwi, adc = _dwi_adc()
    truth = sitk.Euler3DTransform((0, 0, 0), 0.0, 0.05, 0.03, (2.0, -3.0, 1.0))
    flair_geometry = centered_geometry((150, 170, 26), (1.0, 1.0, 5.0))
    flair = Volume(sample(flair_geometry, FLAIR_INTENSITY, transform=truth.GetInverse(), smooth_mm=1.0), flair_geometry)
    case = preprocess(dwi, adc, flair, grid=ModelGrid((64, 64, 48), (3.0, 3.0, 3.0)))
    assert case.flair_present and case.registration is not None
    csf_adc = case.image[1] > 2.0
    inside = case.brain & (case.image[1] > 0.5) & (case.image[1] < 0.8)
    assert case.image[2][csf_adc].mean() < 0.5 * case.image[2][inside].mean()  # dark CSF in FLAIR


# ---- bad input -----------------------------------------------------------------------------------
def test_adc_on_another_overlapping_grid_is_resampled() -> None:
    dwi, _ = _dwi_adc()
    other = centered_geometry((70, 80, 30), (2.4, 2.4, 4.0), shift=(1.0, 2.0, 0.0))
    adc = Volume(sample(other, ADC_1E3, smooth_mm=1.0), other)
    case = preprocess(dwi, adc, grid=ModelGrid((64, 64, 48), (3.0, 3.0, 3.0)))
    assert case.adc_unit == "1e-3 mm2/s"
    assert np.median(case.image[1][case.brain]) == pytest.approx(0.8, abs=0.15)


def test_adc_that_does_not_overlap_is_refused() -> None:
    dwi, _ = _dwi_adc()
    far = centered_geometry((80, 96, 36), (2.0, 2.0, 4.0), shift=(400.0, 0.0, 0.0))
    adc = Volume(np.random.default_rng(0).random(far.shape, dtype=np.float32), far, Path("adc.nii.gz"))
    with pytest.raises(InputImageError, match=r"ADC adc.nii.gz is on another grid .* covers only 0%"):
        preprocess(dwi, adc)


def test_flair_without_physical_overlap_is_refused() -> None:
    dwi, adc = _dwi_adc()
    far = centered_geometry((64, 64, 20), (1.0, 1.0, 5.0), shift=(0.0, 0.0, 500.0))
    flair = Volume(np.random.default_rng(0).random(far.shape, dtype=np.float32), far, Path("flair.nii.gz"))
    with pytest.raises(InputImageError, match="FLAIR flair.nii.gz does not overlap the DWI"):
        preprocess(dwi, adc, flair)


def test_nan_dwi_and_constant_adc_are_refused() -> None:
    dwi, adc = _dwi_adc()
    dwi.array[3, 4, 5] = np.nan
    with pytest.raises(InputImageError, match="DWI .* NaN"):
        preprocess(dwi, adc)
    dwi, adc = _dwi_adc()
    with pytest.raises(InputImageError, match="ADC .* constant"):
        preprocess(dwi, Volume(np.zeros_like(adc.array), adc.geometry))


# ---- the real ISLES 2022 case -------------------------------------------------------------------
@pytest.mark.slow
def test_real_isles_case(isles_case_dir: Path) -> None:
    (record,) = discover_isles(isles_case_dir)
    dwi, adc, flair = (read_volume(p) for p in (record.dwi, record.adc, record.flair))
    case = preprocess(dwi, adc, flair, grid=ModelGrid((96, 112, 80), (2.0, 2.0, 2.0)))
    assert case.adc_unit == "1e-3 mm2/s"
    assert case.registration is not None and case.registration.rotation_deg < 5.0
    mask = read_volume(record.mask).array
    # The DWI is at 2 mm and so is the model grid: the lesion survives the round trip exactly.
    back = case.mapping.to_source(case.mapping.to_model(mask, order=1), order=1) > 0.5
    assert int(back.sum()) == int(mask.sum()) == 523
    assert np.array_equal(back, mask > 0.5)


def test_unregistrable_flair_is_left_out_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import StrokePredictorLib.preprocess as module

    def fail(*args: object, **kwargs: object) -> None:
        raise InputImageError("FLAIR flair.nii.gz could not be registered to the DWI: too few voxels.")

    monkeypatch.setattr(module, "register_rigid", fail)
    dwi, adc = _dwi_adc()
    flair_geometry = centered_geometry((150, 170, 26), (1.0, 1.0, 5.0))
    flair = Volume(sample(flair_geometry, FLAIR_INTENSITY, smooth_mm=1.0), flair_geometry, Path("flair.nii.gz"))
    case = preprocess(dwi, adc, flair, grid=ModelGrid((64, 64, 48), (3.0, 3.0, 3.0)))
    assert not case.flair_present and np.all(case.image[2] == 0)
    assert case.warnings == ["FLAIR flair.nii.gz could not be registered to the DWI: too few voxels. "
                             "The prediction was made without FLAIR."]


# ---- plausibility of the inputs -------------------------------------------------------------
def _plausibility(dwi: Volume, adc: Volume):  # noqa: ANN202
    from StrokePredictorLib.preprocess import brain_mask, detect_adc_unit, input_statistics

    brain = brain_mask(np.clip(dwi.array, 0, None), dwi.geometry.spacing)
    unit, factor = detect_adc_unit(np.clip(adc.array, 0, None), brain)
    return input_statistics(dwi.array, adc.array, factor, brain), unit


def test_sample_case_is_plausible_and_its_figures_are_physiological(repo_root: Path) -> None:
    from StrokePredictorLib.preprocess import check_inputs

    folder = repo_root / "StrokePredictor" / "Resources" / "SampleData"
    dwi = read_volume(folder / "StrokePredictorSample_dwi.nii.gz")
    adc = read_volume(folder / "StrokePredictorSample_adc.nii.gz")
    stats, unit = _plausibility(dwi, adc)
    assert check_inputs(stats, unit) == []
    # measured: median 0.98, 7.9% CSF-like voxels, rho -0.74, CSF 0.60 of tissue on the DWI
    assert 0.9 < stats.adc_median < 1.05 and 0.05 < stats.csf_fraction < 0.12
    assert stats.rho < -0.5 and 0.45 < stats.dwi_csf_over_tissue < 0.7


def test_real_case_is_plausible(isles_case_dir: Path) -> None:
    from StrokePredictorLib.preprocess import check_inputs

    record = discover_isles(isles_case_dir)[0]
    stats, unit = _plausibility(read_volume(record.dwi), read_volume(record.adc))
    assert check_inputs(stats, unit) == []
    # measured: median 0.896 x10^-3 mm^2/s, 14.7% CSF-like, rho -0.46, CSF 0.59 of tissue on the b=800 DWI
    assert 0.85 < stats.adc_median < 0.95 and stats.rho < -0.3 and 0.5 < stats.dwi_csf_over_tissue < 0.7
    swapped, unit = _plausibility(read_volume(record.adc), read_volume(record.dwi))
    with pytest.raises(InputImageError, match="look swapped"):
        check_inputs(swapped, unit)


def test_test_phantoms_are_plausible() -> None:
    from StrokePredictorLib.preprocess import check_inputs

    for scalp in (False, True):
        dwi, adc = _dwi_adc(scalp=scalp)
        stats, unit = _plausibility(dwi, adc)
        assert check_inputs(stats, unit) == [], scalp
        assert stats.rho > 0.5  # the noise-free phantom is positively correlated at the mask border...
        assert stats.dwi_csf_over_tissue < 0.6  # ...but its CSF is dark on DWI, as it must be


# The phantom's brain median is 0.72 x10^-3 mm^2/s (white matter): x4 gives 2.88 and x0.48 gives 0.35
# (impossible), x0.8 gives 0.58 and x1.9 gives 1.37 (unusual).
@pytest.mark.parametrize(("scale", "outcome"), [
    (1e4, "physically possible"), (1e-2, "physically possible"), (4.0, "physically possible"),
    (0.48, "physically possible"), (0.8, "outside the usual"), (1.9, "outside the usual"), (1.0, None),
])
def test_adc_scale_errors_are_caught(scale: float, outcome: str | None) -> None:
    from StrokePredictorLib.preprocess import check_inputs

    dwi, adc = _dwi_adc()
    stats, unit = _plausibility(dwi, Volume(adc.array * np.float32(scale), adc.geometry))
    if outcome == "physically possible":
        with pytest.raises(InputImageError, match=outcome):
            check_inputs(stats, unit)
    else:
        warnings = check_inputs(stats, unit)
        assert (warnings == []) if outcome is None else any(outcome in w for w in warnings)


def test_preprocess_refuses_the_dwi_as_adc_and_passes_reader_warnings_on() -> None:
    dwi, adc = _dwi_adc()
    with pytest.raises(InputImageError, match="are the same image"):
        preprocess(dwi, Volume(dwi.array * np.float32(0.004), dwi.geometry), grid=ModelGrid((64, 64, 48), (3.0,) * 3))
    flagged = Volume(dwi.array, dwi.geometry, None, ["DWI file x.nii has neither a qform nor an sform code set."])
    case = preprocess(flagged, adc, grid=ModelGrid((64, 64, 48), (3.0,) * 3))
    assert case.warnings == flagged.warnings
    assert case.statistics is not None and case.brain_volume_ml > 100
    unchecked = preprocess(dwi, Volume(dwi.array * np.float32(0.004), dwi.geometry),
                           grid=ModelGrid((64, 64, 48), (3.0,) * 3), check_plausibility=False)
    assert unchecked.warnings == []
