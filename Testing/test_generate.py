"""Tests of the physical-mode generator and the ISLES-layout writer (Training.synthesis.generate)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from StrokePredictorLib import clinical
from StrokePredictorLib.errors import OutputExistsError
from StrokePredictorLib.io import Volume, discover_isles, read_volume
from StrokePredictorLib.preprocess import detect_adc_unit, register_rigid
from Training.synthesis.anatomy import load_template
from Training.synthesis.case import ADC_SCALES, SynthesisParams, synthesize_case
from Training.synthesis.generate import main, write_case, write_tiny_dataset
from Training.synthesis.lesions import procedural_lesion, smooth_noise
from Training.synthesis.outcome import outcome_fraction

TINY = SynthesisParams(tiny=True, lesion_kind="territorial", empty_fraction=0.0)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("a") / "tiny", n_cases=3, seed=0)


def _world_centroid(path: Path, where: np.ndarray | None = None) -> np.ndarray:
    image = nib.load(str(path))
    data = np.asarray(image.dataobj) > 0.5 if where is None else where
    ijk = np.argwhere(data).mean(axis=0)  # nibabel order (i, j, k)
    return image.affine[:3, :3] @ ijk + image.affine[:3, 3]


def test_tiny_dataset_layout_and_readers(tiny_dataset: Path) -> None:
    records = discover_isles(tiny_dataset)
    assert [r.case_id for r in records] == [f"sub-strokecase000{i}" for i in (1, 2, 3)]
    for record in records:
        assert record.flair is not None and record.flair.name.endswith("_FLAIR.nii.gz")
        assert record.mask is not None and record.mask.parent.parts[-3] == "derivatives"
        assert record.mask.with_name(record.mask.name.replace("_msk", "_outcome")).is_file()
        assert record.age is not None and record.sex in ("F", "M")
        sidecar = json.loads(record.dwi.with_name(record.dwi.name.replace(".nii.gz", ".json")).read_text())
        assert len(sidecar["PatientAge"]) == 4 and sidecar["PatientAge"].endswith("Y")
        dwi_nib = nib.load(str(record.dwi))
        assert dwi_nib.get_data_dtype() == np.float64
        dwi_sitk = sitk.ReadImage(str(record.dwi))
        mask = read_volume(record.mask)
        dwi = read_volume(record.dwi)
        assert dwi.geometry.same_grid(mask.geometry)
        assert np.allclose(dwi_nib.affine, dwi.geometry.ijk_to_ras, atol=1e-4)
        assert np.allclose(sitk.GetArrayFromImage(dwi_sitk), dwi.array, atol=1e-4)
        assert not read_volume(record.flair).geometry.same_grid(dwi.geometry)
        assert 0 < int((dwi.array < 0).sum()) < 200  # a few slightly negative voxels, as in ISLES
        assert mask.array.sum() > 0
    rows = clinical.read_csv(tiny_dataset / "clinical.csv")
    assert sorted(rows) == [r.case_id for r in records]
    assert rows["sub-strokecase0001"]["age"] == records[0].age
    description = json.loads((tiny_dataset / "dataset.json").read_text())
    assert description["seed"] == 0 and description["config"]["cases"] == 3
    assert {"numpy", "SimpleITK", "nilearn"} <= set(description["versions"])
    assert len(description["cases"]) == 3 and "flair_transform" in description["cases"][0]


def test_same_seed_identical_bytes_and_different_seed_differs(tmp_path: Path, tiny_dataset: Path) -> None:
    again = write_tiny_dataset(tmp_path / "tiny", n_cases=3, seed=0)
    files = sorted(p.relative_to(tiny_dataset) for p in tiny_dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny_dataset / rel).read_bytes() == (again / rel).read_bytes(), rel
    dwi = next(tiny_dataset.rglob("*_dwi.nii.gz")).read_bytes()
    assert dwi[4:8] == b"\0\0\0\0"  # gzip MTIME unset
    assert gzip.decompress(dwi)[:4]  # valid gzip
    other = write_tiny_dataset(tmp_path / "other", n_cases=1, seed=1)
    first = "sub-strokecase0001/ses-0001/dwi/sub-strokecase0001_ses-0001_dwi.nii.gz"
    assert (other / first).read_bytes() != (tiny_dataset / first).read_bytes()


@pytest.fixture(scope="module")
def clean_case_files(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A noise-free 2 mm case without mimics, written in the ISLES layout."""
    params = SynthesisParams(dwi_grid="2mm-iso", flair_grid="tiny", lesion_kind="territorial", empty_fraction=0.0,
                             noise=False, mimic_rate=0.0)
    case = synthesize_case(1, 0, params)
    root = tmp_path_factory.mktemp("clean")
    return case, write_case(case, root)


def test_lesion_in_dwi_and_adc_lies_where_the_mask_says(clean_case_files: tuple) -> None:
    case, paths = clean_case_files
    dwi_img, adc_img, mask_img = (nib.load(str(paths[k])) for k in ("dwi", "adc", "mask"))
    dwi = np.asarray(dwi_img.dataobj)
    adc = np.asarray(adc_img.dataobj) / ADC_SCALES[case.adc_unit]
    mask = np.asarray(mask_img.dataobj) > 0
    brain = dwi > 0
    found = (adc < 0.62e-3) & (adc > 0) & (dwi > 1.15 * np.median(dwi[brain]))
    assert found.sum() > 0.15 * mask.sum()
    assert (found & mask).sum() > 0.9 * found.sum()
    # in world coordinates, each file through its own affine
    centre_found = _world_centroid(paths["dwi"], found)
    centre_mask = _world_centroid(paths["mask"])
    assert np.linalg.norm(centre_found - centre_mask) < 6.0
    assert np.allclose(dwi_img.affine, mask_img.affine) and np.allclose(adc_img.affine, mask_img.affine)


def test_lesion_adc_reduced_by_the_configured_fraction(clean_case_files: tuple) -> None:
    case, _ = clean_case_files
    mask = case.mask > 0
    adc = case.adc_mm2s
    depth = ndimage.distance_transform_edt(mask, sampling=case.dwi.geometry.spacing[::-1])
    core = depth >= 0.6 * depth.max()
    assert core.sum() > 10
    ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask) & (adc > 0) & (adc < 1.4e-3)
    reduction = case.metadata["signal"]["lesion_adc_reduction"]
    assert 0.28 <= reduction <= 0.5
    assert abs((1 - np.median(adc[core]) / np.median(adc[ring])) - reduction) < 0.1


def test_flair_is_offset_by_the_recorded_rigid_transform(tiny_dataset: Path) -> None:
    description = json.loads((tiny_dataset / "dataset.json").read_text())
    for record, meta in zip(discover_isles(tiny_dataset), description["cases"], strict=True):
        transform = np.asarray(meta["flair_transform"]["matrix"])
        dwi, flair = read_volume(record.dwi), read_volume(record.flair)
        # brain centroids in world (LPS): FLAIR's equals the DWI's moved by the recorded transform
        c_dwi = dwi.geometry.index_to_lps(np.argwhere(dwi.array > 0).mean(axis=0)[::-1])
        c_flair = flair.geometry.index_to_lps(np.argwhere(flair.array > 0).mean(axis=0)[::-1])
        predicted = transform[:3, :3] @ c_dwi + transform[:3, 3]
        assert np.linalg.norm(predicted - c_flair) < 4.0
        assert np.linalg.norm(c_dwi - c_flair) > 0.5  # there really is an offset


@pytest.mark.slow
def test_register_rigid_recovers_8_degrees_and_6_mm() -> None:
    params = SynthesisParams(dwi_grid="2mm-iso", flair_grid="2D-0.9x0.9x5", flair_rotation_deg=(8.0, 8.0),
                             flair_translation_mm=(6.0, 6.0), lesion_kind="territorial", empty_fraction=0.0)
    case = synthesize_case(1, 5, params)
    result = register_rigid(case.dwi, case.flair, fixed_mask=case.dwi.array > 0)
    estimated = np.eye(4)
    estimated[:3, :3] = np.asarray(result.transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(result.transform.GetCenter())
    estimated[:3, 3] = centre - estimated[:3, :3] @ centre + np.asarray(result.transform.GetTranslation())
    truth = case.flair_transform
    residual = np.linalg.inv(truth) @ estimated
    angle = np.degrees(np.arccos(np.clip((np.trace(residual[:3, :3]) - 1) / 2, -1, 1)))
    points = case.dwi.geometry.index_to_lps(np.argwhere(case.dwi.array > 0)[::500, ::-1].astype(float))
    moved = points @ residual[:3, :3].T + residual[:3, 3]
    assert angle < 1.0
    assert np.abs(moved - points).max() < 1.5 and np.linalg.norm(moved - points, axis=1).mean() < 1.0


def test_outcome_contains_core_and_grows_with_time_and_without_treatment(tiny_dataset: Path) -> None:
    for record in discover_isles(tiny_dataset):
        acute = read_volume(record.mask).array > 0
        outcome = read_volume(record.mask.with_name(record.mask.name.replace("_msk", "_outcome"))).array > 0
        assert (outcome | acute).sum() == outcome.sum() and outcome.sum() >= acute.sum()
    template = load_template(4)
    rng = np.random.default_rng(4)
    lesion = procedural_lesion(template, rng, kind="territorial")
    noise = smooth_noise(rng, template.shape, 1.5)

    def volume(onset: float, treatment: str) -> float:
        _, info = outcome_fraction(template, lesion.fraction, nihss=14, onset_h=onset, treatment=treatment,
                                   collateral=0.5, glucose=6.0, noise=noise)
        return info.outcome_ml

    treated = [volume(t, "thrombectomy") for t in (1.0, 4.0, 12.0)]
    assert treated[0] < treated[1] < treated[2]
    assert volume(2.0, "none") > volume(2.0, "thrombolysis") > volume(2.0, "both")
    assert volume(2.0, "both") > lesion.volume_ml(template.spacing_mm ** 3 / 1000) * 0.99


def test_adc_unit_scales_are_detectable() -> None:
    for unit, scale in ADC_SCALES.items():
        case = synthesize_case(1, 0, SynthesisParams(**{**TINY.__dict__, "adc_unit": unit}))
        assert case.adc_unit == unit
        detected, factor = detect_adc_unit(case.adc.array, case.dwi.array > 0)
        assert detected == unit and factor == pytest.approx(1 / scale)
        assert 0.6e-3 < np.median(case.adc_mm2s[case.dwi.array > 0]) < 1.3e-3


def test_soop_lesion_brings_its_participants_values(soop_dir: Path) -> None:
    params = SynthesisParams(tiny=True, lesions=str(soop_dir), empty_fraction=0.0)
    rows = {}
    for line in (soop_dir / "participants.tsv").read_text().splitlines()[1:]:
        fields = line.split("\t")
        rows[fields[0]] = fields
    checked = 0
    for index in range(1, 5):
        case = synthesize_case(index, 0, params)
        participant = case.metadata["lesion"]["source"]
        assert participant.startswith("sub-")
        if participant in rows and rows[participant][2] != "n/a" and case.clinical["age"] is not None:
            assert case.clinical["age"] == pytest.approx(float(rows[participant][2]))
            assert case.clinical["sex"] in (None, rows[participant][1])
            checked += 1
    assert checked >= 1
    assert isinstance(case.dwi, Volume) and case.mask.shape == case.dwi.array.shape


def test_cli_writes_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--cases", "1", "--seed", "3", "--tiny", "--lesion-kind", "territorial"]) == 0
    assert len(discover_isles(out)) == 1
    before = (out / "clinical.csv").read_bytes()
    with pytest.raises(OutputExistsError):
        main(["--out", str(out), "--cases", "1", "--seed", "4", "--tiny"])
    assert (out / "clinical.csv").read_bytes() == before
    assert main(["--out", str(out), "--cases", "2", "--seed", "4", "--tiny", "--overwrite",
                 "--montage", str(tmp_path / "m.png")]) == 0
    assert len(discover_isles(out)) == 2
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".cli.*"))  # no staging folder left behind
