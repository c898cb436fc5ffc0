"""Predictor: outputs on the DWI grid, Monte-Carlo sampling, seeds, deterministic mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from inference_phantom import write_case, write_tiny_bundle
from scipy import ndimage

from StrokePredictorLib.bundle import load_bundle
from StrokePredictorLib.clinical import FEATURE_NAMES, ClinicalRecord, validate
from StrokePredictorLib.errors import StrokePredictorError
from StrokePredictorLib.inference import Predictor, binary_entropy_bits
from StrokePredictorLib.io import read_volume


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("inference")
    paths = write_case(root / "case", flair=False)
    bundle = load_bundle(write_tiny_bundle(root / "bundle", seed=1))
    return {
        "bundle": bundle,
        "dwi": read_volume(paths["dwi"], role="DWI"),
        "adc": read_volume(paths["adc"], role="ADC"),
    }


CLINICAL = validate({"age": 64, "sex": "M", "nihss": 9, "onset_to_imaging_h": 3.5, "treatment": "none"})


def _predict(case: dict, **kwargs: object):
    predictor = Predictor(case["bundle"], device="cpu", **kwargs)
    return predictor.predict(case["dwi"], case["adc"], None, CLINICAL)


def test_prediction_on_dwi_grid(case: dict) -> None:
    result = _predict(case, mc_samples=12, seed=0)
    shape = case["dwi"].array.shape
    assert result.geometry.same_grid(case["dwi"].geometry)
    for array in (result.probability, result.entropy, result.std, result.mask, result.spatial_attention):
        assert array.shape == shape
    for array in (result.probability, result.entropy, result.std, result.spatial_attention):
        assert array.dtype == np.float32 and float(array.min()) >= 0.0
    assert float(result.probability.max()) <= 1.0 and float(result.spatial_attention.max()) <= 1.0
    assert result.mask.dtype == np.uint8
    np.testing.assert_array_equal(result.mask, (result.probability >= 0.5).astype(np.uint8))
    np.testing.assert_allclose(result.entropy, binary_entropy_bits(result.probability), atol=1e-6)
    assert result.mask.any() and result.n_components >= 1
    assert result.volume_ml["mask"] == pytest.approx(result.mask.sum() * case["dwi"].geometry.voxel_volume_ml)
    assert result.samples_volume_ml.shape == (12,)
    lo, hi = result.volume_ml["ci95"]
    assert lo <= result.volume_ml["median"] <= hi
    assert list(result.feature_attention) == list(FEATURE_NAMES)
    assert sum(result.feature_attention.values()) == pytest.approx(1.0, abs=1e-9)
    near_head = ndimage.binary_dilation(case["dwi"].array > 0, iterations=3)
    assert result.probability[~near_head].max() == 0.0  # nothing outside the brain mask
    assert {"network_s", "sampling_s", "resample_s", "total_s"} <= set(result.timings)


def test_mc_samples_differ_and_are_reproducible(case: dict) -> None:
    first = _predict(case, mc_samples=10, seed=5)
    again = _predict(case, mc_samples=10, seed=5)
    other = _predict(case, mc_samples=10, seed=6)
    np.testing.assert_array_equal(first.probability, again.probability)
    np.testing.assert_array_equal(first.samples_volume_ml, again.samples_volume_ml)
    assert float(first.std.max()) > 0.01
    assert len(np.unique(first.samples_volume_ml)) > 1
    assert not np.array_equal(first.probability, other.probability)


def test_deterministic_mode_has_zero_spread(case: dict) -> None:
    result = _predict(case, mc_samples=8, deterministic=True)
    assert float(np.abs(result.std).max()) == 0.0
    assert np.all(result.samples_volume_ml == result.samples_volume_ml[0])
    assert result.volume_ml["ci95"][0] == result.volume_ml["ci95"][1] == result.volume_ml["median"]


def test_attention_follows_clinical_values(case: dict) -> None:
    predictor = Predictor(case["bundle"], device="cpu", mc_samples=2)
    first = predictor.predict(case["dwi"], case["adc"], None, CLINICAL)
    changed = validate({**CLINICAL.to_dict(), "nihss": 30})
    second = predictor.predict(case["dwi"], case["adc"], None, changed)
    assert first.feature_attention["nihss"] != second.feature_attention["nihss"]
    assert second.clinical["nihss"] == 30.0


def test_bad_settings(case: dict, tmp_path: Path) -> None:
    with pytest.raises(StrokePredictorError, match="between 1 and 200, got 0"):
        Predictor(case["bundle"], device="cpu", mc_samples=0)
    with pytest.raises(StrokePredictorError, match="between 1 and 200, got 1000"):  # 1000 samples took 5.7 GB
        Predictor(case["bundle"], device="cpu", mc_samples=1000)
    with pytest.raises(StrokePredictorError, match=r"seed must lie between 0 and 2\*\*63 - 1"):
        Predictor(case["bundle"], device="cpu", seed=2**64)
    with pytest.raises(StrokePredictorError, match="threshold"):
        Predictor(case["bundle"], device="cpu", threshold=1.5)
    with pytest.raises(StrokePredictorError, match="Unknown device"):
        Predictor(case["bundle"], device="gpu0")


def test_the_capped_volume_interval_is_flagged_once() -> None:
    """The interval is capped at the brain's volume; the warning says so only when the cap acted."""
    from StrokePredictorLib.inference import output_warnings
    from StrokePredictorLib.postprocess import volume_interval

    brain = 1300.0
    capped = {"mask": 285.0, "mc_ci95": [260.0, 310.0],
              "ci95": volume_interval(285.0, (260.0, 310.0), np.log(65.0), brain)}
    assert capped["ci95"][1] == brain
    assert [w for w in output_warnings(capped, brain) if "capped" in w]
    narrow = {"mask": 20.0, "mc_ci95": [15.0, 25.0], "ci95": volume_interval(20.0, (15.0, 25.0), np.log(3.0), brain)}
    assert output_warnings(narrow, brain) == []
    everything = {"mask": 1310.0, "mc_ci95": [1305.0, 1312.0],  # a lesion over the whole brain mask
                  "ci95": volume_interval(1310.0, (1305.0, 1312.0), np.log(3.0), brain)}
    warnings = output_warnings(everything, brain)
    assert len(warnings) == 1 and warnings[0].startswith("The lesion (")


def _seeded_bundle(directory: Path, block) -> Path:
    """A tiny growth-by-volume outcome bundle whose growth seeds from ``block`` (its growth_seed)."""
    import torch
    from inference_phantom import TINY_GRID, tiny_config

    from StrokePredictorLib.bundle import save_bundle
    from StrokePredictorLib.network import StrokeNet
    from StrokePredictorLib.postprocess import PostProcessing
    from StrokePredictorLib.preprocess import Normalization

    torch.manual_seed(3)
    model = StrokeNet(tiny_config(growth=True, growth_volume=True))
    with torch.no_grad():
        model.head.bias.fill_(0.0)
    return save_bundle(directory, model, task="outcome", grid=TINY_GRID, normalization=Normalization(), data={},
                       metrics={}, postprocessing=PostProcessing(threshold=0.5, flip_tta=True), growth_seed=block)


def test_an_outcome_network_grows_from_the_core_its_seed_block_reports(case: dict, tmp_path: Path) -> None:
    import torch

    from StrokePredictorLib.postprocess import PostProcessing
    from StrokePredictorLib.preprocess import preprocess
    from StrokePredictorLib.whatif import WhatIf

    block = PostProcessing(threshold=0.52, flip_tta=True, min_component_ml=0.5)
    bundle = load_bundle(_seeded_bundle(tmp_path / "seeded", block))
    assert bundle.growth_seed == block
    predictor = Predictor(bundle, device="cpu", mc_samples=1, deterministic=True)
    prepared = preprocess(case["dwi"], case["adc"], None, grid=bundle.grid, normalization=bundle.normalization)
    encoded = predictor.encode(prepared)
    out, mirrored = predictor._decode(encoded, CLINICAL)
    model = bundle.model
    with torch.no_grad():  # the core the block reports, computed here from the 1x1x1 head directly
        core = torch.sigmoid(model.head(out["features"][:, :-1]))[0, 0]
        core = 0.5 * (core + torch.sigmoid(model.head(mirrored["features"][:, :-1]))[0, 0].flip(-1))
    core = core.numpy() * prepared.brain
    voxel_ml = float(np.prod(prepared.mapping.model.spacing)) / 1000.0
    seed = block.apply(core, voxel_ml) & encoded.features.tissue[0].numpy()
    assert seed.any() and not seed.all()
    grown = out["features"][0, -1].numpy() > 0
    assert grown[seed].all() and grown.sum() > seed.sum()  # the reported core, grown
    mirrored_grown = mirrored["features"][0, -1].flip(-1).numpy() > 0
    np.testing.assert_array_equal(mirrored_grown, grown)  # one grown map for both views
    # a block whose component rules leave nothing: the most likely core grows (its threshold, no rules), said so
    fallback = Predictor(_seeded_bundle(tmp_path / "fallback", block.replace(min_component_ml=1e5)), device="cpu",
                         mc_samples=1, deterministic=True)
    encoded_fallback = fallback.encode(prepared)
    likely, _ = fallback._decode(encoded_fallback, CLINICAL)
    raw = (core >= block.threshold) & encoded.features.tissue[0].numpy()
    assert raw.sum() > seed.sum()  # more than the block's core: the small components are back
    grown_fallback = likely["features"][0, -1].numpy() > 0
    assert grown_fallback[raw].all() and grown_fallback.sum() > raw.sum()
    warned = fallback.predict_encoded(encoded_fallback, CLINICAL, effects=False).warnings
    assert any("reports no lesion at its operating point (probability >= 0.52" in w and "most likely core" in w
               for w in warned), warned
    # a block whose threshold nothing reaches grows nothing, and says so
    empty = Predictor(_seeded_bundle(tmp_path / "empty", block.replace(threshold=0.999)), device="cpu",
                      mc_samples=1, deterministic=True)
    encoded_empty = empty.encode(prepared)
    quiet, _ = empty._decode(encoded_empty, CLINICAL)
    assert float(quiet["features"][0, -1].max()) <= -2.0
    warned = empty.predict_encoded(encoded_empty, CLINICAL, effects=False).warnings
    assert any("sees no core (no voxel at probability >= 0.999" in w for w in warned), warned
    assert not any("core" in w for w in Predictor(bundle, device="cpu", mc_samples=1, deterministic=True)
                   .predict_preprocessed(prepared, CLINICAL).warnings)  # a reported core: no warning
    # a what-if change of onset time alone keeps the decoder's output and the seed: the same as a full pass
    session = WhatIf(Predictor(bundle, device="cpu", mc_samples=4, seed=2), prepared, CLINICAL)
    later = session.update({"onset_to_imaging_h": 12.0})
    full = Predictor(bundle, device="cpu", mc_samples=4, seed=2).predict_preprocessed(
        prepared, ClinicalRecord({**CLINICAL.values, "onset_to_imaging_h": 12.0}))
    np.testing.assert_allclose(later.probability, full.probability, atol=1e-6)
    assert later.volume_ml["mask"] == full.volume_ml["mask"]
    assert full.growth_seed == block.to_dict()  # summary.json records which core grew
