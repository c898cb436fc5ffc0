"""Finding 1 of the adversarial review: no verb deletes a folder it did not write.

``generate --overwrite`` used to wipe any folder holding a ``dataset.json`` (an nnU-Net dataset, for
instance) and ``interpolate --overwrite`` any folder at all. Every folder a verb writes now carries a
marker, and ``--overwrite`` replaces only such a folder. The generated dataset is also checked to be
plausible input for the prediction (no false warning).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from inference_phantom import write_tiny_bundle

from StrokePredictorLib.errors import OutputExistsError
from StrokePredictorLib.io import MARKER_FILE, discover_isles, read_volume, recognised_kind
from Training.__main__ import main as training_main
from Training.synthesis.generate import main as generate_main


def _nnunet(root: Path) -> Path:
    folder = root / "Dataset001_Stroke"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "imagesTr" / "case_0000.nii.gz").write_bytes(b"someone's data")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "DWI"}, "numTraining": 1}))
    return folder


def test_generate_overwrite_refuses_a_foreign_dataset_and_replaces_its_own(tmp_path: Path) -> None:
    foreign = _nnunet(tmp_path)
    with pytest.raises(OutputExistsError, match="not a folder written by StrokePredictor"):
        generate_main(["--out", str(foreign), "--cases", "1", "--tiny", "--overwrite"])
    assert (foreign / "imagesTr" / "case_0000.nii.gz").read_bytes() == b"someone's data"
    out = tmp_path / "generated"
    old = os.umask(0o022)
    try:
        assert generate_main(["--out", str(out), "--cases", "1", "--seed", "2", "--tiny",
                              "--lesion-kind", "territorial"]) == 0
    finally:
        os.umask(old)
    assert recognised_kind(out) == "dataset" and (out / MARKER_FILE).is_file()
    assert out.stat().st_mode & 0o777 == 0o755  # not the 0700 of a temporary folder
    assert generate_main(["--out", str(out), "--cases", "1", "--seed", "3", "--tiny", "--overwrite",
                          "--lesion-kind", "territorial"]) == 0
    assert json.loads((out / "dataset.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset001_Stroke", "generated"]

    # the generated case is plausible input: no warning, no error
    from StrokePredictorLib.preprocess import brain_mask, check_inputs, detect_adc_unit, input_statistics

    case = discover_isles(out)[0]
    dwi, adc = read_volume(case.dwi), read_volume(case.adc)
    brain = brain_mask(np.clip(dwi.array, 0, None), dwi.geometry.spacing)
    unit, factor = detect_adc_unit(np.clip(adc.array, 0, None), brain)
    stats = input_statistics(dwi.array, adc.array, factor, brain)
    assert check_inputs(stats, unit) == [] and stats.rho < -0.5 and stats.csf_fraction > 0.01


def test_interpolate_overwrite_refuses_a_thesis(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bundle = write_tiny_bundle(tmp_path / "bundle", seed=2)
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "main.tex").write_text("four years")
    code = training_main(["interpolate", "--start", str(bundle), "--end", str(bundle), "--alpha", "0.5",
                          "--out", str(thesis), "--overwrite"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "not a folder written by StrokePredictor" in stderr and "nothing was deleted" in stderr
    assert sorted(p.name for p in thesis.iterdir()) == ["chapters", "main.tex"]
    out = tmp_path / "mixed"
    assert training_main(["interpolate", "--start", str(bundle), "--end", str(bundle), "--out", str(out)]) == 0
    (out / "README.md").write_text("card")
    assert training_main(["interpolate", "--start", str(bundle), "--end", str(bundle), "--alpha", "0.2",
                          "--out", str(out), "--overwrite"]) == 0
    assert (out / "README.md").read_text() == "card"
    assert json.loads((out / "model.json").read_text())["data"]["training"]["interpolated"]["alpha"] == 0.2
