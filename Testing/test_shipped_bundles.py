"""The shipped model bundles and sample case: checksums, sizes, model cards, and a stored-reference
prediction on the sample case (nnU-Net's CI habit: predict a known case, compare with a stored
output of the same model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from StrokePredictorLib import clinical
from StrokePredictorLib.bundle import load_bundle
from StrokePredictorLib.inference import Predictor
from StrokePredictorLib.io import read_volume

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "StrokePredictor" / "Resources" / "Models"
SAMPLE = REPO / "StrokePredictor" / "Resources" / "SampleData"
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
TASKS = ("acute", "outcome")


def test_sample_case_checksums_and_size() -> None:
    lines = (SAMPLE / "SHA256SUMS").read_text().split("\n")
    entries = [line.split() for line in lines if line.strip()]
    assert {name for _, name in entries} == {f"StrokePredictorSample_{r}" for r in (
        "dwi.nii.gz", "adc.nii.gz", "flair.nii.gz", "clinical.json")}
    for digest, name in entries:
        assert hashlib.sha256((SAMPLE / name).read_bytes()).hexdigest() == digest, name
    assert sum((SAMPLE / name).stat().st_size for _, name in entries) <= 5 * 1024 * 1024
    record = clinical.read_json(SAMPLE / "StrokePredictorSample_clinical.json")
    assert record["nihss"] == 12.0 and record["treatment"] is None


@pytest.mark.parametrize("task", TASKS)
def test_bundle_loads_with_checksum_and_has_a_model_card(task: str) -> None:
    bundle = load_bundle(MODELS / task)
    assert bundle.task == task
    assert (MODELS / task / "weights.safetensors").stat().st_size <= 25 * 1000 * 1000
    card = (MODELS / task / "README.md").read_text()
    for heading in ("Intended use", "Training data", "Test-split metrics", "Fusion ablation", "Known limits"):
        assert heading in card, heading
    assert "not a medical device" in card.lower()
    assert bundle.sha256[:12] in card  # the card describes these weights


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_bundle_reproduces_its_stored_reference_on_the_sample_case(task: str) -> None:
    reference = json.loads((REFERENCE / f"sample_{task}.json").read_text())
    bundle = load_bundle(MODELS / task)
    assert bundle.sha256 == reference["bundle_sha256"], "bundle changed: run Testing/make_reference.py"
    assert bundle.postprocessing.to_dict() == reference["postprocessing"], "post-processing changed: run " \
        "Testing/make_reference.py"
    dwi, adc, flair = (read_volume(SAMPLE / f"StrokePredictorSample_{role}.nii.gz") for role in ("dwi", "adc", "flair"))
    record = clinical.read_json(SAMPLE / "StrokePredictorSample_clinical.json")
    prediction = Predictor(bundle, device="cpu", mc_samples=reference["mc_samples"], seed=reference["seed"]).predict(
        dwi, adc, flair, record)
    expected = read_volume(REFERENCE / f"sample_{task}_lesion.nii.gz")
    assert expected.geometry.same_grid(prediction.geometry)
    mask, truth = prediction.mask > 0, expected.array > 0.5
    assert truth.sum() > 100  # the reference holds a real lesion
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice >= 0.99
    assert prediction.volume_ml["mask"] == pytest.approx(reference["volume_ml"]["mask"], rel=0.01)
    assert prediction.volume_ml["ci95"] == pytest.approx(reference["volume_ml"]["ci95"], rel=0.02)
    assert sum(prediction.feature_attention.values()) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(
        [prediction.feature_attention[name] for name in clinical.FEATURE_NAMES],
        [reference["feature_attention"][name] for name in clinical.FEATURE_NAMES], atol=1e-3)
