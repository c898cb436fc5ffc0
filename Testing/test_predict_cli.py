"""Prediction command line: every output file end to end, batch mode, and bad input."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from inference_phantom import write_case, write_tiny_bundle

from StrokePredictorLib.io import MARKER_FILE, Geometry, read_volume, write_volume
from StrokePredictorLib.outputs import OUTPUT_FILES
from StrokePredictorLib.predict import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    return {"root": root, "case": write_case(root / "case"), "bundle": write_tiny_bundle(root / "bundle")}


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _args(setup: dict, out: Path, **override: object) -> list[str]:
    case = {**setup["case"], **{k: v for k, v in override.items() if k in ("dwi", "adc", "flair")}}
    args = ["--dwi", case["dwi"], "--adc", case["adc"], "--bundle", override.get("bundle", setup["bundle"]),
            "--out", out, "--device", override.get("device", "cpu"), "--mc-samples", "6"]
    if case.get("flair") is not None:
        args += ["--flair", case["flair"]]
    args += ["--clinical", *override.get("clinical", ["nihss=14", "age=77", "sex=F", "onset_to_imaging_h=unknown"])]
    return [str(a) for a in args]


def test_end_to_end_outputs(setup: dict, capsys: pytest.CaptureFixture) -> None:
    out = setup["root"] / "out"
    code, stdout, stderr = _run(capsys, *_args(setup, out))
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"RESULT {out / 'summary.json'}"
    assert lines[-2].startswith("Lesion volume ") and " mL (95% interval " in lines[-2] and str(out) in lines[-2]
    fractions = [float(line.split()[1]) for line in lines if line.startswith("PROGRESS")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 5
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES.values(), MARKER_FILE])

    dwi = read_volume(setup["case"]["dwi"])
    volumes = {name: read_volume(out / OUTPUT_FILES[name]) for name in
               ("probability", "uncertainty", "uncertainty_std", "lesion", "attention_spatial")}
    for name, volume in volumes.items():
        assert volume.geometry.same_grid(dwi.geometry), name
        np.testing.assert_allclose(volume.geometry.ijk_to_ras, dwi.geometry.ijk_to_ras, atol=1e-4)
        assert 0.0 <= float(volume.array.min()) and float(volume.array.max()) <= 1.0, name
    assert sitk.ReadImage(str(out / "lesion.nii.gz")).GetPixelID() == sitk.sitkUInt8
    assert sitk.ReadImage(str(out / "probability.nii.gz")).GetPixelID() == sitk.sitkFloat32
    probability = volumes["probability"].array
    lesion = volumes["lesion"].array
    np.testing.assert_array_equal(lesion, (probability >= 0.5).astype(lesion.dtype))
    assert lesion.any()
    assert float(volumes["uncertainty_std"].array.max()) > 0.0

    summary = json.loads((out / "summary.json").read_text())
    for key in ("lesion_volume_ml", "n_components", "mean_uncertainty_in_lesion", "threshold", "mc_samples", "seed",
                "device", "bundle", "inputs", "uncertainty", "timings_s", "versions", "files"):
        assert key in summary, key
    assert summary["lesion_volume_ml"]["mask"] == pytest.approx(lesion.sum() * dwi.geometry.voxel_volume_ml)
    assert len(summary["lesion_volume_ml"]["ci95"]) == 2 and summary["mc_samples"] == 6
    assert summary["bundle"]["name"] == "tiny-test" and len(summary["bundle"]["sha256"]) == 64
    assert summary["inputs"]["flair_present"] is True and summary["inputs"]["clinical"]["nihss"] == 14.0
    assert set(summary["uncertainty"]) >= {"uncertainty.nii.gz", "uncertainty_std.nii.gz"}
    assert summary["files"] == OUTPUT_FILES and summary["device"] == "cpu"

    attention = json.loads((out / "attention.json").read_text())
    features = attention["features"]
    assert [f["name"] for f in features][:3] == ["age", "sex", "nihss"] and len(features) == 10
    assert sum(f["weight"] for f in features) == pytest.approx(1.0, abs=1e-6)
    by_name = {f["name"]: f for f in features}
    assert by_name["nihss"]["value"] == 14.0 and by_name["nihss"]["missing"] is False
    assert by_name["onset_to_imaging_h"]["value"] is None and by_name["onset_to_imaging_h"]["missing"] is True
    assert attention["spatial_attention_file"] == "attention_spatial.nii.gz"
    with (out / "attention.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [r["name"] for r in rows] == [f["name"] for f in features]
    assert float(rows[2]["weight"]) == pytest.approx(by_name["nihss"]["weight"], abs=1e-6)

    png = (out / "overview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_segmentation_file_reads_in_slicerio(setup: dict, capsys: pytest.CaptureFixture) -> None:
    slicerio = pytest.importorskip("slicerio")
    out = setup["root"] / "seg"
    code, _, stderr = _run(capsys, *_args(setup, out))
    assert code == 0, stderr
    segmentation = slicerio.read_segmentation(str(out / "lesion.seg.nrrd"))
    (segment,) = segmentation["segments"]
    assert segment["name"] == "Stroke lesion (predicted)" and segment["labelValue"] == 1 and segment["layer"] == 0
    assert segment["terminology"]["type"] == ["SCT", "55641003", "Infarct"]
    assert segment["terminology"]["category"][2] == "Morphologically Altered Structure"
    assert len(segment["color"]) == 3
    dwi = read_volume(setup["case"]["dwi"])
    np.testing.assert_allclose(segmentation["ijkToLPS"], dwi.geometry.ijk_to_lps, atol=1e-4)
    lesion = read_volume(out / "lesion.nii.gz").array
    np.testing.assert_array_equal(np.transpose(segmentation["voxels"], (2, 1, 0)), lesion.astype(np.uint8))
    kji = np.argwhere(lesion > 0)
    assert segment["extent"] == [int(v) for pair in zip(kji.min(0)[::-1], kji.max(0)[::-1], strict=True) for v in pair]


def test_existing_outputs_are_kept(setup: dict, capsys: pytest.CaptureFixture) -> None:
    out = setup["root"] / "keep"
    assert _run(capsys, *_args(setup, out))[0] == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    code, stdout, stderr = _run(capsys, *_args(setup, out))
    assert code == 2 and "RESULT" not in stdout
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and "--overwrite" in stderr
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    code, _, stderr = _run(capsys, *_args(setup, out, clinical=["nihss=2"]), "--overwrite")
    assert code == 0, stderr
    assert json.loads((out / "summary.json").read_text())["inputs"]["clinical"]["nihss"] == 2.0
    assert [p for p in out.parent.iterdir() if p.name.startswith(".")] == []


def _bad_inputs(root: Path, setup: dict) -> dict[str, tuple[dict, str]]:
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    dwi = read_volume(setup["case"]["dwi"])
    truncated = bad / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(setup["case"]["dwi"].read_bytes())[:5000]))
    four_d = sitk.JoinSeries([dwi.to_sitk(), dwi.to_sitk()])
    sitk.WriteImage(four_d, str(bad / "dwi4d.nii.gz"))
    write_volume(np.full(dwi.array.shape, 7.0, np.float32), dwi.geometry, bad / "constant.nii.gz", overwrite=True)
    nan = dwi.array.copy()
    nan[3, 4, 5] = np.nan
    write_volume(nan, dwi.geometry, bad / "nan.nrrd", overwrite=True)  # SimpleITK reads NIfTI NaN as 0
    far = Geometry(dwi.geometry.size, dwi.geometry.spacing, (900.0, 900.0, 900.0), dwi.geometry.direction)
    write_volume(read_volume(setup["case"]["adc"]).array, far, bad / "adc_far.nii.gz", overwrite=True)
    flair = read_volume(setup["case"]["flair"])
    far_flair = Geometry(flair.geometry.size, flair.geometry.spacing, (0.0, 900.0, 0.0), flair.geometry.direction)
    write_volume(flair.array, far_flair, bad / "flair_far.nii.gz", overwrite=True)
    tampered = write_tiny_bundle(bad / "tampered", seed=9)
    weights = tampered / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    return {
        "truncated": ({"dwi": truncated}, "could not be read"),
        "missing file": ({"adc": bad / "nope.nii.gz"}, "does not exist"),
        "4-D DWI": ({"dwi": bad / "dwi4d.nii.gz"}, "4-D"),
        "constant": ({"dwi": bad / "constant.nii.gz"}, "constant"),
        "NaN": ({"dwi": bad / "nan.nrrd"}, "NaN"),
        "ADC grid does not overlap": ({"adc": bad / "adc_far.nii.gz"}, "ADC"),
        "FLAIR without overlap": ({"flair": bad / "flair_far.nii.gz"}, "FLAIR"),
        "bad clinical value": ({"clinical": ["nihss=57"]}, "nihss"),
        "unknown clinical field": ({"clinical": ["weight=80"]}, "weight"),
        "missing bundle": ({"bundle": bad / "no_bundle"}, "does not exist"),
        "wrong checksum": ({"bundle": tampered}, "checksum"),
        "unknown device": ({"device": "tpu"}, "Unknown device 'tpu'"),
    }


def test_bad_input_one_line_error_nothing_written(setup: dict, capsys: pytest.CaptureFixture) -> None:
    cases = _bad_inputs(setup["root"], setup)
    for label, (override, expected) in cases.items():
        out = setup["root"] / "bad_out" / label.replace(" ", "_")
        code, stdout, stderr = _run(capsys, *_args(setup, out, **override))
        assert code == 2, label
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, (label, stderr)
        assert expected in stderr, (label, stderr)
        assert "RESULT" not in stdout and "Traceback" not in stderr
        assert not out.exists(), label
    assert not (setup["root"] / "bad_out").exists()


def test_usage_errors(setup: dict, capsys: pytest.CaptureFixture) -> None:
    code, _, stderr = _run(capsys, "--out", setup["root"] / "u", "--dwi", setup["case"]["dwi"],
                           "--bundle", setup["bundle"], "--device", "cpu")
    assert code == 2 and stderr.startswith("error: ") and "--adc" in stderr and stderr.count("\n") == 1
    code, _, stderr = _run(capsys, "--dwi", "x")
    assert code == 2 and "--out" in stderr and stderr.count("\n") == 1
    code, _, stderr = _run(capsys, "--out", str(setup["root"] / "abbrev"), "--dw", "x")  # no prefix of --dwi
    assert code == 2 and "unrecognized arguments: --dw" in stderr and not (setup["root"] / "abbrev").exists()
    for flag, value, named in (("--max-component-adc", "-0.5", "max_component_adc"),
                               ("--min-component-ml", "-1", "min_component_ml"), ("--threshold", "1.5", "threshold")):
        out = setup["root"] / "bad_post"
        code, stdout, stderr = _run(capsys, *_args(setup, out), flag, value)
        assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, (flag, stderr)
        assert named in stderr and "RESULT" not in stdout and not out.exists(), (flag, stderr)


@pytest.mark.slow
def test_batch_mode_over_isles_folder(setup: dict, capsys: pytest.CaptureFixture) -> None:
    root = setup["root"] / "isles"
    for number, flair in ((1, True), (2, False)):
        subject = f"sub-strokecase{number:04d}"
        case = write_case(setup["root"] / f"raw{number}", flair=flair, seed=number)
        target = root / subject / "ses-0001"
        (target / "dwi").mkdir(parents=True)
        os.replace(case["dwi"], target / "dwi" / f"{subject}_ses-0001_dwi.nii.gz")
        os.replace(case["adc"], target / "dwi" / f"{subject}_ses-0001_adc.nii.gz")
        if flair:
            (target / "anat").mkdir()
            os.replace(case["flair"], target / "anat" / f"{subject}_ses-0001_FLAIR.nii.gz")
    table = setup["root"] / "clinical.csv"
    table.write_text("case_id,nihss,age\nsub-strokecase0001,4,55\nsub-strokecase0002,,80\n")
    out = setup["root"] / "batch_out"
    code, stdout, stderr = _run(capsys, "--isles", root, "--clinical-csv", table, "--out", out,
                                "--bundle", setup["bundle"], "--device", "cpu", "--mc-samples", "4")
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == f"RESULT {out / 'batch_summary.json'}"
    batch = json.loads((out / "batch_summary.json").read_text())
    assert batch["n_cases"] == 2 and batch["n_failed"] == 0
    for number, nihss in ((1, 4.0), (2, None)):
        folder = out / f"sub-strokecase{number:04d}"
        assert sorted(p.name for p in folder.iterdir()) == sorted([*OUTPUT_FILES.values(), MARKER_FILE])
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["inputs"]["clinical"]["nihss"] == nihss
        assert summary["inputs"]["flair_present"] is (number == 1)
        dwi = read_volume(summary["inputs"]["dwi"])
        assert read_volume(folder / "probability.nii.gz").geometry.same_grid(dwi.geometry)


@pytest.mark.slow
def test_module_entry_point_subprocess(setup: dict) -> None:
    out = setup["root"] / "subprocess"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "StrokePredictorLib.predict", *_args(setup, out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"RESULT {out / 'summary.json'}"
    bad = subprocess.run([sys.executable, "-m", "StrokePredictorLib.predict", *_args(setup, out, device="tpu")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: Unknown device 'tpu'; expected auto, "
                                                                       "cpu or cuda."]
