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


# ---- model.json is validated before anything is allocated ---------------------------------
def _edit(bundle_dir: Path, change) -> None:  # noqa: ANN001
    metadata = json.loads((bundle_dir / "model.json").read_text())
    change(metadata)
    (bundle_dir / "model.json").write_text(json.dumps(metadata))


def _set(path: str, value: object):  # noqa: ANN202
    def change(metadata: dict) -> None:
        *parents, last = path.split(".")
        target = metadata
        for key in parents:
            target = target[key]
        target[last] = value
    return change


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("grid.spacing", [5.0, 0.0, 5.0], "grid.spacing is [5.0, 0.0, 5.0], expected three finite spacings"),
    ("grid.size", [32, 40, 100000], "grid.size is [32, 40, 100000], expected a list of 3 integers from 8 to 512"),
    ("normalization.adc_scale", 0, "normalization.adc_scale is 0, expected a finite number in [1, 1e+07]"),
    ("normalization.adc_clip", -1.0, "normalization.adc_clip is -1.0"),
    ("architecture.config.widths", [4, 8, 40000], "architecture.config.widths is [4, 8, 40000], expected a list of "
                                                  "2 to 6 integers from 1 to 1024"),
    ("architecture.config.widths", [4, -8, 8], "architecture.config.widths is [4, -8, 8]"),
    ("architecture.config.heads", 0, "architecture.config.heads is 0, expected an integer from 1 to 64"),
    ("architecture.config.mc_dropout", 1.5, "architecture.config.mc_dropout is 1.5"),
    ("architecture.config.stem_pool", "yes", 'architecture.config.stem_pool is "yes", expected true or false'),
    ("architecture.config.in_channels", 4, "architecture.config.in_channels is 4, expected 3"),
    ("format_version", "one", 'format_version is "one", expected an integer from 1 to 1'),
    ("task", "segmentation", 'task is "segmentation", expected one of acute, outcome'),
    ("weights.sha256", "abc", 'weights.sha256 is "abc", expected 64 lower-case hexadecimal digits'),
    ("weights.file", "../../etc/passwd.safetensors", "weights.file"),
    ("weights.bytes", -5, "weights.bytes is -5"),
])
def test_model_json_fields_are_type_and_range_checked(bundle_dir: Path, field: str, value: object,
                                                      expected: str) -> None:
    _edit(bundle_dir, _set(field, value))
    with pytest.raises(BundleError) as error:
        load_bundle(bundle_dir)
    assert expected in str(error.value) and "model.json" in str(error.value)


def test_nan_anywhere_in_model_json_is_refused(bundle_dir: Path) -> None:
    text = (bundle_dir / "model.json").read_text()
    metadata = json.loads(text)
    metadata["grid"]["spacing"] = [5.0, float("nan"), 5.0]  # json.dumps writes NaN, which json.loads accepted
    (bundle_dir / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match="NaN is not a valid number"):
        load_bundle(bundle_dir)


def test_huge_widths_are_refused_before_any_allocation(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import StrokePredictorLib.bundle as module

    built: list = []
    monkeypatch.setattr(module, "StrokeNet", lambda *a, **k: built.append(a) or (_ for _ in ()).throw(MemoryError))
    _edit(bundle_dir, _set("architecture.config.widths", [4, 8, 40000]))  # the tiny network has 3 stages
    with pytest.raises(BundleError, match="widths"):
        load_bundle(bundle_dir)
    assert built == []


def test_parameter_count_is_checked_against_the_header_before_building(bundle_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import StrokePredictorLib.bundle as module

    real = module.StrokeNet
    devices: list[str] = []

    def spy(config: NetworkConfig) -> StrokeNet:
        model = real(config)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(module, "StrokeNet", spy)
    _edit(bundle_dir, _set("architecture.config.head_channels", 12))
    with pytest.raises(BundleError, match=r"do not fit the architecture .*another shape"):
        load_bundle(bundle_dir)
    assert devices == ["meta"]  # only the memory-free skeleton was built


def test_weights_must_be_a_regular_file_of_the_declared_size(bundle_dir: Path, tmp_path: Path) -> None:
    import os

    weights = bundle_dir / "weights.safetensors"
    payload = weights.read_bytes()
    weights.write_bytes(payload + b"\0" * 16)
    with pytest.raises(BundleError, match=f"has {len(payload) + 16} bytes where model.json declares {len(payload)}"):
        load_bundle(bundle_dir)
    weights.unlink()
    os.mkfifo(weights)  # reading a FIFO used to hang
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(bundle_dir)
    weights.unlink()
    weights.symlink_to("/dev/zero")  # read until MemoryError before
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(bundle_dir)


def test_overwrite_replaces_only_a_bundle_and_only_its_files(tmp_path: Path) -> None:
    import os

    model = StrokeNet(tiny_config())
    kwargs = dict(task="acute", grid=TINY_GRID, normalization=Normalization(), data={}, metrics={})
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "main.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not a folder written by StrokePredictor"):
        save_bundle(thesis, model, overwrite=True, **kwargs)
    assert (thesis / "main.tex").read_text() == "years of work" and (thesis / "chapters").is_dir()
    assert sorted(p.name for p in thesis.iterdir()) == ["chapters", "main.tex"]
    old = os.umask(0o022)
    try:
        bundle = save_bundle(tmp_path / "new" / "bundle", model, **kwargs)
    finally:
        os.umask(old)
    assert bundle.stat().st_mode & 0o777 == 0o755 and (bundle / "model.json").stat().st_mode & 0o777 == 0o644
    (bundle / "README.md").write_text("model card")
    first = (bundle / "weights.safetensors").read_bytes()
    with torch.no_grad():
        model.head.bias.fill_(1.0)
    save_bundle(bundle, model, overwrite=True, **kwargs)
    assert (bundle / "README.md").read_text() == "model card"
    assert (bundle / "weights.safetensors").read_bytes() != first
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "model.json", "weights.safetensors"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["bundle"]
    assert load_bundle(bundle).model.head.bias.eq(1.0).all()


def test_shipped_bundles_pass_the_schema(repo_root: Path) -> None:
    for task in ("acute", "outcome"):
        bundle = load_bundle(repo_root / "StrokePredictor" / "Resources" / "Models" / task)
        counted = sum(p.numel() for p in bundle.model.parameters())
        assert bundle.task == task and bundle.metadata["architecture"]["parameters"] == counted
        if task == "acute":  # the plain lite network; the outcome one adds the small growth head
            assert counted == 3649370


def test_a_killed_export_leaves_nothing_the_next_one_does_not_remove(tmp_path: Path) -> None:
    import platform
    import re
    import subprocess
    import sys

    from StrokePredictorLib.io import PARTIAL_PREFIX

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = re.sub(r"[^A-Za-z0-9_.]", "_", platform.node() or "host")[:40]
    stale = tmp_path / f"{PARTIAL_PREFIX}{host}-{dead.pid}-k1"  # what SIGKILL during save_bundle leaves
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"half")
    save_bundle(tmp_path / "bundle", StrokeNet(tiny_config()), task="acute", grid=TINY_GRID,
                normalization=Normalization(), data={}, metrics={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_film_bundles_round_trip_and_the_field_is_checked(tmp_path: Path, bundle_dir: Path) -> None:
    """``film`` is a bundle field like any other; bundles without it load unchanged."""
    torch.manual_seed(4)
    model = StrokeNet(tiny_config(film=True))
    with torch.no_grad():
        for module in model.film:
            module.linear.weight.normal_(0.0, 0.1)
    path = save_bundle(tmp_path / "film", model, task="outcome", grid=TINY_GRID, name="tiny-film",
                       normalization=Normalization(), data={"source": "test"}, metrics={})
    loaded = load_bundle(path)
    assert loaded.config.film is True
    assert json.loads((path / "model.json").read_text())["architecture"]["config"]["film"] is True
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    _edit(path, _set("architecture.config.film", "yes"))
    with pytest.raises(BundleError, match='architecture.config.film is "yes", expected true or false'):
        load_bundle(path)
    # switches that exclude each other: each combination (applied in turn to the same bundle) is named
    for edits, message in (
            ({"imaging_only": True, "film": True}, "film is true, expected false when imaging_only"),
            ({"film": False, "clinical_blind": True}, "clinical_blind is true, expected false when imaging_only"),
            ({"imaging_only": False, "growth_volume": True}, "growth_volume is true, expected false unless growth"),
            ({"growth_volume": False, "growth_tissue_adc_max": 1.5},
             "growth_tissue_adc_max is 1.5, expected 0 unless growth_volume"),
            ({"growth_tissue_adc_max": 0.0, "growth_seed_probability": 0.3},
             "growth_seed_probability is 0.3, expected 0.5 unless growth_volume"),
            ({"growth_seed_probability": 0.5, "growth_alone": True},
             "growth_alone is true, expected false unless growth_volume"),
            ({"growth_alone": 1}, "growth_alone is 1, expected true or false")):
        for key, value in edits.items():
            _edit(bundle_dir, _set(f"architecture.config.{key}", value))
        with pytest.raises(BundleError, match=f"architecture.config.{message}"):
            load_bundle(bundle_dir)


def test_the_growth_seed_block_round_trips_and_only_growth_by_volume_takes_one(tmp_path: Path) -> None:
    from StrokePredictorLib.postprocess import PostProcessing

    block = PostProcessing(threshold=0.3, flip_tta=True, min_component_ml=0.5, max_component_adc=0.85,
                           min_component_probability=0.6, selected_on="the acute bundle's block")
    torch.manual_seed(5)
    path = save_bundle(tmp_path / "grow", StrokeNet(tiny_config(growth=True, growth_volume=True)), task="outcome",
                       grid=TINY_GRID, normalization=Normalization(), data={}, metrics={}, growth_seed=block)
    assert load_bundle(path).growth_seed == block
    plain = write_tiny_bundle(tmp_path / "plain")
    assert load_bundle(plain).growth_seed is None
    _edit(path, _set("growth_seed", {**block.to_dict(), "threshold": 1.5}))
    with pytest.raises(BundleError, match="invalid growth_seed block .*threshold must lie strictly between 0 and 1"):
        load_bundle(path)
    _edit(path, _set("growth_seed", "0.3"))
    with pytest.raises(BundleError, match='growth_seed is "0.3", expected an object'):
        load_bundle(path)
    _edit(plain, _set("growth_seed", block.to_dict()))
    with pytest.raises(BundleError, match="growth_seed .*expected absent unless architecture.config.growth_volume"):
        load_bundle(plain)
    with pytest.raises(BundleError, match="growth_volume"):  # refused before anything is written
        save_bundle(tmp_path / "refused", StrokeNet(tiny_config()), task="acute", grid=TINY_GRID,
                    normalization=Normalization(), data={}, metrics={}, growth_seed=block)
    assert not (tmp_path / "refused").exists()
