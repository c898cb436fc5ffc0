"""Post-processing: the bundle's block, component removal, flip averaging in the Predictor, and the
``python -m Training postprocess`` search that writes the block."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from inference_phantom import TINY_GRID, write_case, write_tiny_bundle

from StrokePredictorLib.bundle import load_bundle
from StrokePredictorLib.errors import BundleError
from StrokePredictorLib.inference import Predictor
from StrokePredictorLib.io import Geometry, read_volume
from StrokePredictorLib.postprocess import (
    DEFAULT,
    PostProcessing,
    conformal_log_margin,
    count_components,
    filter_components,
    label_components,
    remove_small_components,
    volume_interval,
)
from StrokePredictorLib.preprocess import GridMapping, PreprocessedCase
from Training.evaluation.postprocess import score_case, write_into_bundle


def test_postprocessing_block_validates() -> None:
    assert PostProcessing.from_dict(None) == DEFAULT == PostProcessing.from_dict({})
    post = PostProcessing.from_dict({"threshold": 0.4, "flip_tta": True, "min_component_ml": 0.3})
    assert post.replace(threshold=None, min_component_ml=0.0) == PostProcessing(0.4, True, 0.0)
    assert "x/÷" in PostProcessing(volume_log_margin=0.7).describe()
    assert "median ADC >= 0.8" in PostProcessing(max_component_adc=0.8).describe()
    assert "ADC" not in post.describe()
    assert "0.4" in post.describe() and "flip" in post.describe() and "0.3 mL" in post.describe()
    for bad, field in (({"threshold": 1.0}, "threshold"), ({"threshold": "0.5"}, "threshold"),
                       ({"min_component_ml": -1}, "min_component_ml"), ({"flip_tta": "yes"}, "flip_tta"),
                       ({"volume_log_margin": -0.1}, "volume_log_margin"), ({"gate": 1}, "unknown"),
                       ({"max_component_adc": -0.5}, "max_component_adc"),
                       ({"max_component_adc": float("nan")}, "max_component_adc")):
        with pytest.raises(ValueError, match=field):
            PostProcessing.from_dict(bad)


def test_conformal_volume_interval() -> None:
    rng = np.random.default_rng(0)
    predicted = rng.uniform(0, 80, 400)
    true = (predicted + 1) * np.exp(rng.normal(0, 0.5, 400)) - 1  # log-normal error, sd 0.5
    margin = conformal_log_margin(true[:200], predicted[:200])
    assert 0.5 * 1.96 * 0.8 < margin < 0.5 * 1.96 * 1.25  # about the normal 95% quantile of |error|
    intervals = [volume_interval(v, (v, v), margin) for v in predicted[200:]]
    covered = np.mean([lo <= t <= hi for t, (lo, hi) in zip(true[200:], intervals, strict=True)])
    assert 0.9 <= covered <= 0.99  # held-out coverage near 95%
    assert volume_interval(10.0, (8.0, 12.0), 0.0) == [8.0, 12.0]  # no margin: the Monte-Carlo interval
    low, high = volume_interval(0.0, (0.0, 0.0), np.log(3.0))
    assert low == 0.0 and high == pytest.approx(2.0)  # an empty prediction still admits a small lesion
    assert volume_interval(10.0, (1.0, 50.0), 0.1) == [1.0, 50.0]  # never narrower than Monte Carlo
    assert conformal_log_margin(np.array([0.0, 3.0]), np.array([0.0, 0.0])) == pytest.approx(np.log(4.0))


def test_the_volume_interval_stops_at_the_brain() -> None:
    """A wide margin (the outcome model's factor of about 65) would report litres; the brain caps it."""
    margin = np.log(65.0)
    low, high = volume_interval(285.0, (260.0, 310.0), margin)
    assert high > 18000.0  # uncapped: 18.6 litres
    capped_low, capped_high = volume_interval(285.0, (260.0, 310.0), margin, brain_ml=1300.0)
    assert capped_high == 1300.0 and capped_low == pytest.approx(low)
    assert volume_interval(20.0, (15.0, 25.0), np.log(3.0), brain_ml=1300.0) == volume_interval(
        20.0, (15.0, 25.0), np.log(3.0))  # far from the brain's volume: unchanged
    low, high = volume_interval(900.0, (800.0, 880.0), np.log(3.0), brain_ml=850.0)
    assert high == 900.0 and low == pytest.approx(901.0 / 3.0 - 1.0)  # never below the mask
    assert volume_interval(20.0, (10.0, 900.0), 0.0, brain_ml=850.0) == [10.0, 900.0]  # nor below Monte Carlo


def test_small_components_are_removed_with_26_connectivity() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels = 0.8 mL at 0.1 mL per voxel
    mask[6, 6, 6] = mask[7, 7, 7] = True  # diagonal neighbours: one component of 2 voxels = 0.2 mL
    mask[9, 0, 9] = True  # 0.1 mL
    assert count_components(mask) == 3
    kept = remove_small_components(mask, 0.2, 0.1)
    assert count_components(kept) == 2 and kept.sum() == 10
    kept = remove_small_components(mask, 0.3, 0.1)
    assert count_components(kept) == 1 and kept.sum() == 8
    assert remove_small_components(mask, 0.0, 0.1).sum() == mask.sum()


def test_adc_gate_removes_components_without_restricted_diffusion() -> None:
    mask = np.zeros((10, 10, 10), bool)
    adc = np.full(mask.shape, 0.85, np.float32)  # normal grey matter, 10^-3 mm^2/s
    mask[1:3, 1:3, 1:3] = True  # infarct: restricted diffusion
    adc[1:3, 1:3, 1:3] = 0.5
    mask[6:8, 6:8, 6:8] = True  # shine-through: bright DWI, normal ADC in 5 of its 8 voxels
    adc[6, 6, 6:8] = 0.4
    adc[7, 6, 6] = 0.4
    kept = filter_components(mask, 0.1, 0.0, adc, 0.8)
    assert kept[1:3, 1:3, 1:3].all() and kept.sum() == 8  # the median decides, not a few low voxels
    adc[7, 7, 7] = adc[7, 6, 7] = 0.4  # now 5 of 8 restricted: median 0.4 -> kept
    assert filter_components(mask, 0.1, 0.0, adc, 0.8).sum() == 16
    assert filter_components(mask, 0.1, 0.0, adc, 0.3).sum() == 0  # a gate below every median clears all
    assert filter_components(mask, 0.1, 0.0, None, 0.0).sum() == 16  # no gate: no ADC needed
    assert filter_components(mask, 0.1, 0.9, adc, 0.8).sum() == 0  # size and ADC criteria combine
    with pytest.raises(ValueError, match="ADC"):
        filter_components(mask, 0.1, 0.0, None, 0.8)


def test_kept_voxels_counts_what_apply_keeps_under_every_rule() -> None:
    rng = np.random.default_rng(5)
    probability = (rng.random((14, 12, 10)) ** 6).astype(np.float32)  # sparse: many components
    adc = rng.uniform(0.4, 1.2, probability.shape).astype(np.float32)
    rules = [PostProcessing(threshold=0.4), PostProcessing(threshold=0.4, min_component_ml=0.003),
             PostProcessing(threshold=0.3, max_component_adc=0.8),
             PostProcessing(threshold=0.3, min_component_probability=0.6, small_component_ml=0.003,
                            small_component_adc=0.8)]
    counts = []
    for post in rules:
        mask = probability >= post.threshold
        counts.append(post.kept_voxels(mask, probability, 0.001, adc))
        assert counts[-1] == int(post.apply(probability, 0.001, adc).sum())
        counted, n = post.apply_counted(probability, 0.001, adc)
        np.testing.assert_array_equal(counted, post.apply(probability, 0.001, adc))
        assert n == count_components(counted) and n > 1
        assert post.kept_voxels(np.zeros_like(mask), probability, 0.001, adc) == 0
    assert counts[1] < counts[0] and 0 < counts[3]  # the rules removed something
    with pytest.raises(ValueError, match="mean-probability"):
        rules[3].kept_voxels(probability >= 0.3, None, 0.001, adc)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("post")
    paths = write_case(root / "case", flair=False)
    return {"root": root, "bundle_dir": write_tiny_bundle(root / "bundle", seed=1),
            "dwi": read_volume(paths["dwi"], role="DWI"), "adc": read_volume(paths["adc"], role="ADC")}


def test_bundle_carries_postprocessing_and_refuses_a_bad_block(tiny: dict, tmp_path: Path) -> None:
    assert load_bundle(tiny["bundle_dir"]).postprocessing == DEFAULT
    copy = tmp_path / "bundle"
    copy.mkdir()
    for name in ("model.json", "weights.safetensors"):
        (copy / name).write_bytes((tiny["bundle_dir"] / name).read_bytes())
    post = PostProcessing(0.35, True, 0.25, 0.9, 0.5, "test")
    write_into_bundle(copy, post)
    assert load_bundle(copy).postprocessing == post
    assert [p.name for p in copy.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    metadata = json.loads((copy / "model.json").read_text())
    metadata["postprocessing"]["threshold"] = 2
    (copy / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match="model.json.*threshold"):
        load_bundle(copy)


def test_predictor_uses_the_bundles_postprocessing(tiny: dict, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    copy.mkdir()
    for name in ("model.json", "weights.safetensors"):
        (copy / name).write_bytes((tiny["bundle_dir"] / name).read_bytes())
    plain = Predictor(tiny["bundle_dir"], device="cpu", mc_samples=6).predict(tiny["dwi"], tiny["adc"])
    assert plain.mask.any() and plain.postprocessing == DEFAULT.to_dict()
    huge = max(plain.volume_ml["mask"], float(plain.samples_volume_ml.max())) + 1.0  # above any lesion: all goes
    write_into_bundle(copy, PostProcessing(0.5, False, huge))
    cleared = Predictor(copy, device="cpu", mc_samples=6).predict(tiny["dwi"], tiny["adc"])
    np.testing.assert_array_equal(cleared.probability, plain.probability)  # only the mask changes
    assert not cleared.mask.any() and cleared.n_components == 0
    assert cleared.volume_ml["mask"] == 0 and np.all(cleared.samples_volume_ml == 0)
    override = Predictor(copy, device="cpu", mc_samples=6, min_component_ml=0.0).predict(tiny["dwi"], tiny["adc"])
    np.testing.assert_array_equal(override.mask, plain.mask)
    from StrokePredictorLib.errors import StrokePredictorError

    for bad in ({"min_component_ml": float("inf")}, {"min_component_ml": -1.0}, {"threshold": 1.0},
                {"max_component_adc": -1.0}):
        with pytest.raises(StrokePredictorError):
            Predictor(copy, device="cpu", **bad)
    lower = Predictor(copy, device="cpu", mc_samples=6, threshold=0.3, min_component_ml=0.0)
    assert lower.threshold == 0.3
    assert lower.predict(tiny["dwi"], tiny["adc"]).mask.sum() >= plain.mask.sum()


def test_predictor_adc_gate_removes_whole_components_by_their_adc(tiny: dict) -> None:
    plain = Predictor(tiny["bundle_dir"], device="cpu", mc_samples=6).predict(tiny["dwi"], tiny["adc"])
    labels, sizes = label_components(plain.mask, plain.geometry.voxel_volume_ml)
    adc = tiny["adc"].array  # the phantom's ADC is in 10^-3 mm^2/s on the DWI grid
    medians = np.array([np.median(adc[labels == n]) for n in range(1, sizes.size + 1)])
    assert medians.size >= 1 and plain.samples_volume_ml.min() > 0

    def gated(gate: float):  # noqa: ANN202
        return Predictor(tiny["bundle_dir"], device="cpu", mc_samples=6, max_component_adc=gate).predict(
            tiny["dwi"], tiny["adc"])

    lenient = gated(float(medians.max()) + 0.07)  # above every component's median ADC: all kept
    assert lenient.postprocessing["max_component_adc"] == pytest.approx(medians.max() + 0.07)
    np.testing.assert_array_equal(lenient.probability, plain.probability)
    np.testing.assert_array_equal(lenient.mask, plain.mask)
    np.testing.assert_allclose(lenient.samples_volume_ml, plain.samples_volume_ml)
    strict = gated(float(medians.min()) - 0.07)  # below every median: every component goes, in each sample too
    assert not strict.mask.any() and strict.n_components == 0 and np.all(strict.samples_volume_ml == 0)
    assert strict.volume_ml["mask"] == 0


def test_flip_averaging_is_mirror_symmetric(tiny: dict) -> None:
    """On a case whose DWI grid is the model grid, flip averaging makes the prediction of the
    mirrored input the mirror of the prediction (and differs from the plain prediction)."""
    size = TINY_GRID.size
    geometry = Geometry(size, TINY_GRID.spacing, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    rng = np.random.default_rng(0)
    image = rng.normal(1.0, 0.3, (3, *size[::-1])).astype(np.float32)
    brain = np.ones(size[::-1], bool)
    brain[:, :, 0] = False  # asymmetric brain mask: mirrored with the image
    mapping = GridMapping(geometry, geometry)
    case = PreprocessedCase(image, True, brain, mapping, "mm2/s")
    mirrored = dataclasses.replace(case, image=np.ascontiguousarray(image[..., ::-1]),
                                   brain=np.ascontiguousarray(brain[..., ::-1]))
    bundle = load_bundle(tiny["bundle_dir"])
    tta = Predictor(bundle, device="cpu", mc_samples=4, flip_tta=True)
    a, b = tta.predict_preprocessed(case), tta.predict_preprocessed(mirrored)
    np.testing.assert_allclose(b.probability, a.probability[..., ::-1], atol=1e-5)
    np.testing.assert_allclose(b.spatial_attention, a.spatial_attention[..., ::-1], atol=1e-5)
    plain = Predictor(bundle, device="cpu", mc_samples=4, flip_tta=False).predict_preprocessed(case)
    assert np.abs(plain.probability - a.probability).max() > 1e-4


def _row(flip: bool, threshold: float, min_ml: float, gate: float, score: float, **extra: object) -> dict:
    return {"flip_tta": flip, "threshold": threshold, "min_component_ml": min_ml, "max_component_adc": gate,
            "min_component_probability": 0.0, "small_component_ml": 0.0, "small_component_adc": 0.0,
            "score": score, "plausible": True, "small_lesion_f1": 0.5, **extra}


def test_search_scores_every_rule_like_the_metrics_on_the_final_mask() -> None:
    from Training.evaluation import metrics as M
    from Training.evaluation.postprocess import CASE_FIELDS

    truth = np.zeros((12, 12, 12), bool)
    truth[2:6, 2:6, 2:6] = True  # 64 voxels = 6.4 mL at 0.1 mL per voxel
    truth[9, 2, 2] = True  # a 0.1 mL lesion
    probability = truth * 0.45
    probability[10, 10, 10] = 0.9  # a one-voxel false positive
    probability[9, 2, 2] = 0.65  # the small lesion, found but less certain
    adc = np.where(truth, 0.5, 1.1).astype(np.float32)  # the speck lies where diffusion is normal
    settings = [PostProcessing(threshold=t, min_component_ml=m, max_component_adc=g, min_component_probability=p,
                               small_component_ml=sm, small_component_adc=sa)
                for t in (0.4, 0.5) for m in (0.0, 0.5) for g in (0.0, 0.8, 0.4) for p in (0.0, 0.7)
                for sm, sa in ((0.0, 0.0), (1.0, 0.8))]
    scores = score_case(probability.astype(np.float32), truth, 0.1, settings, adc)
    for post, values in zip(settings, scores, strict=True):
        mask = post.apply(probability, 0.1, adc)  # the Lib's rule on the final mask
        by_size, fp_ml = M.lesion_detection_by_size(mask, truth, 0.1)
        expected = {"dice": M.dice(mask, truth), "lesion_f1": M.lesion_f1(mask, truth), "pred_ml": mask.sum() * 0.1,
                    "lesion_precision": M.lesion_precision(mask, truth), "fp_component_ml": fp_ml,
                    **{f"lesions_{k}_{n}": v[i] for k, v in by_size.items()
                       for i, n in enumerate(("tp", "fp", "fn"))}}
        for name, value in zip(CASE_FIELDS, values, strict=True):
            assert value == pytest.approx(expected[name]), (post, name)
    plain = settings.index(PostProcessing(threshold=0.4))
    assert scores[plain][3] == pytest.approx(2 / 3)  # two lesions found, one false positive
    gated = settings.index(PostProcessing(threshold=0.4, max_component_adc=0.8))
    assert tuple(scores[gated][:2]) == (1.0, 1.0)  # the speck's normal ADC removes it
    sized = settings.index(PostProcessing(threshold=0.4, min_component_ml=0.5))
    assert scores[sized][1] < 1.0  # a size limit also deletes the small true lesion
    small_gate = settings.index(PostProcessing(threshold=0.4, small_component_ml=1.0, small_component_adc=0.8))
    assert tuple(scores[small_gate][:2]) == (1.0, 1.0)  # the small-component gate keeps the small lesion
    confident = settings.index(PostProcessing(threshold=0.4, min_component_probability=0.7))
    assert scores[confident][CASE_FIELDS.index("lesions_lt1ml_fn")] == 1  # mean probability 0.65 < 0.7


def test_choice_rules_plausibility_small_lesions_and_ties() -> None:
    from Training.evaluation.postprocess import choose, small_lesion_reference

    table = [_row(True, 0.4, 0.0, 0.0, 0.8), _row(False, 0.4, 0.0, 0.0, 0.8), _row(False, 0.4, 0.0, 0.8, 0.8),
             _row(False, 0.5, 0.0, 0.0, 0.6)]
    assert choose(table) is table[1]  # a tie goes to the simpler setting (no flip, no ADC gate)
    blob = _row(False, 0.3, 0.0, 0.0, 0.95, plausible=False)
    assert choose([blob, *table]) is table[1] and not blob["eligible"]
    assert "implausible" in blob["excluded_because"]
    big_limit = _row(False, 0.4, 0.5, 0.0, 0.9, small_lesion_f1=0.2)
    assert choose([big_limit, *table]) is table[1]  # small lesions lose: the 0.5 mL limit is not eligible
    assert "under 0.5 mL" in big_limit["excluded_because"]
    big_limit_gain = _row(False, 0.4, 0.5, 0.0, 0.9, small_lesion_f1=0.6)
    assert choose([big_limit_gain, *table]) is big_limit_gain
    assert small_lesion_reference([big_limit_gain, *table]) is table[1]  # the campaign's check c reads this row
    assert small_lesion_reference([big_limit_gain, blob]) is None  # only implausible rows keep small lesions
    rule = _row(False, 0.4, 0.0, 0.0, 0.85, min_component_probability=0.7)
    assert choose([rule, *table]) is rule
    assert choose([rule, *table], applies_component_rule=False) is table[1]  # the Predictor could not apply it


def test_the_guard_block_must_be_beaten_on_mimic_false_positives_and_small_lesions() -> None:
    from Training.evaluation.postprocess import choose, guard_failures

    def row(threshold: float, min_ml: float, score: float, fp: float, f1: float) -> dict:
        return _row(True, threshold, min_ml, 0.0, score, small_lesion_f1=f1, mimics_fp_component_ml=fp,
                    phys_fp_component_ml=5.0)

    guard = row(0.6, 0.5, 0.50, fp=0.70, f1=0.06)
    best_score = row(0.3, 0.2, 0.52, fp=0.90, f1=0.13)  # more false positives on the mimic set
    few_small = row(0.7, 0.2, 0.49, fp=0.60, f1=0.06)  # fewer false positives, but no gain on small lesions
    both = row(0.8, 0.1, 0.48, fp=0.65, f1=0.08)
    table = [dict(guard), best_score, few_small, both]
    assert choose(table, guard=guard, guard_sets=("mimics",)) is both
    assert not best_score["eligible"] and "false positives on mimics 0.900" in best_score["excluded_because"]
    assert "F1 < 1 mL 0.060, not above 0.060" in few_small["excluded_because"]
    assert guard_failures(both, guard, ("mimics",)) == []
    assert guard_failures(both, guard, ("phys",)) == ["false positives on phys 5.000 mL/case, not below 5.000"]
    # nothing beats it: rules 1-7 choose, unchanged
    table = [dict(guard), row(0.3, 0.2, 0.52, fp=0.90, f1=0.13), row(0.7, 0.2, 0.49, fp=0.60, f1=0.06)]
    assert choose(table, guard=guard, guard_sets=("mimics",)) is table[1]
    assert choose(table) is table[1]


def test_the_committed_guard_is_the_issue_time_block(tmp_path: Path) -> None:
    from StrokePredictorLib.errors import StrokePredictorError
    from Training.evaluation.postprocess import PostprocessConfig, read_guard

    guard = read_guard(Path(__file__).parents[1] / "Training" / "resources" / "postprocess_guard_issue_time.json")
    assert (guard.threshold, guard.flip_tta, guard.min_component_ml, guard.max_component_adc,
            guard.min_component_probability, guard.small_component_ml) == (0.6, True, 0.5, 0.0, 0.0, 0.0)
    bad = tmp_path / "guard.json"
    bad.write_text(json.dumps({"threshold": 0.6}))
    with pytest.raises(StrokePredictorError, match="postprocessing"):
        read_guard(bad)
    with pytest.raises(ValueError, match="together"):
        PostprocessConfig(guard=bad)


def test_search_never_picks_a_threshold_that_marks_the_whole_brain() -> None:
    """The degenerate case: at threshold 0.4 the model marks the whole brain as one
    component, which touches the lesion (lesion F1 = 1) and so won the old (Dice + F1) / 2."""
    from Training.evaluation.postprocess import build_table, choose

    shape = (30, 30, 30)
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    brain = (k - 15) ** 2 + (j - 15) ** 2 + (i - 15) ** 2 < 14**2
    settings = [PostProcessing(threshold=t) for t in (0.3, 0.4, 0.5, 0.6)]
    values, true_ml = [], []
    for case in range(4):
        truth = np.zeros(shape, bool)
        truth[8 + case:12 + case, 10:14, 10:14] = True  # 64 voxels = 0.5 mL at 0.008 mL per voxel
        probability = 0.45 * brain  # everything above 0.4 ...
        probability[8 + case:12 + case, 10:14, 12:16] = 0.55  # ... the lesion a little more, two voxels off
        for speck in range(4):  # and four specks
            probability[20, 14 + 3 * speck, 20 + case] = 0.58
        values.append(score_case(probability.astype(np.float32), truth, 0.008, settings))
        true_ml.append(float(truth.sum()) * 0.008)
    per_set = {"val": {False: np.stack(values, axis=1)}}
    table = build_table(settings, (False,), per_set, {"val": np.asarray(true_ml)})
    by_threshold = {row["threshold"]: row for row in table}
    blob = by_threshold[0.4]
    assert blob["val_lesion_f1"] == 1.0 and blob["val_lesion_precision"] == 1.0 and blob["val_dice"] < 0.05
    old_score = {t: (r["val_dice"] + r["val_lesion_f1"]) / 2 for t, r in by_threshold.items()}
    assert max(old_score, key=old_score.get) in (0.3, 0.4)  # the old criterion falls for it
    assert not blob["plausible"] and not by_threshold[0.3]["plausible"] and by_threshold[0.5]["plausible"]
    assert choose(table)["threshold"] == 0.5


@pytest.fixture(scope="module")
def search_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from Training.synthesis.generate import write_tiny_dataset

    root = tmp_path_factory.mktemp("search")
    return {"data": write_tiny_dataset(root / "data", n_cases=2, seed=0), "root": root}


def test_postprocess_verb_end_to_end(search_data: dict, tmp_path: Path) -> None:
    from Training.evaluation.postprocess import main

    bundle = write_tiny_bundle(tmp_path / "bundle", seed=1)
    out = tmp_path / "search"
    argv = ["--bundle", str(bundle), "--data", str(search_data["data"]), "--out", str(out), "--thresholds",
            "0.4,0.6", "--min-components-ml", "0,5", "--max-component-adcs", "0,0.8", "--min-component-probabilities",
            "0", "--small-components-ml", "0,1", "--small-component-adcs", "0.8", "--mc-samples", "2",
            "--device", "cpu", "--write", "--force"]
    assert main(argv) == 0
    result = json.loads((out / "postprocess.json").read_text())
    assert len(result["table"]) == 2 * 2 * 2 * 2 * 2  # flips x thresholds x sizes x gates x small rules
    best = result["best"]
    eligible = [row["score"] for row in result["table"] if row["eligible"]]
    assert best["score"] == (max(eligible) if eligible else max(r["score"] for r in result["table"]))
    keeping = [row["score"] for row in result["table"] if row["eligible"] and row["min_component_ml"] < 0.5]
    assert result["keeps_small"]["min_component_ml"] < 0.5 and result["keeps_small"]["score"] == max(keeping)
    stored = load_bundle(bundle).postprocessing
    assert stored.volume_log_margin == result["postprocessing"]["volume_log_margin"] >= 0
    assert (stored.threshold, stored.flip_tta, stored.min_component_ml, stored.max_component_adc) == (
        best["threshold"], best["flip_tta"], best["min_component_ml"], best["max_component_adc"])
    assert "Validation sets" in (out / "postprocess.md").read_text()
    with pytest.raises(Exception, match="exists"):
        main(argv)  # an earlier table is not overwritten unless asked


def test_postprocess_verb_with_a_guard(search_data: dict, tmp_path: Path) -> None:
    from StrokePredictorLib.errors import StrokePredictorError
    from Training.evaluation.postprocess import guard_failures, main

    bundle = write_tiny_bundle(tmp_path / "bundle", seed=1)
    guard = Path(__file__).parents[1] / "Training" / "resources" / "postprocess_guard_issue_time.json"
    label = Path(search_data["data"]).name
    argv = ["--bundle", str(bundle), "--data", str(search_data["data"]), "--thresholds", "0.4", "--min-components-ml",
            "0,0.1", "--max-component-adcs", "0", "--min-component-probabilities", "0", "--small-components-ml", "0",
            "--mc-samples", "2", "--device", "cpu", "--guard", str(guard)]
    result_path = tmp_path / "search" / "postprocess.json"
    assert main([*argv, "--out", str(tmp_path / "search"), "--guard-sets", label]) == 0
    result = json.loads(result_path.read_text())
    assert len(result["table"]) == 2 * 3  # flips x (two sizes at 0.4 + the guard's block, added)
    row = result["guard"]["row"]
    assert (row["threshold"], row["flip_tta"], row["min_component_ml"]) == (0.6, True, 0.5)
    failures = guard_failures(result["best"], row, (label,))
    assert result["guard"]["met"] == (not failures) and result["guard"]["failures"] == failures
    assert ("guarded" in result["postprocessing"]["selected_on"]) == result["guard"]["met"]
    with pytest.raises(StrokePredictorError, match="not among the validation sets"):
        main([*argv, "--out", str(tmp_path / "other"), "--guard-sets", "val_mimics"])
    with pytest.raises(StrokePredictorError, match="flip averaging"):
        main([*argv, "--out", str(tmp_path / "noflip"), "--guard-sets", label, "--flip-tta", "false"])


def test_search_refuses_to_write_a_whole_brain_model_without_force(search_data: dict, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that marks the whole brain at every threshold: the search prints its table, and
    refuses to store the choice unless forced."""
    from types import SimpleNamespace

    from Training.evaluation.postprocess import DegenerateChoiceError, main

    def whole_brain(self, case, clinical=None, progress=None):  # noqa: ANN001, ANN202, ARG001
        brain = case.mapping.to_source(case.brain.astype(np.float32), order=1) > 0.5
        return SimpleNamespace(probability=np.where(brain, 0.95, 0.0).astype(np.float32))

    monkeypatch.setattr(Predictor, "predict_preprocessed", whole_brain)
    bundle = write_tiny_bundle(tmp_path / "bundle", seed=1)
    before = (bundle / "model.json").read_text()
    out = tmp_path / "search"
    argv = ["--bundle", str(bundle), "--data", str(search_data["data"]), "--out", str(out), "--thresholds",
            "0.4,0.6", "--min-components-ml", "0", "--max-component-adcs", "0", "--min-component-probabilities", "0",
            "--small-components-ml", "0", "--flip-tta", "false", "--mc-samples", "2", "--device", "cpu", "--write"]
    with pytest.raises(DegenerateChoiceError, match="implausible volumes"):
        main(argv)
    assert (bundle / "model.json").read_text() == before  # nothing stored
    result = json.loads((out / "postprocess.json").read_text())
    assert result["n_plausible"] == 0 and result["degenerate"]
    assert "Degenerate choice" in (out / "postprocess.md").read_text()
    assert main([*argv, "--overwrite", "--force"]) == 0
    assert load_bundle(bundle).postprocessing.threshold in (0.4, 0.6)


def test_interpolate_verb_mixes_weights_of_the_same_model(tmp_path: Path) -> None:
    import torch
    from inference_phantom import tiny_config

    from StrokePredictorLib.errors import StrokePredictorError
    from Training.training.interpolate import InterpolateConfig, interpolate

    a = write_tiny_bundle(tmp_path / "a", seed=1)
    b = write_tiny_bundle(tmp_path / "b", seed=2)
    wa, wb = load_bundle(a).model.state_dict(), load_bundle(b).model.state_dict()
    for alpha in (0.0, 0.5, 1.0):
        out = interpolate(InterpolateConfig(start=a, end=b, alpha=alpha, out=tmp_path / f"mix{alpha}"))
        mixed = load_bundle(out)  # checksum verified on load
        state = mixed.model.state_dict()
        for key, value in state.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, (1 - alpha) * wa[key] + alpha * wb[key], rtol=1e-6, atol=1e-6)
        assert mixed.metadata["data"]["training"]["interpolated"]["alpha"] == alpha
    other = write_tiny_bundle(tmp_path / "other", config=tiny_config(head_channels=4))
    with pytest.raises(StrokePredictorError, match="architecture"):
        interpolate(InterpolateConfig(start=a, end=other, out=tmp_path / "bad"))
    # an outcome network's growth seed is part of its design: the mix keeps the end bundle's
    from inference_phantom import TINY_GRID

    from StrokePredictorLib.bundle import save_bundle
    from StrokePredictorLib.network import StrokeNet
    from StrokePredictorLib.preprocess import Normalization

    seed = PostProcessing(threshold=0.3, flip_tta=True, min_component_ml=0.5)
    grown = [save_bundle(tmp_path / f"grow{n}", StrokeNet(tiny_config(growth=True, growth_volume=True)),
                         task="outcome", grid=TINY_GRID, normalization=Normalization(), data={}, metrics={},
                         growth_seed=seed) for n in (1, 2)]
    assert load_bundle(interpolate(InterpolateConfig(start=grown[0], end=grown[1], out=tmp_path / "mixgrow"))
                       ).growth_seed == seed
    with pytest.raises(ValueError, match="alpha"):
        InterpolateConfig(alpha=1.5)


def test_component_rule_fields_are_written_only_when_on() -> None:
    assert set(DEFAULT.to_dict()) == {"threshold", "flip_tta", "min_component_ml", "max_component_adc",
                                      "volume_log_margin", "selected_on"}  # as shipped bundles store it
    rule = PostProcessing(min_component_probability=0.7, small_component_ml=1.0, small_component_adc=0.8)
    assert PostProcessing.from_dict(rule.to_dict()) == rule
    assert "mean probability < 0.7" in rule.describe() and "under 1 mL kept only with median ADC < 0.8" in (
        rule.describe())
    assert rule.needs_adc and rule.component_rule and not PostProcessing(max_component_adc=0.8).component_rule
    for bad in ({"min_component_probability": 1.0}, {"small_component_ml": -1.0},
                {"small_component_adc": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PostProcessing.from_dict(bad)


def test_a_growth_by_volume_bundle_is_searched_without_rules_a_growth_could_break() -> None:
    """Rule 8: a component that grows into normal tissue raises its median ADC and lowers its mean
    probability; a gate on either could delete the component because it grew (no treatment smaller than
    thrombectomy), so such bundles search thresholds and size limits alone."""
    from StrokePredictorLib.postprocess import PostProcessing
    from Training.evaluation.postprocess import PostprocessConfig, for_growth_by_volume

    grid = PostprocessConfig(thresholds=(0.3, 0.5), min_components_ml=(0.0, 1.0), max_component_adcs=(0.0, 0.9),
                             min_component_probabilities=(0.0, 0.7), small_components_ml=(0.0, 0.5),
                             small_component_adcs=(0.75,)).grid()
    kept = for_growth_by_volume(grid)
    assert kept and all(not p.max_component_adc and not p.small_component_adc and not p.min_component_probability
                        for p in kept)
    assert len(kept) == 2 * 2 < len(grid)  # thresholds x sizes, nothing else kept
    assert PostProcessing(threshold=0.3, min_component_ml=1.0) in kept


def test_the_search_of_a_growth_by_volume_bundle_has_no_gate(search_data: dict, tmp_path: Path) -> None:
    from inference_phantom import tiny_config

    from Training.evaluation.postprocess import main

    bundle = write_tiny_bundle(tmp_path / "bundle", seed=1, config=tiny_config(growth=True, growth_volume=True))
    out = tmp_path / "search"
    assert main(["--bundle", str(bundle), "--data", str(search_data["data"]), "--out", str(out), "--thresholds",
                 "0.4,0.6", "--min-components-ml", "0,5", "--max-component-adcs", "0,0.8",
                 "--min-component-probabilities", "0,0.7", "--small-components-ml", "0,1", "--small-component-adcs",
                 "0.8", "--mc-samples", "2", "--device", "cpu", "--flip-tta", "false"]) == 0
    table = json.loads((out / "postprocess.json").read_text())["table"]
    assert len(table) == 2 * 2  # thresholds x sizes: the gates and the mean-probability limit are not searched
    assert all(not row["max_component_adc"] and not row["small_component_adc"] and not row["min_component_probability"]
               for row in table)


def test_the_model_card_names_the_growth_seed_beside_the_block() -> None:
    from Training.evaluation.model_card import postprocessing_section

    block = PostProcessing(threshold=0.3, flip_tta=True, selected_on="the search")
    seed = PostProcessing(threshold=0.3, flip_tta=True, min_component_ml=0.5, selected_on="the acute bundle's block")
    plain = "\n".join(postprocessing_section({"postprocessing": block.to_dict()}))
    seeded = "\n".join(postprocessing_section({"postprocessing": block.to_dict(), "growth_seed": seed.to_dict()}))
    assert "growth seeds" not in plain
    assert seeded.startswith(plain) and ("core the acute model reports (`growth_seed`): the core head's Monte-Carlo "
                                         "mean under threshold 0.3, left-right flip averaging, components under 0.5 mL "
                                         "removed (the acute bundle's block).") in seeded
    alone = "\n".join(postprocessing_section({"postprocessing": block.to_dict(), "growth_seed": seed.to_dict(),
                                               "architecture": {"config": {"growth_alone": True}}}))
    assert "the outcome is the grown core alone (`growth_alone`" in alone and "growth_alone" not in seeded
