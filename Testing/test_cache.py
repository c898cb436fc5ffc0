"""Training/data/cache.py: the preprocessed training cache and the deterministic split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from training_fixtures import TEST_GRID_SIZE, build_test_cache, write_isles_phantom

from StrokePredictorLib import clinical
from StrokePredictorLib.io import read_volume
from Training.data.cache import extend_split, make_split, preset_grid


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("phantom")
    data = write_isles_phantom(root / "data", n_cases=4, seed=1)
    cache = build_test_cache(data, root / "cache")
    return data, cache


def test_cache_layout_dtypes_and_targets(phantom: tuple[Path, Path]) -> None:
    data, cache = phantom
    index = json.loads((cache / "index.json").read_text())
    assert index["grid"] == {"size": list(TEST_GRID_SIZE), "spacing": [7.0, 7.0, 7.0]}
    assert index["n_cases"] == 4 and index["tasks"] == {"acute": 4, "outcome": 4}
    assert index["dataset"]["name"] == "test phantom"
    shape = TEST_GRID_SIZE[::-1]
    for meta in index["cases"]:
        folder = cache / "cases" / meta["case_id"]
        image = np.load(folder / "image.npy", mmap_mode="r")
        assert image.dtype == np.float16 and image.shape == (3, *shape)
        brain = np.load(folder / "brain.npy")
        assert brain.dtype == bool and brain.shape == shape
        acute, outcome = np.load(folder / "acute.npy"), np.load(folder / "outcome.npy")
        assert acute.dtype == np.uint8 and set(np.unique(acute)) <= {0, 1}
        # the outcome mask is the acute lesion grown by 30% in radius: larger, and containing most of it
        assert outcome.sum() > acute.sum() > 0
        assert (acute & outcome).sum() >= 0.9 * acute.sum()
        # lesion volume is preserved by the mapping to the model grid (7 mm voxels: coarse)
        source = read_volume(meta["targets"]["acute"]["file"])
        source_ml = float((source.array > 0.5).sum()) * source.geometry.voxel_volume_ml
        assert meta["targets"]["acute"]["volume_ml"] == pytest.approx(source_ml, rel=0.45)
        # the DWI is bright in the lesion, the ADC low (normalised: ~0.8 in the brain)
        lesion = acute.astype(bool)
        assert float(image[0][lesion].mean()) > 1.3 * float(image[0][brain & ~lesion].mean())
        assert float(image[1][brain & ~lesion].mean()) == pytest.approx(0.8, abs=0.1)
        assert float(np.abs(image[:, ~brain]).max()) == 0.0
        flair_file = meta["sources"]["flair"]
        assert meta["flair_present"] == (flair_file is not None)
        if not meta["flair_present"]:
            assert float(np.abs(image[2]).max()) == 0.0


def test_clinical_values_come_from_the_csv(phantom: tuple[Path, Path]) -> None:
    _, cache = phantom
    index = json.loads((cache / "index.json").read_text())
    meta = next(m for m in index["cases"] if m["case_id"] == "sub-strokecase0003")
    values, missing = clinical.encode(clinical.validate({"age": 63, "sex": "F"}))
    assert meta["clinical"]["age"] == 63.0 and meta["clinical"]["sex"] == "F"
    assert np.allclose(meta["clinical_values"][:2], values[:2])
    assert meta["clinical_missing"][:2] == [False, False]
    assert meta["clinical_missing"][4:] == [True] * 6  # not in the CSV


def test_missing_csv_means_missing_features(tmp_path: Path) -> None:
    data = write_isles_phantom(tmp_path / "data", n_cases=1, clinical_csv=False, outcome=False, flair_every=0)
    cache = build_test_cache(data, tmp_path / "cache")
    index = json.loads((cache / "index.json").read_text())
    assert index["clinical_csv"] is None and index["tasks"] == {"acute": 1, "outcome": 0}
    assert index["cases"][0]["clinical_missing"] == [True] * 10
    assert not (cache / "cases" / "sub-strokecase0001" / "outcome.npy").exists()


def test_rerun_reuses_cases_and_split(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    data, cache = phantom
    image = cache / "cases" / "sub-strokecase0001" / "image.npy"
    before = image.stat().st_mtime_ns
    split = json.loads((cache / "split.json").read_text())
    # a hand-edited split is kept: move one training case to test
    moved = split["train"][0]
    split["train"].remove(moved)
    split["test"].append(moved)
    (cache / "split.json").write_text(json.dumps(split))
    build_test_cache(data, cache)
    assert image.stat().st_mtime_ns == before
    again = json.loads((cache / "split.json").read_text())
    assert moved in again["test"] and moved not in again["train"]


def test_split_is_deterministic_70_15_15_and_order_free() -> None:
    ids = [f"sub-strokecase{i:04d}" for i in range(1, 101)]
    split = make_split(ids, seed=0)
    assert [len(split[s]) for s in ("train", "val", "test")] == [70, 15, 15]
    assert make_split(list(reversed(ids)), seed=0) == split
    assert make_split(ids, seed=1) != split
    assert sorted(split["train"] + split["val"] + split["test"]) == ids
    small = make_split(ids[:3])
    assert [len(small[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    extended = extend_split(split, ids + ["sub-strokecase0101"])
    assert sum(len(v) for v in extended.values()) == 101
    assert all(set(split[s]) <= set(extended[s]) for s in split)


def test_preset_grids_fit_the_network() -> None:
    from StrokePredictorLib.network import NetworkConfig

    for preset in ("lite", "base"):
        grid = preset_grid(preset)
        divisor = getattr(NetworkConfig, preset)().size_divisor
        assert all(s % divisor == 0 for s in grid.size)
    assert preset_grid("lite").size == (96, 112, 80)


def test_cli_writes_config_and_refuses_other_grid(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    from StrokePredictorLib.errors import OutputExistsError
    from Training.data.cache import main

    data, cache = phantom
    saved = json.loads((cache / "preprocess_config.json").read_text())
    assert saved["grid_size"] == list(TEST_GRID_SIZE)
    with pytest.raises(OutputExistsError, match="was made for grid"):
        main(["--data", str(data), "--out", str(cache), "--grid-size", "16,16,16", "--no-progress"])


def test_an_error_leaves_no_empty_cache_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from Training.__main__ import main

    data = write_isles_phantom(tmp_path / "data", n_cases=2, seed=3)
    out = tmp_path / "cache" / "isles22"
    common = ["preprocess", "--data", str(data), "--out", str(out), "--grid-size", "24,28,20",
              "--grid-spacing", "7,7,7", "--no-progress"]
    assert main([*common, "--clinical-csv", str(tmp_path / "missing.csv")]) == 2
    assert "error: Clinical CSV" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # nor its parent that the run would have made
    for dwi in data.glob("sub-*/ses-*/dwi/*_dwi.nii.gz"):  # every case broken: nothing finishes
        dwi.write_bytes(b"not a NIfTI file")
    assert main(common) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "cache").exists()
    # a cache folder that was there before is kept, without the files this run would have added
    out.mkdir(parents=True)
    assert main(common) == 2
    assert out.is_dir() and not any(out.iterdir())
