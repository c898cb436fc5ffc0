"""StrokeNet: parameter counts, shapes, attention, FLAIR absence, Monte-Carlo tail."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from inference_phantom import tiny_config

from StrokePredictorLib.clinical import FEATURES, encode, validate
from StrokePredictorLib.network import NetworkConfig, StrokeNet, count_parameters


def _inputs(shape: tuple[int, int, int], batch: int = 1, seed: int = 0, **clinical: object):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, *shape, generator=generator)
    values, missing = encode(validate(clinical or {"age": 71, "nihss": 12, "sex": "F", "treatment": "thrombolysis"}))
    values_t = torch.from_numpy(values)[None].repeat(batch, 1)
    missing_t = torch.from_numpy(missing)[None].repeat(batch, 1)
    return image, values_t, missing_t, torch.ones(batch, dtype=torch.bool)


def test_parameter_counts_and_divisors() -> None:
    base = StrokeNet(NetworkConfig.base())
    lite = StrokeNet(NetworkConfig.lite())
    assert 18.0e6 <= count_parameters(base) <= 19.0e6
    assert 1.0e6 <= count_parameters(lite) <= 5.0e6
    assert base.size_divisor == 32 and lite.size_divisor == 16
    assert base.config.heads == 4 and base.config.fusion_dim == 256 and base.config.blocks == (2, 2, 2, 2)


@pytest.mark.parametrize("preset, shape", [("base", (32, 64, 32)), ("lite", (32, 48, 16))])
def test_output_shapes_and_attention(preset: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = StrokeNet(getattr(NetworkConfig, preset)()).eval()
    with torch.no_grad():
        out = model(*_inputs(shape, batch=2))
    assert set(out) == {"logits", "feature_attention", "spatial_attention"}
    assert out["logits"].shape == (2, 1, *shape)
    assert out["feature_attention"].shape == (2, 10)
    assert out["spatial_attention"].shape == (2, 1, *shape)
    torch.testing.assert_close(out["feature_attention"].sum(dim=1), torch.ones(2))
    assert (out["feature_attention"] > 0).all()
    spatial = out["spatial_attention"]
    assert float(spatial.min()) >= 0.0 and float(spatial.amax(dim=(1, 2, 3, 4)).min()) == pytest.approx(1.0)


def test_input_size_must_be_divisible() -> None:
    model = StrokeNet(tiny_config())
    image, values, missing, flair = _inputs((16, 20, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        model(image, values, missing, flair)


def test_attention_changes_with_clinical_values_and_missingness() -> None:
    torch.manual_seed(1)
    model = StrokeNet(tiny_config()).eval()
    image, values, missing, flair = _inputs((16, 24, 16))
    with torch.no_grad():
        reference = model(image, values, missing, flair)
        changed = values.clone()
        changed[0, 2] += 2.0  # NIHSS
        other = model(image, changed, missing, flair)
        now_missing = missing.clone()
        now_missing[0, 0] = True  # age missing
        dropped = model(image, values, now_missing, flair)
    for result in (other, dropped):
        assert not torch.allclose(result["feature_attention"], reference["feature_attention"])
        torch.testing.assert_close(result["feature_attention"].sum(), torch.tensor(1.0))
        assert not torch.allclose(result["logits"], reference["logits"])
    # Categorical features use an embedding table: another category changes the attention too.
    treatment = values.clone()
    treatment[0, 9] = 2.0
    with torch.no_grad():
        other_category = model(image, treatment, missing, flair)
    assert not torch.allclose(other_category["feature_attention"], reference["feature_attention"])


def test_flair_absence_is_signalled() -> None:
    torch.manual_seed(2)
    model = StrokeNet(tiny_config()).eval()
    image, values, missing, _ = _inputs((16, 16, 16))
    image[:, 2] = 0.0
    with torch.no_grad():
        present = model(image, values, missing, torch.tensor([True]))["logits"]
        absent = model(image, values, missing, torch.tensor([False]))["logits"]
    assert not torch.allclose(present, absent)


def test_imaging_only_ignores_clinical_values() -> None:
    torch.manual_seed(3)
    model = StrokeNet(tiny_config(imaging_only=True)).eval()
    image, values, missing, flair = _inputs((16, 16, 16))
    with torch.no_grad():
        first = model(image, values, missing, flair)
        second = model(image, values + 3.0, ~missing, flair)
    torch.testing.assert_close(first["logits"], second["logits"])
    torch.testing.assert_close(first["feature_attention"], torch.full((1, 10), 0.1))
    assert float(first["spatial_attention"].abs().max()) == 0.0
    assert model.clinical is None and model.fusion is None


def test_config_round_trip_and_validation() -> None:
    config = NetworkConfig.base(mc_dropout=0.3)
    data = json.loads(json.dumps(config.to_dict()))
    assert NetworkConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown field"):
        NetworkConfig.from_dict({**data, "width_multiplier": 2})
    with pytest.raises(ValueError, match="decoder_widths"):
        NetworkConfig.lite(decoder_widths=(8, 8))
    with pytest.raises(ValueError, match="divisible by heads"):
        NetworkConfig.lite(fusion_dim=30)


def test_mc_tail_matches_head_and_is_seeded() -> None:
    torch.manual_seed(4)
    model = StrokeNet(tiny_config()).eval()
    with torch.no_grad():
        features = model.features(*_inputs((16, 16, 16)))["features"]
        deterministic = model.head_logits(features)  # eval mode: dropout off
        samples = model.sample_logits(features, 6, torch.Generator().manual_seed(0), deterministic=True)
        torch.testing.assert_close(samples[0], deterministic[:, 0], rtol=1e-5, atol=1e-5)
        assert float((samples - samples[0]).abs().max()) == 0.0
        first = model.sample_logits(features, 6, torch.Generator().manual_seed(7))
        again = model.sample_logits(features, 6, torch.Generator().manual_seed(7))
        other = model.sample_logits(features, 6, torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    spread = first.flatten(1)
    assert all(not torch.allclose(spread[0], spread[n]) for n in range(1, 6))
    # The mean of many dropout samples approaches the deterministic logits (inverted dropout).
    with torch.no_grad():
        many = model.sample_logits(features, 4000, torch.Generator().manual_seed(1)).mean(dim=0)
    error = (many - deterministic[:, 0]).abs().mean() / deterministic.abs().mean()
    assert float(error) < 0.05


def test_training_mode_uses_dropout_and_backpropagates() -> None:
    torch.manual_seed(5)
    model = StrokeNet(tiny_config(feature_dropout=0.5)).train()
    inputs = _inputs((16, 16, 16), batch=2)
    first = model(*inputs)["logits"]
    second = model(*inputs)["logits"]
    assert not torch.allclose(first, second)
    first.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(int(g is not None and bool(torch.any(g != 0))) for g in grads) > 0.8 * len(grads)
    assert np.isfinite(float(model.head.weight.grad.abs().sum()))


def test_patch_window_gives_the_full_grid_positions() -> None:
    """A patch's bottleneck tokens get the positions of the same cells in a full-grid pass."""
    from StrokePredictorLib.network import _Fusion

    full = _Fusion._coordinates((5, 7, 6), torch.device("cpu"), torch.float32).reshape(5, 7, 6, 3)
    window = torch.tensor([[[1, 3, 2], [5, 7, 6]], [[0, 0, 0], [5, 7, 6]]])
    patch = _Fusion._coordinates((4, 4, 4), torch.device("cpu"), torch.float32, window).reshape(2, 4, 4, 4, 3)
    torch.testing.assert_close(patch[0], full[1:5, 3:7, 2:6], rtol=0, atol=1e-6)
    torch.testing.assert_close(patch[1], full[0:4, 0:4, 0:4], rtol=0, atol=1e-6)


def test_window_over_the_whole_grid_changes_nothing_and_is_checked() -> None:
    torch.manual_seed(0)
    model = StrokeNet(tiny_config()).eval()
    image, values, missing, flair = _inputs((32, 48, 32))
    window = torch.tensor([[[0, 0, 0], [32, 48, 32]]])
    with torch.no_grad():
        plain = model(image, values, missing, flair)["logits"]
        windowed = model(image, values, missing, flair, window)["logits"]
        shifted = model(image, values, missing, flair, torch.tensor([[[16, 0, 0], [64, 48, 32]]]))["logits"]
    torch.testing.assert_close(windowed, plain, rtol=0, atol=1e-5)  # linspace vs arange rounding
    assert not torch.equal(shifted, plain)  # the positions reach the output
    with pytest.raises(ValueError, match="multiple of the encoder stride"):
        model(image, values, missing, flair, torch.tensor([[[3, 0, 0], [64, 48, 32]]]))


# ----------------------------------------------------------------------------------------
# FiLM: a direct path from the fused clinical representation to every decoder level
# ----------------------------------------------------------------------------------------
def test_film_off_keeps_the_old_parameters_and_config() -> None:
    """Bundles without the field load as before: same tensors, same default."""
    plain = StrokeNet(NetworkConfig.lite())
    assert plain.film is None and NetworkConfig.lite().film is False
    old = {k: v for k, v in NetworkConfig.lite().to_dict().items() if k != "film"}
    assert NetworkConfig.from_dict(old) == NetworkConfig.lite()
    film = StrokeNet(NetworkConfig.lite(film=True))
    extra = set(film.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("film.") for k in extra)
    assert set(plain.state_dict()) <= set(film.state_dict())
    expected = 2 * sum(NetworkConfig.lite().decoder_widths) * (NetworkConfig.lite().fusion_dim + 1)
    assert count_parameters(film) - count_parameters(plain) == expected
    with pytest.raises(ValueError, match="imaging_only"):
        NetworkConfig.lite(film=True, imaging_only=True)


def test_film_from_old_weights_starts_with_exactly_the_old_output() -> None:
    from StrokePredictorLib.network import load_weights

    torch.manual_seed(6)
    old = StrokeNet(tiny_config()).eval()
    new = StrokeNet(tiny_config(film=True)).eval()
    kept = load_weights(new, old.state_dict())
    assert kept and all(k.startswith("film.") for k in kept)
    inputs = _inputs((16, 24, 16))
    with torch.no_grad():
        before = old(*inputs)
        after = new(*inputs)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # Once FiLM is non-zero the clinical values act through it: the output moves.
    with torch.no_grad():
        for module in new.film:
            module.linear.weight.normal_(0.0, 0.05)
        moved = new(*inputs)["logits"]
    assert not torch.allclose(moved, before["logits"])
    # Everything else must fit exactly.
    broken = dict(old.state_dict())
    broken.pop("head.bias")
    with pytest.raises(RuntimeError, match="missing head.bias"):
        load_weights(StrokeNet(tiny_config(film=True)), broken)
    with pytest.raises(RuntimeError, match="unexpected"):
        load_weights(old, new.state_dict())


def test_film_conditions_on_the_clinical_values_and_trains() -> None:
    torch.manual_seed(7)
    model = StrokeNet(tiny_config(film=True)).train()
    inputs = _inputs((16, 16, 16), batch=2)
    model(*inputs)["logits"].mean().backward()
    # zero-initialised, yet gradients reach FiLM (the path is live from the first step)
    assert all(float(m.linear.weight.grad.abs().sum()) > 0 for m in model.film)
    model.eval()
    with torch.no_grad():
        for module in model.film:
            module.linear.weight.normal_(0.0, 0.05)
        image, values, missing, flair = _inputs((16, 16, 16))
        base = model(image, values, missing, flair)["logits"]
        later, known = values.clone(), missing.clone()
        later[0, 3], known[0, 3] = 2.0, False  # onset time, given
        assert not torch.allclose(model(image, later, known, flair)["logits"], base)


def test_encode_decode_equals_features_and_keeps_the_window() -> None:
    """The what-if split (imaging encoder cached, fusion + decoder re-run) is bit-identical."""
    torch.manual_seed(8)
    model = StrokeNet(tiny_config(film=True)).eval()
    with torch.no_grad():
        for module in model.film:
            module.linear.weight.normal_(0.0, 0.05)
        image, values, missing, flair = _inputs((32, 48, 32))
        window = torch.tensor([[[16, 0, 0], [64, 48, 32]]])
        for w in (None, window):
            whole = model.features(image, values, missing, flair, w)
            encoded = model.encode_image(image, flair)
            split = model.decode(encoded, values, missing, w)
            for key in whole:
                assert torch.equal(whole[key], split[key]), key
        changed = values.clone()
        changed[0, 9] = 2.0
        assert not torch.equal(model.decode(encoded, changed, missing)["features"],
                               model.decode(encoded, values, missing)["features"])


# ----------------------------------------------------------------------------------------
# Growth head
# ----------------------------------------------------------------------------------------
def _offset(model: StrokeNet, **clinical: object) -> float:
    values, missing = encode(validate(clinical))
    values_t, missing_t = torch.from_numpy(values)[None], torch.from_numpy(missing)[None]
    with torch.no_grad():
        tokens = model.clinical(values_t, missing_t)
        return float(model.growth(tokens, values_t, missing_t)[0])


def test_growth_head_from_old_weights_starts_near_the_old_output() -> None:
    from StrokePredictorLib.network import load_weights

    torch.manual_seed(8)
    old = StrokeNet(tiny_config()).eval()
    new = StrokeNet(tiny_config(growth=True)).eval()
    kept = load_weights(new, old.state_dict())
    assert {"risk.weight", "risk.bias"} <= set(kept) and all(k.startswith(("risk.", "growth.")) for k in kept)
    torch.testing.assert_close(new.risk.weight, new.head.weight)
    inputs = _inputs((16, 16, 16))
    with torch.no_grad():
        before, after = old(*inputs)["logits"], new(*inputs)["logits"]
    # logaddexp(core, core - 2 + s) with s near 0 at the start: a small, positive shift only
    shift = after - before
    assert float(shift.min()) > 0.0 and float(shift.max()) < 0.5
    # the old network does not take the growth head's weights
    with pytest.raises(RuntimeError, match="unexpected"):
        load_weights(old, new.state_dict())


def test_growth_offset_is_monotone_in_onset_and_treatment_for_any_weights() -> None:
    """The structural guarantees of the growth head hold whatever the (random) parameters."""
    for seed in range(5):
        torch.manual_seed(seed)
        model = StrokeNet(tiny_config(growth=True)).eval()
        with torch.no_grad():
            for parameter in model.growth.parameters():
                parameter.normal_(0.0, 0.3)
        base = {"age": 70, "nihss": 14, "sex": "M"}
        treatments = ("none", "thrombolysis", "thrombectomy", "both")
        table = {t: [_offset(model, **base, treatment=t, onset_to_imaging_h=h) for h in (0.5, 2, 4.5, 9, 20, 40)]
                 for t in treatments}
        for name, row in table.items():
            assert all(b >= a - 1e-5 for a, b in zip(row, row[1:], strict=False)), (seed, name, row)
        for name in treatments[1:]:
            assert all(t <= n + 1e-5 for t, n in zip(table[name], table["none"], strict=True)), (seed, name)
        for column, hours in enumerate((0.5, 2, 4.5, 9, 20, 40)):
            unknown = _offset(model, **base, onset_to_imaging_h=hours)  # treatment missing
            values = [table[t][column] for t in treatments]
            assert min(values) - 1e-5 <= unknown <= table["none"][column] + 1e-5
            assert unknown >= table["thrombectomy"][column] - 1e-5  # between thrombectomy and none


def test_growth_offset_moves_the_outcome_and_sampling_matches_the_head() -> None:
    torch.manual_seed(9)
    model = StrokeNet(tiny_config(growth=True)).eval()
    with torch.no_grad():
        model.growth.untreated.fill_(0.2)  # softplus(2) = 2.1 logits per knot: strong growth with time
    image, _, _, flair = _inputs((16, 16, 16))

    def clinical(hours: float):
        values, missing = encode(validate({"onset_to_imaging_h": hours, "treatment": "none"}))
        return torch.from_numpy(values)[None], torch.from_numpy(missing)[None]

    with torch.no_grad():
        early = model(image, *clinical(1.0), flair)["logits"]
        late = model(image, *clinical(20.0), flair)["logits"]
        assert bool((late >= early - 1e-5).all()) and float((late - early).max()) > 0.5
        out = model(image, *clinical(20.0), flair)
        # the core alone rides along for training it on the acute lesion; never above the outcome
        assert out["core_logits"].shape == late.shape and bool((out["core_logits"] <= late + 1e-5).all())
        assert "core_logits" not in StrokeNet(tiny_config()).eval()(image, *clinical(20.0), flair)
        features = model.features(image, *clinical(20.0), flair)["features"]
        assert features.shape[1] == tiny_config().head_channels + 1  # the offset rides along
        samples = model.sample_logits(features, 3, deterministic=True)
        torch.testing.assert_close(samples[0], late[:, 0], rtol=1e-5, atol=1e-5)
        first = model.sample_logits(features, 64, torch.Generator().manual_seed(1))
    assert float(first.std(dim=0).mean()) > 0  # the dropout masks act on both heads


def test_onset_and_treatment_reach_a_growth_network_only_through_the_offset() -> None:
    """Onset time and treatment move only the offset channel, never the imaging-clinical features,
    so the outcome's voxel probabilities follow the orderings whatever the weights."""
    torch.manual_seed(12)
    model = StrokeNet(tiny_config(growth=True)).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # random everywhere, the fusion included
            parameter.add_(0.2 * torch.randn_like(parameter))
    image, _, _, flair = _inputs((16, 16, 16))
    scenarios = {(t, h): _inputs((16, 16, 16), nihss=9, age=61, treatment=t, onset_to_imaging_h=h)[1:3]
                 for t in ("none", "thrombectomy", None) for h in (1.0, 6.0, 20.0)}
    with torch.no_grad():
        out = {key: model.features(image, values, missing, flair)["features"] for key, (values, missing) in
               scenarios.items()}
        logits = {key: model.sample_logits(f, 2, deterministic=True) for key, f in out.items()}
    first = next(iter(out.values()))
    for features in out.values():
        torch.testing.assert_close(features[:, :-1], first[:, :-1], rtol=0, atol=0)
    assert len({float(f[0, -1, 0, 0, 0]) for f in out.values()}) > 3  # the offset itself moves
    for t in ("none", "thrombectomy", None):
        assert bool((logits[(t, 20.0)] >= logits[(t, 6.0)] - 1e-5).all())
        assert bool((logits[(t, 6.0)] >= logits[(t, 1.0)] - 1e-5).all())
    for h in (1.0, 6.0, 20.0):
        assert bool((logits[("thrombectomy", h)] <= logits[(None, h)] + 1e-5).all())
        assert bool((logits[(None, h)] <= logits[("none", h)] + 1e-5).all())
    # a growth network still reads the other clinical values in its cross-attention
    other = _inputs((16, 16, 16), nihss=25, age=90, treatment="none", onset_to_imaging_h=1.0)[1:3]
    with torch.no_grad():
        moved = model.features(image, *other, flair)["features"]
    assert not torch.equal(moved[:, :-1], out[("none", 1.0)][:, :-1])


def test_the_growth_terms_are_each_features_share_of_the_offset() -> None:
    """``growth_terms`` (what training's ridge penalty acts on) are the offset's additive shares: two
    records that differ in sex alone differ in the offset by exactly the change of sex's term."""
    torch.manual_seed(13)
    model = StrokeNet(tiny_config(growth=True)).eval()
    with torch.no_grad():
        for parameter in model.growth.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    image, _, _, flair = _inputs((16, 16, 16))
    records = [_inputs((16, 16, 16), nihss=9, sex=sex, onset_to_imaging_h=3.0)[1:3] for sex in ("F", "M")]
    with torch.no_grad():
        outs = [model.features(image, values, missing, flair) for values, missing in records]
        full = [model(image, values, missing, flair) for values, missing in records]
    terms = [out["growth_terms"] for out in outs]
    assert terms[0].shape == (1, 8)
    torch.testing.assert_close(full[0]["growth_terms"], terms[0])
    sex = [f.name for f in FEATURES if f.name not in ("onset_to_imaging_h", "treatment")].index("sex")
    changed = terms[1] - terms[0]
    assert float(changed[0, sex].abs()) > 1e-4
    torch.testing.assert_close(changed[0, [i for i in range(8) if i != sex]], torch.zeros(7), rtol=0, atol=1e-6)
    offsets = [float(out["features"][0, -1, 0, 0, 0]) for out in outs]
    assert offsets[1] - offsets[0] == pytest.approx(float(changed[0, sex]), abs=1e-5)
    assert "growth_terms" not in StrokeNet(tiny_config(growth=True, imaging_only=True)).eval()(
        image, *records[0], flair)


def test_imaging_only_growth_twin_has_a_constant_offset() -> None:
    torch.manual_seed(10)
    model = StrokeNet(tiny_config(growth=True, imaging_only=True)).eval()
    assert model.clinical is None and set(dict(model.growth.named_parameters())) == {"bias"}
    image, values, missing, flair = _inputs((16, 16, 16))
    other, other_missing = _inputs((16, 16, 16), age=40, nihss=2, treatment="none", onset_to_imaging_h=20)[1:3]
    with torch.no_grad():
        a = model(image, values, missing, flair)["logits"]
        b = model(image, other, other_missing, flair)["logits"]
    assert torch.equal(a, b)


def test_the_growth_gate_holds_growth_back_away_from_the_core() -> None:
    """growth_reach: the tissue that may grow lies near the predicted core, and more of it near a
    large core than near a small one; far from any core growth is held back by the gate's maximum."""
    from StrokePredictorLib.network import GROWTH_GAIN, load_weights

    torch.manual_seed(13)
    model = StrokeNet(tiny_config(growth=True, growth_reach=3)).eval()
    channels = tiny_config().head_channels
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, 0] = 20.0  # core logit = 20 f0 - 10: f0 = 1 is core, f0 = 0 is not
        model.head.bias.fill_(-10.0)
        model.growth.reach.fill_(1.0 / GROWTH_GAIN)
    features = torch.zeros(1, channels, 24, 24, 24)
    features[0, 0, 2:14, 2:14, 2:14] = 1.0  # a large core (12^3 voxels)
    features[0, 0, 19, 19, 19] = 1.0  # a single-voxel core
    with torch.no_grad():
        gate = model._near_core(features)[0, 0]
    weight = float(torch.nn.functional.softplus(torch.tensor(1.0)))
    assert float(gate[8, 8, 8]) < 0.01 * weight  # inside the large core: open
    assert float(gate[15, 8, 8]) < float(gate[19, 19, 17])  # beside the large core more open than beside the small
    assert float(gate[19, 19, 19]) > 2.0 * weight  # even the small core's own voxel is mostly closed
    assert float(gate[8, 20, 20]) == pytest.approx(weight * -math.log(0.01), rel=1e-3)  # far from both: shut
    # the gate rides in the offset channel, so sampling and the forward pass agree, and growth
    # weights without it load (the gate starting almost open)
    image, values, missing, flair = _inputs((16, 16, 16))
    with torch.no_grad():
        out = model(image, values, missing, flair)
        feats = model.features(image, values, missing, flair)["features"]
        torch.testing.assert_close(model.sample_logits(feats, 2, deterministic=True)[0], out["logits"][:, 0],
                                   rtol=1e-5, atol=1e-5)
    plain = StrokeNet(tiny_config(growth=True)).eval()
    fresh = StrokeNet(tiny_config(growth=True, growth_reach=3)).eval()
    assert load_weights(fresh, plain.state_dict()) == ["growth.reach"]
    with torch.no_grad():
        shift = fresh(image, values, missing, flair)["logits"] - plain(image, values, missing, flair)["logits"]
    assert float(shift.max()) <= 1e-5 and float(shift.min()) > -0.25  # softplus(-3) * 4.6 at most
    with pytest.raises(ValueError, match="growth_reach"):
        tiny_config(growth_reach=2)


def test_the_growth_gate_keeps_the_orderings_for_any_weights() -> None:
    torch.manual_seed(14)
    model = StrokeNet(tiny_config(growth=True, growth_reach=2)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    image, _, _, flair = _inputs((16, 16, 16))
    logits = {}
    for t in ("none", "thrombectomy"):
        for h in (1.0, 20.0):
            values, missing = _inputs((16, 16, 16), nihss=9, treatment=t, onset_to_imaging_h=h)[1:3]
            with torch.no_grad():
                logits[(t, h)] = model(image, values, missing, flair)["logits"]
    for t in ("none", "thrombectomy"):
        assert bool((logits[(t, 20.0)] >= logits[(t, 1.0)] - 1e-5).all())
    for h in (1.0, 20.0):
        assert bool((logits[("thrombectomy", h)] <= logits[("none", h)] + 1e-5).all())


def test_decoder_level_without_gradients_equals_the_concatenation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference convolves the skip concatenation as two halves; training concatenates: one function."""
    import torch

    from StrokePredictorLib.network import _DecoderLevel

    torch.manual_seed(0)
    concatenations = []
    original = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: concatenations.append(1) or original(*a, **k))
    for convs in (1, 2):
        level = _DecoderLevel(6, 4, 5, convs).eval()
        x, skip = torch.randn(2, 6, 3, 4, 5), torch.randn(2, 4, 6, 8, 10)
        trained = level(x, skip)  # gradients on: the concatenation
        assert trained.requires_grad and len(concatenations) == 1
        with torch.no_grad():
            split = level(x, skip)
        assert len(concatenations) == 1  # no concatenation without gradients
        torch.testing.assert_close(split, trained.detach(), atol=1e-5, rtol=1e-5)
        concatenations.clear()


def _volume_model(**overrides: object) -> StrokeNet:
    """A growth-by-volume network whose core is feature 0 > 0.5 (core logit 20 f0 - 10)."""
    torch.manual_seed(15)
    model = StrokeNet(tiny_config(growth=True, growth_volume=True, **overrides)).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.weight[0, 0] = 20.0
        model.head.bias.fill_(-10.0)
    return model


def test_growth_by_volume_grows_the_core_outward_by_exp_s_times_its_volume() -> None:
    model = _volume_model()
    assert model.risk is None  # no risk map: the ranking is the distance to the core
    features = torch.zeros(1, tiny_config().head_channels, 24, 24, 24)
    features[0, 0, 8:14, 8:14, 8:14] = 1.0  # a 216-voxel core
    tissue = torch.ones(1, 24, 24, 24, dtype=torch.bool)
    tissue[0, :, :, 16:] = False  # no tissue beyond i = 15
    grown = {}
    for s in (-8.0, math.log(0.5), 0.0, math.log(2.0)):
        channel = model._grown_core(features, torch.tensor([s]), tissue)[0, 0]
        grown[s] = (channel > 0).numpy()
        assert int(grown[s].sum()) == 216 + round(216 * math.exp(s))  # the core plus exp(s) of its volume
        assert float(channel[~tissue[0]].max()) == -30.0 and not grown[s][~tissue[0].numpy()].any()
        assert float(channel[grown[s]].min()) >= 2.0 and float(channel[~grown[s]].max()) <= -2.0
    assert grown[-8.0][8:14, 8:14, 8:14].all()
    steps = sorted(grown)
    for small, large in zip(steps, steps[1:], strict=False):  # a larger offset grows a superset
        assert not (grown[small] & ~grown[large]).any()
    from scipy import ndimage
    distance = ndimage.distance_transform_edt(~grown[-8.0])
    assert distance[grown[0.0]].max() <= 3.0  # nearest first: doubling a 6^3 cube reaches about 1.3 voxels out
    empty = torch.zeros_like(features)
    assert float(model._grown_core(empty, torch.tensor([0.0]), tissue).max()) == -30.0  # no core, no growth


def test_growth_by_volume_in_the_network_follows_onset_and_matches_sampling() -> None:
    model = _volume_model()
    image, _, _, flair = _inputs((16, 16, 16))
    image[:, 1] = 1.0  # ADC > 0 everywhere: all tissue
    image[:, 1, :, :, :2] = 0.0  # but two slabs without tissue
    with torch.no_grad():
        model.growth.untreated.fill_(-0.1)  # softplus(-1) = 0.31 per knot: s from about 0.3 (1 h) to 3 (20 h)
        model.growth.bias.fill_(-0.1)

    def clinical(hours: float):
        values, missing = encode(validate({"onset_to_imaging_h": hours, "treatment": "none"}))
        return torch.from_numpy(values)[None], torch.from_numpy(missing)[None]

    with torch.no_grad():
        feats = model.features(image, *clinical(1.0), flair)["features"]
        core = model.head(feats[:, :-1])[0, 0] > 0
        if not bool(core.any()):  # give the random network a core of its own
            model.head.bias.fill_(float(-model.head(feats[:, :-1]).flatten().kthvalue(4000).values))
        early = model(image, *clinical(1.0), flair)["logits"]
        late = model(image, *clinical(20.0), flair)["logits"]
        assert int((late > 0).sum()) > int((early > 0).sum()) > 0
        assert not bool(((early > 0) & ~(late > 0)).any())
        core_late = model(image, *clinical(20.0), flair)["core_logits"]
        assert torch.equal(late[..., :2] > 0, core_late[..., :2] > 0)  # no growth outside the tissue
        feats = model.features(image, *clinical(20.0), flair)["features"]
        torch.testing.assert_close(model.sample_logits(feats, 2, deterministic=True)[0], late[:, 0],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="growth_volume"):
        tiny_config(growth_volume=True)
    with pytest.raises(ValueError, match="growth_volume"):
        tiny_config(growth=True, growth_volume=True, growth_reach=2)


def test_growth_by_volume_into_parenchyma_leaves_csf_out() -> None:
    image, _, _, _ = _inputs((16, 16, 16))
    image[:, 1] = 0.8  # white and grey matter
    image[:, 1, :, :, 10:12] = 3.0  # a CSF slab (free water)
    flair = torch.zeros(image.shape[0], dtype=torch.bool)
    everywhere = _volume_model().encode_image(image, flair).tissue
    parenchyma = _volume_model(growth_tissue_adc_max=1.5).encode_image(image, flair).tissue
    assert everywhere.all()
    assert not parenchyma[..., 10:12].any() and parenchyma[..., :10].all() and parenchyma[..., 12:].all()
    with pytest.raises(ValueError, match="growth_tissue_adc_max"):
        tiny_config(growth_tissue_adc_max=1.5)  # only for growth by volume
    with pytest.raises(ValueError, match="growth_tissue_adc_max"):
        tiny_config(growth=True, growth_volume=True, growth_tissue_adc_max=-1.0)


def test_growth_by_volume_seeds_from_the_core_above_its_seed_probability() -> None:
    features = torch.zeros(1, tiny_config().head_channels, 24, 24, 24)
    features[0, 0, 8:14, 8:14, 8:14] = 0.45  # core logit 20 x 0.45 - 10 = -1: probability 0.27
    features[0, 0, 10:12, 10:12, 10:12] = 0.48  # logit -0.4: probability 0.40
    grown = {}
    for seed in (0.5, 0.35, 0.2):
        model = _volume_model(growth_seed_probability=seed)
        grown[seed] = int((model._grown_core(features, torch.tensor([0.0]), None)[0, 0] > 0).sum())
    assert grown[0.5] == 0  # nothing reaches 0.5: nothing grows
    assert grown[0.35] == 2 * 8  # the 8-voxel centre and as much again
    assert grown[0.2] == 2 * 216  # the whole 6^3 cube and as much again
    with pytest.raises(ValueError, match="growth_seed_probability"):
        tiny_config(growth_seed_probability=0.3)  # only for growth by volume
    with pytest.raises(ValueError, match="growth_seed_probability"):
        tiny_config(growth=True, growth_volume=True, growth_seed_probability=1.0)


def test_growth_by_volume_grows_a_given_seed_and_mirrors_exactly() -> None:
    model = _volume_model()
    features = torch.zeros(1, tiny_config().head_channels, 20, 24, 22)
    features[0, 0, 4:8, 4:8, 4:8] = 1.0  # the deterministic core: a 64-voxel cube
    seed = torch.zeros(1, 20, 24, 22, dtype=torch.bool)
    seed[0, 12:15, 14:17, 13:17] = True  # the reported core elsewhere: 36 voxels
    tissue = torch.ones_like(seed)
    tissue[0, :, :, :3] = False
    tokens = None
    values, missing = torch.zeros(1, 10), torch.ones(1, 10, dtype=torch.bool)
    with torch.no_grad():
        model.growth.bias.fill_(math.log(math.expm1(math.log(2.0))))  # s = 0.69 whatever the values: doubling
        offset = model.growth(tokens, values, missing)
        channel = model.growth_channel(features, tokens, values, missing, tissue, seed=seed)[0, 0]
        mirrored = model.growth_channel(features.flip(-1), tokens, values, missing, tissue.flip(-1),
                                        seed=seed.flip(-1))[0, 0]
    grown = channel > 0
    assert int(grown.sum()) == 36 + round(36 * math.exp(float(offset)))  # the seed and exp(s) of it
    assert bool(grown[seed[0]].all()) and not bool(grown[4:8, 4:8, 4:8].any())  # the seed grows, not the core
    torch.testing.assert_close(mirrored, channel.flip(-1))  # the growth is left-right symmetric: one map serves both
    sampled = model.sample_logits(features, 2, deterministic=True, core_only=True)[0]
    torch.testing.assert_close(sampled, model.head(features)[:, 0])  # the core head alone, no growth channel
    plain = StrokeNet(tiny_config(growth=True)).eval()
    with pytest.raises(ValueError, match="growth by volume"):
        plain.growth_channel(features, None, values, missing, seed=seed)


def test_growth_alone_outputs_the_grown_seed_and_nothing_of_the_core_head_beside_it() -> None:
    torch.manual_seed(17)
    alone = _volume_model(growth_alone=True)
    added = _volume_model()
    features = torch.zeros(1, tiny_config().head_channels, 20, 24, 22)
    features[0, 0, 4:8, 4:8, 4:8] = 1.0  # the core head's confident core, away from the seed
    features[0, 1:] = torch.randn(tiny_config().head_channels - 1, 20, 24, 22)  # for dropout to act on
    seed = torch.zeros(1, 20, 24, 22, dtype=torch.bool)
    seed[0, 12:15, 14:17, 13:17] = True
    values, missing = torch.zeros(1, 10), torch.ones(1, 10, dtype=torch.bool)
    with torch.no_grad():
        for model in (alone, added):
            model.growth.bias.fill_(math.log(math.expm1(math.log(2.0))))  # s = log 2: doubling
        channel = alone.growth_channel(features, None, values, missing, seed=seed)
        full = torch.cat([features, channel], dim=1)
        generator = torch.Generator().manual_seed(3)
        samples = alone.sample_logits(full, 5, generator)
        both = added.sample_logits(full, 5, torch.Generator().manual_seed(3))
        logits, core = alone._tail(full)
    assert samples.shape == (5, 1, 20, 24, 22)
    for sample in samples:  # every sample is the grown seed: dropout does not act on it
        torch.testing.assert_close(sample, channel[:, 0])
    assert int((samples[0] > 0).sum()) == 2 * 36 and not bool((samples[0] > 0)[0, 4:8, 4:8, 4:8].any())
    assert bool((both[0] > 0)[0, 4:8, 4:8, 4:8].all())  # without the option the core head's core is added
    torch.testing.assert_close(logits, channel)  # forward (training) agrees with the samples
    torch.testing.assert_close(alone.sample_logits(full[:, :-1], 2, deterministic=True, core_only=True)[0],
                               alone.head(features)[:, 0])  # the core head alone is unchanged (the growth seed)
    assert core is not None
    with pytest.raises(ValueError, match="growth_alone"):
        tiny_config(growth=True, growth_alone=True)  # only for growth by volume


def test_a_clinically_blind_twin_ignores_every_clinical_value() -> None:
    torch.manual_seed(16)
    blind = StrokeNet(tiny_config(growth=True, growth_volume=True, clinical_blind=True)).eval()
    assert blind.offset_features == () and not blind.growth.clinical
    seeing = StrokeNet(tiny_config(growth=True, growth_volume=True)).eval()
    from StrokePredictorLib.network import load_weights
    load_weights(blind, {k: v for k, v in seeing.state_dict().items() if not k.startswith("growth.")})
    image, values, missing, flair = _inputs((16, 16, 16))
    other = _inputs((16, 16, 16), age=30, nihss=2, onset_to_imaging_h=20, treatment="none")
    with torch.no_grad():
        first = blind(image, values, missing, flair)
        second = blind(image, other[1], other[2], flair)
        everything_missing = seeing(image, values, torch.ones_like(missing), flair)
    torch.testing.assert_close(first["logits"], second["logits"])
    # the same imaging path as the fusion network with every value missing (its growth head aside)
    torch.testing.assert_close(first["feature_attention"], everything_missing["feature_attention"])
    with pytest.raises(ValueError, match="clinical_blind"):
        tiny_config(clinical_blind=True, imaging_only=True)
