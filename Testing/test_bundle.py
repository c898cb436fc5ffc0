"""Model bundles: round trip, checksum, refusal of pickles and tampered files, devices."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from inference_phantom import TINY_GRID, tiny_config, write_tiny_bundle

from StrokePredictorLib.bundle import (
    LITE_GRID,
    default_bundle_dir,
    load_bundle,
    recommended_grid,
    resolve_device,
    save_bundle,
)
from StrokePredictorLib.clinical import SCHEMA_VERSION
from StrokePredictorLib.errors import BundleError, OutputExistsError, StrokePredictorError
from StrokePredictorLib.network import NetworkConfig, StrokeNet
from StrokePredictorLib.preprocess import ModelGrid, Normalization


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    return write_tiny_bundle(tmp_path / "bundle", seed=3)


def test_round_trip(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    torch.manual_seed(3)
    original = StrokeNet(tiny_config())
    with torch.no_grad():
        original.head.bias.fill_(0.0)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(bundle.model.state_dict()[key], value, rtol=0, atol=0)
    assert not bundle.model.training
    assert bundle.config == tiny_config()
    assert bundle.grid == TINY_GRID and bundle.task == "acute" and bundle.normalization == Normalization()
    metadata = json.loads((bundle_dir / "model.json").read_text())
    digest = hashlib.sha256((bundle_dir / "weights.safetensors").read_bytes()).hexdigest()
    assert metadata["weights"]["sha256"] == digest
    assert metadata["clinical_schema_version"] == SCHEMA_VERSION
    assert metadata["inputs"]["modalities"] == ["dwi", "adc", "flair"]
    assert metadata["grid"]["size"] == [32, 40, 32] and metadata["grid"]["spacing"] == [5.0, 5.0, 5.0]
    for key in ("normalization", "data", "metrics", "library_version", "architecture", "task", "version"):
        assert key in metadata
    assert bundle.describe() == {"name": "tiny-test", "task": "acute", "version": metadata["version"],
                                 "sha256": metadata["weights"]["sha256"]}
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["model.json", "weights.safetensors"]


def test_overwrite_and_bad_grid(bundle_dir: Path) -> None:
    model = StrokeNet(tiny_config())
    kwargs = dict(task="acute", normalization=Normalization(), data={}, metrics={})
    with pytest.raises(OutputExistsError):
        save_bundle(bundle_dir, model, grid=TINY_GRID, **kwargs)
    with pytest.raises(ValueError, match="divisible"):
        save_bundle(bundle_dir.parent / "other", model, grid=ModelGrid((30, 40, 32)), **kwargs)
    with pytest.raises(ValueError, match="task"):
        save_bundle(bundle_dir.parent / "other", model, grid=TINY_GRID, **{**kwargs, "task": "chronic"})
    assert not (bundle_dir.parent / "other").exists()
    save_bundle(bundle_dir, model, grid=TINY_GRID, overwrite=True, **{**kwargs, "task": "outcome"})
    assert load_bundle(bundle_dir).task == "outcome"
    assert [p.name for p in bundle_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_tampered_weights_are_refused(bundle_dir: Path) -> None:
    weights = bundle_dir / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(bundle_dir)


def test_pickled_weights_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    # A pickle next to the weights.
    stray = bundle_dir / "model.pt"
    torch.save({"x": torch.zeros(1)}, stray)
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(bundle_dir)
    stray.unlink()
    # A pickle disguised as the safetensors file, with a matching checksum in model.json.
    weights = bundle_dir / "weights.safetensors"
    torch.save(StrokeNet(tiny_config()).state_dict(), weights)
    metadata = json.loads((bundle_dir / "model.json").read_text())
    metadata["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (bundle_dir / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match="pickled"):
        load_bundle(bundle_dir)
    # model.json pointing at a .bin file.
    metadata["weights"]["file"] = "weights.bin"
    (bundle_dir / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match="safetensors"):
        load_bundle(bundle_dir)


def test_missing_and_malformed_bundles(tmp_path: Path, bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (bundle_dir / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)
    (bundle_dir / "model.json").unlink()
    with pytest.raises(BundleError, match="no model.json"):
        load_bundle(bundle_dir)


def test_architecture_mismatch_is_refused(bundle_dir: Path) -> None:
    metadata = json.loads((bundle_dir / "model.json").read_text())
    metadata["architecture"]["config"]["head_channels"] = 12
    (bundle_dir / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(bundle_dir)


def test_default_dir_and_grids(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STROKEPREDICTOR_BUNDLE", raising=False)
    assert default_bundle_dir("outcome").parts[-4:] == ("StrokePredictor", "Resources", "Models", "outcome")
    monkeypatch.setenv("STROKEPREDICTOR_BUNDLE", str(tmp_path))
    assert default_bundle_dir() == tmp_path
    assert recommended_grid(NetworkConfig.lite()) == LITE_GRID
    assert all(s % 16 == 0 for s in LITE_GRID.size)
    assert all(s % 32 == 0 for s in recommended_grid(NetworkConfig.base()).size)


def test_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(StrokePredictorError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(StrokePredictorError, match="no CUDA"):
            resolve_device("cuda")
