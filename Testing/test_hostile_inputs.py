"""A hostile-input corpus for the prediction command line.

Every case is built in ``tmp_path`` from the tiny phantom and the tiny random bundle, and ends in
one of two ways: exit status 2 with exactly one ``error:`` line that names the problem, or a
result whose ``summary.json`` warnings name it. Never a traceback, and no file outside ``--out``
is created, changed or removed.
"""

from __future__ import annotations

import codecs
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from inference_phantom import DWI_GEOMETRY, image, write_case, write_tiny_bundle

from StrokePredictorLib.io import MARKER_FILE, PARTIAL_PREFIX, read_volume, write_volume
from StrokePredictorLib.predict import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    (root / "out").mkdir()
    (root / "corpus").mkdir()
    return {"root": root, "case": write_case(root / "case", flair=False),
            "bundle": write_tiny_bundle(root / "bundle", seed=1)}


def _run(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file, and the names of the folders, under ``root``
    except ``skip`` and what it holds (a folder's own time changes when ``skip`` is made in it)."""
    result = {}
    for path in root.rglob("*"):
        if path == skip or skip in path.parents:
            continue
        info = path.lstat()
        result[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns) if not path.is_dir() else (0, 0)
    return result


def _write_nifti(array: np.ndarray, path: Path, *, qform: np.ndarray | None, qcode: int,
                 sform: np.ndarray | None, scode: int) -> Path:
    header = nib.Nifti1Header()
    image_ = nib.Nifti1Image(array.transpose(2, 1, 0).astype(np.float32), None, header)
    image_.set_qform(qform if qform is not None else np.eye(4), code=qcode)
    image_.set_sform(sform if sform is not None else np.eye(4), code=scode)
    nib.save(image_, str(path))
    return path


# ---- the corpus ------------------------------------------------------------------------------------
def _scaled_adc(env: dict, factor: float, name: str) -> Path:
    adc = read_volume(env["case"]["adc"])
    return write_volume(adc.array * np.float32(factor), adc.geometry, env["root"] / "corpus" / name, overwrite=True)


def _b0_like_dwi(env: dict) -> Path:  # CSF bright on the "DWI": a b=0 (T2-weighted) image
    return write_volume(image(DWI_GEOMETRY, {0: 0.0, 1: 100.0, 2: 480.0, 3: 150.0}, 5, 4.0), DWI_GEOMETRY,
                        env["root"] / "corpus" / "b0.nii.gz", overwrite=True)


def _sheared(env: dict) -> Path:
    dwi = read_volume(env["case"]["dwi"])
    affine = dwi.geometry.ijk_to_ras.copy()
    affine[0, 1] += 1.5  # shear: the i and j axes are no longer perpendicular
    return _write_nifti(dwi.array, env["root"] / "corpus" / "sheared.nii.gz", qform=None, qcode=0,
                        sform=affine, scode=2)


def _no_orientation(env: dict, role: str) -> Path:
    volume = read_volume(env["case"][role])
    return _write_nifti(volume.array, env["root"] / "corpus" / f"{role}_uncoded.nii.gz", qform=None, qcode=0,
                        sform=None, scode=0)


def _text_file(env: dict, name: str, data: bytes) -> Path:
    path = env["root"] / "corpus" / name
    path.write_bytes(data)
    return path


# (label, function env -> extra arguments, text the error line must contain)
ERRORS: list[tuple[str, Callable[[dict], list], str]] = [
    # finding 2: wrong answers that used to end with exit 0 and 0 mL
    ("DWI given as ADC", lambda e: ["--adc", e["case"]["dwi"]], "same image"),
    ("ADC given as DWI", lambda e: ["--dwi", e["case"]["adc"]], "same image"),
    ("ADC scaled by 1e4", lambda e: ["--adc", _scaled_adc(e, 1e4, "adc_1e4.nii.gz")], "physically possible"),
    ("ADC scaled by 1e-2", lambda e: ["--adc", _scaled_adc(e, 1e-2, "adc_1e-2.nii.gz")], "physically possible"),
    ("b=0 image given as DWI", lambda e: ["--dwi", _b0_like_dwi(e)], "b=0, T2-weighted or ADC image"),
    # finding 5: silently dropped or misread clinical values
    ("duplicate key", lambda e: ["--clinical", "nihss=12", "nihss=40"], "'nihss' is given twice"),
    ("alias key", lambda e: ["--clinical", "nihss=12", "NIHSS=40"], "'nihss' is given twice"),
    ("underscore in a number", lambda e: ["--clinical", "systolic_bp=1_50"], "'1_50' is not a number"),
    ("duplicate JSON key", lambda e: ["--clinical", _text_file(e, "dup.json", b'{"nihss": 12, "nihss": 40}')],
     "key 'nihss' appears twice"),
    # finding 6: tracebacks
    ("latin-1 clinical JSON", lambda e: ["--clinical", _text_file(e, "latin1.json", '{"sex": "F", "_note": "Müller"}'
                                                                  .encode("latin-1"))], "Latin-1"),
    ("UTF-16 without BOM", lambda e: ["--clinical", _text_file(e, "utf16.json", '{"nihss": 3}'.encode("utf-16-le"))],
     "UTF-16"),
    ("binary file as --clinical", lambda e: ["--clinical", _text_file(e, "blob.json", bytes(range(256)) * 4)],
     "binary"),
    ("folder as --clinical", lambda e: ["--clinical", e["root"] / "corpus"], "is a folder"),
    ("sheared sform, qform 0", lambda e: ["--dwi", _sheared(e)], "shear"),
    ("seed 2**64", lambda e: ["--seed", str(2**64)], "--seed must lie between 0 and 2**63 - 1"),
    # finding 7
    ("1000 Monte-Carlo samples", lambda e: ["--mc-samples", "1000"], "--mc-samples must lie between 1 and 200"),
]


@pytest.mark.parametrize(("label", "make", "expected"), ERRORS, ids=[c[0] for c in ERRORS])
def test_hostile_input_ends_in_one_error_line(env: dict, capsys: pytest.CaptureFixture, label: str,
                                              make: Callable[[dict], list], expected: str) -> None:
    (env["root"] / "corpus").mkdir(exist_ok=True)
    extra = [str(a) for a in make(env)]
    out = env["root"] / "out" / re.sub(r"\W+", "_", label)
    before = _snapshot(env["root"], out)
    defaults = {"--dwi": env["case"]["dwi"], "--adc": env["case"]["adc"], "--bundle": env["bundle"],
                "--device": "cpu", "--mc-samples": "2"}
    args = [a for key, value in defaults.items() if key not in extra for a in (key, value)]
    code, stdout, stderr = _run(capsys, *args, *extra, "--out", out)
    assert code == 2, (label, stderr)
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, (label, stderr)
    assert expected in stderr, (label, stderr)
    assert "Traceback" not in stderr and "RESULT" not in stdout
    assert not out.exists(), label
    assert _snapshot(env["root"], out) == before, label


WARNINGS: list[tuple[str, Callable[[dict], list], str]] = [
    ("ADC scaled by 0.75", lambda e: ["--adc", _scaled_adc(e, 0.75, "adc_075.nii.gz")], "outside the usual"),
    ("DWI without qform or sform", lambda e: ["--dwi", _no_orientation(e, "dwi"),
                                              "--adc", _no_orientation(e, "adc")], "neither a qform nor an sform"),
]


@pytest.mark.parametrize(("label", "make", "expected"), WARNINGS, ids=[c[0] for c in WARNINGS])
def test_unusual_input_runs_and_warns(env: dict, capsys: pytest.CaptureFixture, label: str,
                                      make: Callable[[dict], list], expected: str) -> None:
    (env["root"] / "corpus").mkdir(exist_ok=True)
    extra = [str(a) for a in make(env)]
    out = env["root"] / "out" / re.sub(r"\W+", "_", label)
    before = _snapshot(env["root"], out)
    defaults = {"--dwi": env["case"]["dwi"], "--adc": env["case"]["adc"]}
    args = [a for key, value in defaults.items() if key not in extra for a in (key, value)]
    code, stdout, stderr = _run(capsys, *args, *extra, "--bundle", env["bundle"], "--device", "cpu",
                                "--mc-samples", "2", "--out", out)
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert any(expected in w for w in summary["warnings"]), summary["warnings"]
    assert summary["inputs"]["warnings"] == summary["warnings"]
    assert "Traceback" not in stderr
    assert _snapshot(env["root"], out) == before


def test_the_phantom_itself_has_no_input_warning(env: dict, capsys: pytest.CaptureFixture) -> None:
    """The control: the untouched phantom gives no input warning (the random tiny network's huge
    lesion is flagged by the output check, which is right: it covers most of the brain)."""
    out = env["root"] / "out" / "control"
    code, _, stderr = _run(capsys, "--dwi", env["case"]["dwi"], "--adc", env["case"]["adc"], "--bundle", env["bundle"],
                           "--device", "cpu", "--mc-samples", "2", "--out", out)
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert all(w.startswith("The lesion (") for w in summary["warnings"]), summary["warnings"]
    brain = summary["brain_volume_ml"]
    assert summary["warnings"] == [] or summary["lesion_volume_ml"]["mask"] > 0.5 * brain
    assert summary["inputs"]["plausibility"]["rho"] < 0


def test_warnings_are_drawn_on_the_overview(env: dict, capsys: pytest.CaptureFixture) -> None:
    """The same prediction with and without a warning: the overview differs in its bottom band."""
    from PIL import Image

    from StrokePredictorLib.inference import Predictor
    from StrokePredictorLib.outputs import render_overview

    predictor = Predictor(env["bundle"], device="cpu", mc_samples=2)
    dwi = read_volume(env["case"]["dwi"])
    prediction = predictor.predict(dwi, read_volume(env["case"]["adc"]))
    prediction.warnings = []
    plain = np.asarray(Image.open(__import__("io").BytesIO(render_overview(prediction, dwi))).convert("RGB"))
    prediction.warnings = ["The ADC's brain median is 0.40 x10^-3 mm^2/s, outside the usual 0.6-1.3."]
    warned = np.asarray(Image.open(__import__("io").BytesIO(render_overview(prediction, dwi))).convert("RGB"))
    band = warned[-25:]
    reddish = (band[..., 0] > 120) & (band[..., 1] < 80) & (band[..., 2] < 80)
    assert reddish.sum() > 50 and not ((plain[-25:, ..., 0] > 120) & (plain[-25:, ..., 1] < 80)).any()


# ---- output folders (findings 4 and 7) ----------------------------------------------------------------
def _case_args(env: dict, out: Path) -> list:
    return ["--dwi", env["case"]["dwi"], "--adc", env["case"]["adc"], "--bundle", env["bundle"], "--device", "cpu",
            "--mc-samples", "2", "--out", out]


def test_dangling_symlink_as_out(env: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    code, _, stderr = _run(capsys, *_case_args(env, link))
    assert code == 2 and stderr.count("\n") == 1 and "symbolic link" in stderr and "does not exist" in stderr
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_unwritable_out_fails_before_any_work(env: dict, capsys: pytest.CaptureFixture, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    loaded = []
    import StrokePredictorLib.inference as inference

    monkeypatch.setattr(inference, "load_bundle", lambda *a, **k: loaded.append(1))
    code, _, stderr = _run(capsys, *_case_args(env, blocker / "out"))
    assert code == 2 and stderr.count("\n") == 1 and "cannot be written" in stderr and "Nothing was computed" in stderr
    assert loaded == []  # refused before the bundle was even loaded
    if os.geteuid() != 0:  # root writes everywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        code, _, stderr = _run(capsys, *_case_args(env, locked / "out"))
        assert code == 2 and "cannot be written" in stderr and loaded == []


def test_overwrite_refuses_inputs_inside_out_and_foreign_files(env: dict, capsys: pytest.CaptureFixture,
                                                               tmp_path: Path) -> None:
    folder = tmp_path / "patient"
    paths = write_case(folder, flair=False)
    code, _, stderr = _run(capsys, "--dwi", paths["dwi"], "--adc", paths["adc"], "--bundle", env["bundle"],
                           "--device", "cpu", "--mc-samples", "2", "--out", folder, "--overwrite")
    assert code == 2 and "lies inside the output folder" in stderr
    assert sorted(p.name for p in folder.iterdir()) == ["adc.nii.gz", "dwi.nii.gz"]
    # an input named like an output: never replaced, with or without --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text('{"mine": true}')
    code, _, stderr = _run(capsys, *_case_args(env, foreign), "--overwrite")
    assert code == 2 and "was not written by a StrokePredictor prediction" in stderr
    assert (foreign / "summary.json").read_text() == '{"mine": true}'


def test_new_folders_get_ordinary_permissions(env: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "new" / "out"
        assert _run(capsys, *_case_args(env, out))[0] == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "summary.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [MARKER_FILE]


def test_stale_partial_folder_is_removed_and_staging_stays_inside_out(env: dict, capsys: pytest.CaptureFixture,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    finished = subprocess.run([sys.executable, "-c", "pass"], check=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = re.sub(r"[^A-Za-z0-9_.]", "_", platform.node() or "host")[:40]
    stale = out / f"{PARTIAL_PREFIX}{host}-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "probability.nii.gz").write_bytes(b"half")
    alive = out / f"{PARTIAL_PREFIX}{host}-{os.getpid()}-live"
    alive.mkdir()
    assert finished.returncode == 0
    code, _, stderr = _run(capsys, *_case_args(env, out))
    assert code == 0, stderr
    assert not stale.exists() and alive.exists()  # a running process's folder is left alone
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing beside --out


@pytest.mark.slow
def test_sigterm_cleans_up_like_ctrl_c(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "StrokePredictorLib.predict", *[str(a) for a in _case_args(env, out)]]
    command[command.index("--mc-samples") + 1] = "100"
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout is not None
    for line in process.stdout:
        if "running the network" in line or "sampling" in line:
            break
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: terminated") and "Traceback" not in stderr
    assert not out.exists()  # the folder it created is taken back
    assert list(tmp_path.iterdir()) == []


# ---- batch mode (finding 5) -----------------------------------------------------------------------------
def _isles(root: Path) -> Path:
    subject = "sub-strokecase0001"
    case = write_case(root / "raw", flair=False)
    target = root / "isles" / subject / "ses-0001" / "dwi"
    target.mkdir(parents=True)
    os.replace(case["dwi"], target / f"{subject}_ses-0001_dwi.nii.gz")
    os.replace(case["adc"], target / f"{subject}_ses-0001_adc.nii.gz")
    return root / "isles"


def test_unmatched_csv_rows_are_listed(env: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    isles = _isles(tmp_path)
    table = tmp_path / "clinical.csv"
    table.write_bytes(codecs.BOM_UTF8 + b"case_id,nihss\nsub-strokecase0001,4\nstrokecase0099,7\ncase12,3\n")
    out = tmp_path / "out"
    args = ["--isles", isles, "--clinical-csv", table, "--bundle", env["bundle"], "--device", "cpu",
            "--mc-samples", "2", "--out", out]
    code, _, stderr = _run(capsys, *args)
    assert code == 2 and stderr.count("\n") == 1
    assert "2 row(s) match no case" in stderr and "case12, strokecase0099" in stderr and "--allow-unmatched" in stderr
    assert not out.exists()
    code, _, stderr = _run(capsys, *args, "--allow-unmatched")
    assert code == 0, stderr
    summary = json.loads((out / "sub-strokecase0001" / "summary.json").read_text())
    assert summary["inputs"]["clinical"]["nihss"] == 4.0  # the UTF-8 BOM was handled: case_id found
    assert json.loads((out / "batch_summary.json").read_text())["n_cases"] == 1


def test_help_states_the_sample_cap(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    assert "1 to 200" in " ".join(capsys.readouterr().out.split())


def test_the_command_line_and_the_library_share_the_sample_cap() -> None:
    from StrokePredictorLib import inference, predict

    assert predict.MAX_MC_SAMPLES == inference.MAX_MC_SAMPLES == 200


@pytest.mark.parametrize(("data", "expected"), [
    ("case_id,sex,_note\nsub-strokecase0001,F,Müller\n".encode("latin-1"), "Latin-1"),
    ("case_id,nihss\nsub-strokecase0001,4\n".encode("utf-16-le"), "UTF-16 text without a byte-order mark"),
    (b"case_id,nihss,NIHSS\nsub-strokecase0001,4,40\n", "both hold the field 'nihss'"),
    (b"case_id,systolic_bp\nsub-strokecase0001,1_50\n", "'1_50' is not a number"),
])
def test_hostile_clinical_csv_in_batch_mode(env: dict, capsys: pytest.CaptureFixture, tmp_path: Path,
                                            data: bytes, expected: str) -> None:
    isles = _isles(tmp_path)
    table = tmp_path / "clinical.csv"
    table.write_bytes(data)
    out = tmp_path / "out"
    before = _snapshot(tmp_path, out)
    code, stdout, stderr = _run(capsys, "--isles", isles, "--clinical-csv", table, "--bundle", env["bundle"],
                                "--device", "cpu", "--out", out)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert expected in stderr and "Traceback" not in stderr and "RESULT" not in stdout
    assert not out.exists() and _snapshot(tmp_path, out) == before


def _hostile_bundle(env: dict, tmp_path: Path, change: Callable[[dict, Path], None]) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("model.json", "weights.safetensors"):
        (bundle / name).write_bytes((env["bundle"] / name).read_bytes())
    metadata = json.loads((bundle / "model.json").read_text())
    change(metadata, bundle)
    (bundle / "model.json").write_text(json.dumps(metadata))
    return bundle


def _weights_to_dev_zero(metadata: dict, bundle: Path) -> None:
    (bundle / "weights.safetensors").unlink()
    (bundle / "weights.safetensors").symlink_to("/dev/zero")


BUNDLES: list[tuple[str, Callable[[dict, Path], None], str]] = [
    ("NaN spacing", lambda m, b: m["grid"].__setitem__("spacing", [5.0, float("nan"), 5.0]), "NaN"),
    ("zero spacing", lambda m, b: m["grid"].__setitem__("spacing", [5.0, 0.0, 5.0]), "grid.spacing is"),
    ("NaN adc_scale", lambda m, b: m["normalization"].__setitem__("adc_scale", float("nan")), "NaN"),
    ("zero adc_scale", lambda m, b: m["normalization"].__setitem__("adc_scale", 0), "normalization.adc_scale is 0"),
    ("huge widths", lambda m, b: m["architecture"]["config"].__setitem__("widths", [4, 8, 40000]),
     "architecture.config.widths is [4, 8, 40000]"),
    ("zero heads", lambda m, b: m["architecture"]["config"].__setitem__("heads", 0), "architecture.config.heads is 0"),
    ("negative widths", lambda m, b: m["architecture"]["config"].__setitem__("widths", [4, -8, 8]),
     "architecture.config.widths is [4, -8, 8]"),
    ("format version 'one'", lambda m, b: m.__setitem__("format_version", "one"), 'format_version is "one"'),
    ("weights are /dev/zero", _weights_to_dev_zero, "not a regular file"),
]


@pytest.mark.parametrize(("label", "change", "expected"), BUNDLES, ids=[b[0] for b in BUNDLES])
def test_hostile_bundle_ends_in_one_error_line(env: dict, capsys: pytest.CaptureFixture, tmp_path: Path,
                                               label: str, change: Callable[[dict, Path], None],
                                               expected: str) -> None:
    bundle = _hostile_bundle(env, tmp_path, change)
    out = tmp_path / "out"
    code, stdout, stderr = _run(capsys, "--dwi", env["case"]["dwi"], "--adc", env["case"]["adc"], "--bundle", bundle,
                                "--device", "cpu", "--out", out)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, (label, stderr)
    assert expected in stderr and "Traceback" not in stderr and "RESULT" not in stdout, (label, stderr)
    assert not out.exists()
