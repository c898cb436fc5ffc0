"""StrokePredictorLib.io: geometry round trips in world coordinates, NIfTI quirks, bad files,
ISLES 2022 discovery."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import rotation_direction

from StrokePredictorLib.errors import InputImageError, OutputExistsError
from StrokePredictorLib.io import (
    Geometry,
    Volume,
    check_volume,
    discover_isles,
    find_case_files,
    read_volume,
    write_volume,
)

GEOMETRIES = {
    "axis-aligned LPS": Geometry((12, 10, 8), (1.0, 1.0, 1.0), (5.0, -3.0, 2.0)),
    "oblique": Geometry(
        (12, 10, 8), (2.0, 2.0, 2.0), (10.0, 20.0, -30.0), tuple(rotation_direction((12, -7, 20)).ravel())
    ),
    "anisotropic": Geometry((14, 12, 6), (0.45, 0.45, 5.0), (-50.0, 40.0, 12.0)),
    "left-handed oblique anisotropic": Geometry(
        (12, 10, 7), (1.8, 1.8, 4.8), (3.0, -7.0, 11.0), tuple(rotation_direction((5, 9, -4), left_handed=True).ravel())
    ),
    "RAS storage": Geometry((12, 10, 8), (1.0, 1.5, 2.0), (0.0, 0.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
}


def _array(geometry: Geometry) -> np.ndarray:
    return np.random.default_rng(0).normal(size=geometry.shape).astype(np.float32)


@pytest.mark.parametrize("name", GEOMETRIES)
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_write_read_round_trip_in_world_coordinates(tmp_path: Path, name: str, suffix: str) -> None:
    geometry = GEOMETRIES[name]
    array = _array(geometry)
    path = write_volume(array, geometry, tmp_path / f"image{suffix}")
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, array)
    # Same voxel centres in world space (the stored axes may differ, e.g. a flipped k).
    np.testing.assert_allclose(volume.geometry.corners_lps(), geometry.corners_lps(), atol=1e-3)
    probe = np.array([[1.5, 2.25, 3.0], [0, 0, 0], [11, 9, 5]])
    np.testing.assert_allclose(volume.geometry.index_to_lps(probe), geometry.index_to_lps(probe), atol=1e-3)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_ijk_to_ras_matches_nibabel_and_round_trips(tmp_path: Path, name: str) -> None:
    geometry = GEOMETRIES[name]
    path = write_volume(_array(geometry), geometry, tmp_path / "image.nii.gz")
    np.testing.assert_allclose(nib.load(str(path)).affine, geometry.ijk_to_ras, atol=1e-4)
    again = Geometry.from_ijk_to_ras(geometry.ijk_to_ras, geometry.size)
    np.testing.assert_allclose(again.ijk_to_lps, geometry.ijk_to_lps, atol=1e-9)
    # RAS is LPS with x and y negated.
    point = geometry.index_to_lps(np.array([2.0, 3.0, 4.0]))
    ras = geometry.ijk_to_ras @ np.array([2.0, 3.0, 4.0, 1.0])
    np.testing.assert_allclose(ras[:3], point * np.array([-1, -1, 1]), atol=1e-9)


def test_left_handed_geometry_is_kept_physically(tmp_path: Path) -> None:
    geometry = GEOMETRIES["left-handed oblique anisotropic"]
    assert np.linalg.det(geometry.direction_matrix) < 0
    array = np.zeros(geometry.shape, dtype=np.float32)
    array[5, 4, 3] = 1.0  # [k, j, i]
    volume = read_volume(write_volume(array, geometry, tmp_path / "lh.nii.gz"))
    k, j, i = np.argwhere(volume.array == 1.0)[0]
    np.testing.assert_allclose(volume.geometry.index_to_lps([i, j, k]), geometry.index_to_lps([3, 4, 5]), atol=1e-3)


def test_float64_input_is_read_as_float32(tmp_path: Path) -> None:
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    data = np.random.default_rng(1).normal(size=(6, 5, 4))  # float64, nibabel order (i, j, k)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "f64.nii.gz"))
    volume = read_volume(tmp_path / "f64.nii.gz")
    assert volume.array.dtype == np.float32
    assert volume.array.shape == (4, 5, 6)
    np.testing.assert_allclose(volume.array, data.transpose(2, 1, 0), rtol=1e-6)
    np.testing.assert_allclose(volume.geometry.ijk_to_ras, affine, atol=1e-6)


def test_qform_is_used_when_qform_and_sform_differ(tmp_path: Path) -> None:
    qform = np.diag([-1.0, -1.0, 1.0, 1.0])
    qform[:3, 3] = (10.0, 20.0, 30.0)
    sform = np.diag([-1.0, -1.0, 1.0, 1.0])
    sform[:3, 3] = (0.0, 0.0, 0.0)
    image = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.float32), None)
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    nib.save(image, str(tmp_path / "both.nii.gz"))
    volume = read_volume(tmp_path / "both.nii.gz")
    np.testing.assert_allclose(volume.geometry.ijk_to_ras, qform, atol=1e-5)


def test_float32_quaternion_rounding_is_no_disagreement(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A generated case's header (SimpleITK): qform and sform of one flipped, slightly rotated grid differ
    by 1.6e-3 in the matrix, about 0.1 voxel at the corners: no message. 1 mm apart is one."""
    sform = np.array([[-1.99998, -0.0089, 0.00156, 110.347], [-0.0089, 1.99998, 0.00393, -140.338],
                      [0.00158, -0.00392, 2.0, -59.929], [0, 0, 0, 1]])
    qform = sform.copy()
    qform[0, 2], qform[2, 0] = -1e-5, 1e-5
    moved = qform.copy()
    moved[:3, 3] += 1.0
    for name, q in (("rounded", qform), ("moved", moved)):
        image = nib.Nifti1Image(np.zeros((112, 112, 73), dtype=np.float32), None)
        image.set_qform(q, code=1)
        image.set_sform(sform, code=1)
        nib.save(image, str(tmp_path / f"{name}.nii.gz"))
        caplog.clear()
        with caplog.at_level("INFO", logger="StrokePredictorLib.io"):
            read_volume(tmp_path / f"{name}.nii.gz")
        assert ("qform and sform differ" in caplog.text) is (name == "moved")


def test_sform_only_file_uses_sform(tmp_path: Path) -> None:
    sform = np.diag([-1.5, -1.5, 3.0, 1.0])
    sform[:3, 3] = (4.0, 5.0, 6.0)
    image = nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.float32), None)
    image.set_sform(sform, code=1)
    image.set_qform(None, code=0)
    nib.save(image, str(tmp_path / "s.nii.gz"))
    np.testing.assert_allclose(read_volume(tmp_path / "s.nii.gz").geometry.ijk_to_ras, sform, atol=1e-5)


# ---- bad files ------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputImageError, match=r"DWI file .*nope.nii.gz does not exist"):
        read_volume(tmp_path / "nope.nii.gz", role="DWI")


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"this is not an image")
    with pytest.raises(InputImageError, match=r"ADC file .*garbage.nii.gz could not be read"):
        read_volume(path, role="ADC")


def test_truncated_file(tmp_path: Path) -> None:
    geometry = GEOMETRIES["oblique"]
    path = write_volume(_array(geometry), geometry, tmp_path / "full.nii.gz")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputImageError, match="truncated.nii.gz could not be read"):
        read_volume(truncated, role="DWI")


def test_uncompressed_truncated_nifti(tmp_path: Path) -> None:
    geometry = GEOMETRIES["axis-aligned LPS"]
    path = write_volume(_array(geometry), geometry, tmp_path / "full.nii", compress=False)
    cut = tmp_path / "cut.nii"
    cut.write_bytes(path.read_bytes()[:500])
    with pytest.raises(InputImageError, match="cut.nii"):
        read_volume(cut, role="DWI")


def test_two_dimensional_image(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(InputImageError, match=r"slice.nii.gz is 2-D; a 3-D volume is expected"):
        read_volume(tmp_path / "slice.nii.gz", role="DWI")


def test_four_dimensional_dwi_explains_what_to_pass(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 5, 3), np.float32), np.eye(4)), str(tmp_path / "dwi4d.nii.gz"))
    with pytest.raises(InputImageError, match=r"is 4-D \(3 volumes\).*b=1000.*trace"):
        read_volume(tmp_path / "dwi4d.nii.gz", role="DWI")


def test_constant_and_non_finite_images_are_refused() -> None:
    geometry = Geometry((4, 4, 4), (1, 1, 1), (0, 0, 0))
    with pytest.raises(InputImageError, match="empty or constant"):
        check_volume(Volume(np.full(geometry.shape, 3.0, np.float32), geometry), "DWI")
    array = np.ones(geometry.shape, np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    with pytest.raises(InputImageError, match=r"ADC .* has 2 NaN or infinite voxel"):
        check_volume(Volume(array, geometry), "ADC")


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path) -> None:
    geometry = GEOMETRIES["axis-aligned LPS"]
    path = write_volume(_array(geometry), geometry, tmp_path / "out.nii.gz")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="exists already"):
        write_volume(np.zeros(geometry.shape, np.float32), geometry, path)
    assert path.read_bytes() == before
    write_volume(np.zeros(geometry.shape, np.float32), geometry, path, overwrite=True)
    assert read_volume(path).array.max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]  # no temp files left


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    geometry = GEOMETRIES["axis-aligned LPS"]
    with pytest.raises(ValueError):
        write_volume(np.zeros((2, 2, 2), np.float32), geometry, tmp_path / "bad.nii.gz")
    assert list(tmp_path.iterdir()) == []


# ---- ISLES 2022 discovery -----------------------------------------------------------------
def _touch_case(root: Path, case: str, flair_name: str | None, mask: bool, derivatives: Path) -> None:
    geometry = Geometry((4, 4, 4), (2, 2, 2), (0, 0, 0))
    session = root / case / "ses-0001"
    for name in ("dwi", "adc"):
        write_volume(np.ones(geometry.shape, np.float32), geometry, session / "dwi" / f"{case}_ses-0001_{name}.nii.gz")
    (session / "dwi" / f"{case}_ses-0001_dwi.json").write_text(json.dumps({"PatientAge": "071Y", "PatientSex": "M"}))
    if flair_name:
        write_volume(np.ones(geometry.shape, np.float32), geometry,
                     session / "anat" / f"{case}_ses-0001_{flair_name}.nii.gz")
    if mask:
        write_volume(np.zeros(geometry.shape, np.uint8), geometry,
                     derivatives / case / "ses-0001" / f"{case}_ses-0001_msk.nii.gz")


def test_discover_zenodo_layout(tmp_path: Path) -> None:
    root = tmp_path / "ISLES-2022"
    _touch_case(root, "sub-strokecase0001", "FLAIR", True, root / "derivatives")
    _touch_case(root, "sub-strokecase0002", None, False, root / "derivatives")
    cases = discover_isles(tmp_path)  # the parent of ISLES-2022 works too
    assert [c.case_id for c in cases] == ["sub-strokecase0001", "sub-strokecase0002"]
    first, second = cases
    assert first.flair is not None and first.flair.name.endswith("_FLAIR.nii.gz")
    assert first.mask is not None and first.mask.name.endswith("_msk.nii.gz")
    assert (first.age, first.sex) == (71.0, "M")
    assert second.flair is None and second.mask is None


def test_discover_challenge_layout_with_lower_case_flair(tmp_path: Path) -> None:
    _touch_case(tmp_path / "rawdata", "sub-strokecase0100", "flair", True, tmp_path / "derivatives")
    (case,) = discover_isles(tmp_path)
    assert case.flair is not None and case.flair.name.endswith("_flair.nii.gz")
    assert case.mask is not None


def test_discover_reports_missing_adc(tmp_path: Path) -> None:
    _touch_case(tmp_path, "sub-strokecase0003", None, False, tmp_path / "derivatives")
    next((tmp_path / "sub-strokecase0003").rglob("*_adc.nii.gz")).unlink()
    with pytest.raises(InputImageError, match="sub-strokecase0003 .* has no ADC file"):
        discover_isles(tmp_path)


def test_discover_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputImageError, match="No ISLES 2022 case found"):
        discover_isles(tmp_path)


def test_real_isles_case_is_discovered_and_read(isles_case_dir: Path) -> None:
    (case,) = discover_isles(isles_case_dir)
    assert case.case_id == "sub-strokecase0009"
    assert (case.age, case.sex) == (60.0, "F")
    dwi, mask = read_volume(case.dwi), read_volume(case.mask)
    assert dwi.geometry.size == (112, 112, 73)
    assert dwi.geometry.same_grid(mask.geometry)
    assert int(mask.array.sum()) == 523
    with gzip.open(case.dwi) as handle:  # the file really is float64 on disk
        assert np.frombuffer(handle.read(348), dtype=np.int16)[35] == 64  # datatype code 64 = float64


def test_nan_voxels_in_nifti_are_seen_and_refused(tmp_path: Path) -> None:
    data = np.ones((6, 5, 4), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    volume = read_volume(tmp_path / "nan.nii.gz", role="DWI")
    assert np.isnan(volume.array[3, 2, 1])
    with pytest.raises(InputImageError, match=r"DWI .*nan.nii.gz has 1 NaN or infinite voxel"):
        check_volume(volume, "DWI")


def test_scaled_integer_nifti_applies_the_slope(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(5, 4, 3), np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, str(tmp_path / "scaled.nii.gz"))
    volume = read_volume(tmp_path / "scaled.nii.gz")
    assert volume.array[0, 0, 1] == pytest.approx(10.0 + 0.5 * 12)  # [k, j, i] = i=1 -> value 12 in C order


def test_find_case_files_by_name(tmp_path: Path) -> None:
    geometry = GEOMETRIES["axis-aligned LPS"]
    for name in ("case_DWI.nii.gz", "case_adc.nii.gz", "case_clinical.json"):
        if name.endswith(".json"):
            (tmp_path / name).write_text("{}")
        else:
            write_volume(_array(geometry), geometry, tmp_path / name)
    found = find_case_files(tmp_path)
    assert {role: path.name for role, path in found.items()} == {
        "dwi": "case_DWI.nii.gz", "adc": "case_adc.nii.gz", "clinical": "case_clinical.json"}
    assert find_case_files(tmp_path / "missing") == {}


# ---- orientation quirks, output folders --------------------------------------------------
def _nifti(tmp_path: Path, affine: np.ndarray, qcode: int, scode: int, name: str) -> Path:
    image = nib.Nifti1Image(np.random.default_rng(0).random((10, 9, 8)).astype(np.float32), None)
    image.set_qform(affine, code=qcode)
    image.set_sform(affine, code=scode)
    path = tmp_path / name
    nib.save(image, str(path))
    return path


def test_sheared_sform_without_qform_is_a_clear_error(tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[0, 1] = 1.0  # shear
    path = _nifti(tmp_path, affine, 0, 2, "sheared.nii.gz")
    with pytest.raises(InputImageError, match=r"sform has shear .* qform is not set \(code 0\).*Reslice"):
        read_volume(path, role="DWI")


def test_image_without_qform_or_sform_is_read_with_a_warning(tmp_path: Path) -> None:
    path = _nifti(tmp_path, np.diag([2.0, 2.0, 3.0, 1.0]), 0, 0, "uncoded.nii.gz")
    volume = read_volume(path, role="ADC")
    assert volume.geometry.spacing == (2.0, 2.0, 3.0)
    assert len(volume.warnings) == 1
    assert "ADC file uncoded.nii.gz has neither a qform nor an sform" in volume.warnings[0]
    coded = _nifti(tmp_path, np.diag([2.0, 2.0, 3.0, 1.0]), 1, 1, "coded.nii.gz")
    assert read_volume(coded).warnings == []


def test_a_folder_given_as_image(tmp_path: Path) -> None:
    with pytest.raises(InputImageError, match="is a folder; pass the image file itself"):
        read_volume(tmp_path, role="DWI")


def test_output_folder_rules(tmp_path: Path) -> None:
    from StrokePredictorLib.io import MARKER_FILE, check_output_folder, recognised_kind, write_folder_marker

    check_output_folder(tmp_path / "new", "dataset", overwrite=False)  # missing: fine
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", "dataset", overwrite=False)
    nnunet = tmp_path / "Dataset001_Stroke"
    nnunet.mkdir()
    (nnunet / "dataset.json").write_text('{"channel_names": {"0": "DWI"}}')
    with pytest.raises(OutputExistsError, match="not empty; pass --overwrite"):
        check_output_folder(nnunet, "dataset", overwrite=False)
    with pytest.raises(OutputExistsError, match="is not a folder written by StrokePredictor .* nothing was deleted"):
        check_output_folder(nnunet, "dataset", overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x.nii.gz").write_bytes(b"x")
    write_folder_marker(mine, "outputs", "test")
    assert recognised_kind(mine) == "outputs" and (mine / MARKER_FILE).is_file()
    check_output_folder(mine, "outputs", overwrite=True)
    with pytest.raises(OutputExistsError, match="is a outputs folder"):
        check_output_folder(mine, "dataset", overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="symbolic link to .*nowhere, which does not exist"):
        check_output_folder(link, "bundle", overwrite=True)


def test_writable_check_creates_with_ordinary_rights_and_takes_back(tmp_path: Path) -> None:
    import os

    from StrokePredictorLib.io import ensure_writable_dir, remove_created_dirs

    old = os.umask(0o027)
    try:
        created = ensure_writable_dir(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert created == [tmp_path / "a" / "b", tmp_path / "a"]
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o750 and list((tmp_path / "a" / "b").iterdir()) == []
    remove_created_dirs(created)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="cannot be written"):
        ensure_writable_dir(tmp_path / "file" / "out")


def test_stale_partials_of_dead_processes_are_removed(tmp_path: Path) -> None:
    import os
    import platform
    import re
    import subprocess
    import sys

    from StrokePredictorLib.io import PARTIAL_PREFIX, partial_dir, remove_stale_partials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = re.sub(r"[^A-Za-z0-9_.]", "_", platform.node() or "host")[:40]
    stale = tmp_path / f"{PARTIAL_PREFIX}{host}-{dead.pid}-x1"
    stale.mkdir()
    foreign_old = tmp_path / f"{PARTIAL_PREFIX}otherhost-1-x2"
    foreign_old.mkdir()
    os.utime(foreign_old, (0, 0))
    foreign_new = tmp_path / f"{PARTIAL_PREFIX}otherhost-1-x3"
    foreign_new.mkdir()
    mine = partial_dir(tmp_path)
    user = tmp_path / ".partial-notes"
    user.mkdir()
    assert sorted(remove_stale_partials(tmp_path)) == sorted([stale, foreign_old])
    assert mine.exists() and foreign_new.exists() and user.exists()
