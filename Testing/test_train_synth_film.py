"""train-synth --film: FiLM variants start from non-FiLM --init weights with the same
output; an imaging-only variant without its own bundle starts from the task bundle's imaging weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from inference_phantom import tiny_config, write_tiny_bundle

from StrokePredictorLib.bundle import LITE_GRID, load_bundle, save_bundle
from StrokePredictorLib.network import NetworkConfig, StrokeNet
from StrokePredictorLib.preprocess import Normalization
from Training import config as cfg
from Training.training.train_synth import _initialise


def _inputs(shape=(16, 24, 16)):
    generator = torch.Generator().manual_seed(0)
    values = torch.zeros(1, 10)
    values[0, 2], values[0, 3] = 0.5, -0.5
    missing = torch.zeros(1, 10, dtype=torch.bool)
    return torch.rand(1, 3, *shape, generator=generator), values, missing, torch.tensor([True])


def test_film_variant_starts_with_exactly_the_init_bundles_output(tmp_path: Path) -> None:
    write_tiny_bundle(tmp_path / "init" / "outcome", seed=2)
    old = load_bundle(tmp_path / "init" / "outcome").model.eval()
    model = StrokeNet(tiny_config(film=True))
    used = _initialise(model, tmp_path / "init", "outcome")
    assert used == tmp_path / "init" / "outcome"
    model.eval()
    with torch.no_grad():
        before, after = old(*_inputs()), model(*_inputs())
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(not bool(m.linear.weight.detach().any()) for m in model.film)


def test_imaging_variant_falls_back_to_the_task_bundles_imaging_weights(tmp_path: Path) -> None:
    write_tiny_bundle(tmp_path / "init" / "outcome", seed=3)
    fusion = load_bundle(tmp_path / "init" / "outcome").model
    imaging = StrokeNet(tiny_config(imaging_only=True))
    assert _initialise(imaging, tmp_path / "init", "outcome-imaging") == tmp_path / "init" / "outcome"
    shared = imaging.state_dict()
    assert all(torch.equal(shared[k], v) for k, v in fusion.state_dict().items() if k in shared)
    assert any(k.startswith("encoder.") for k in shared)


def test_mismatched_architectures_are_refused(tmp_path: Path) -> None:
    write_tiny_bundle(tmp_path / "init" / "outcome", seed=4, config=tiny_config(film=True))
    with pytest.raises(cfg.ConfigError, match="another architecture"):  # FiLM weights into a plain network
        _initialise(StrokeNet(tiny_config()), tmp_path / "init", "outcome")
    with pytest.raises(cfg.ConfigError, match="another architecture"):
        _initialise(StrokeNet(tiny_config(film=True, head_channels=4)), tmp_path / "init", "outcome")


def _lite_run_values(tmp_path: Path, **changes: object) -> dict:
    """A pack of fake SOOP lesions, a plain lite outcome bundle in ``tmp_path/init`` and the options
    of a tiny ``train-synth`` run from it (``changes`` override them)."""
    from test_gpu_synth import _fake_soop

    from Training.synthesis.gpu_synth import build_pack

    pack = build_pack(_fake_soop(tmp_path / "soop"), tmp_path / "pack.npz", workers=1)
    torch.manual_seed(0)
    save_bundle(tmp_path / "init" / "outcome", StrokeNet(NetworkConfig.lite()), task="outcome", grid=LITE_GRID,
                normalization=Normalization(), data={"source": "test"}, metrics={})
    values = dict(pack=pack, out=tmp_path / "run", variants=("outcome",), grid_size=(48, 64, 48), patch=(32, 32, 32),
                  batch_size=2, max_steps=1, val_every=1, val_samples=1, pool_size=2, workers=0, device="cpu",
                  source="pool", threads=2, val_subset="train", init=tmp_path / "init")
    return {**values, **changes}


@pytest.mark.slow
def test_train_synth_film_from_a_plain_lite_bundle(tmp_path: Path) -> None:
    from Training.training.train_synth import SynthTrainConfig, run

    results = run(SynthTrainConfig(**_lite_run_values(tmp_path, variants=("outcome", "outcome-imaging"), film=True)))
    assert set(results) == {"outcome", "outcome-imaging"}
    networks = {name: torch.load(tmp_path / "run" / name / "checkpoints" / "last.pt", weights_only=False)["network"]
                for name in results}
    assert networks["outcome"]["film"] is True and networks["outcome-imaging"]["film"] is False
    assert networks["outcome-imaging"]["imaging_only"] is True
    init = json.loads((tmp_path / "init" / "outcome" / "model.json").read_text())
    for name in results:  # both twins record the weights they started from
        origin = torch.load(tmp_path / "run" / name / "checkpoints" / "last.pt", weights_only=False)["data"][
            "initialised_from"]
        assert origin == {"bundle": init["name"], "version": init["version"], "sha256": init["weights"]["sha256"],
                          "step": None}


def test_growth_variants_start_from_plain_weights_and_round_trip_as_bundles(tmp_path: Path) -> None:
    """--growth: both twins take the plain bundle's weights (risk head = old head - 2); a growth network
    saved as a bundle loads back strictly, with the same output."""
    write_tiny_bundle(tmp_path / "init" / "outcome", seed=5)
    old = load_bundle(tmp_path / "init" / "outcome").model.eval()
    fusion = StrokeNet(tiny_config(growth=True))
    imaging = StrokeNet(tiny_config(growth=True, imaging_only=True))
    _initialise(fusion, tmp_path / "init", "outcome")
    _initialise(imaging, tmp_path / "init", "outcome-imaging")
    for model in (fusion, imaging):
        torch.testing.assert_close(model.risk.bias, model.head.bias - 2.0)
        assert torch.equal(model.encoder.stem[0].weight, old.encoder.stem[0].weight)
    fusion.eval()
    with torch.no_grad():
        start = fusion(*_inputs())["logits"] - old(*_inputs())["logits"]
        fusion.growth.untreated.fill_(0.1)
    assert 0.0 < float(start.min()) and float(start.max()) < 0.5
    save_bundle(tmp_path / "saved" / "outcome", fusion, task="outcome", grid=LITE_GRID, normalization=Normalization(),
                data={"source": "test"}, metrics={})
    loaded = load_bundle(tmp_path / "saved" / "outcome").model.eval()
    assert loaded.config.growth is True
    with torch.no_grad():
        assert torch.equal(loaded(*_inputs())["logits"], fusion(*_inputs())["logits"])
    with pytest.raises(cfg.ConfigError, match="another architecture"):  # growth weights into a plain network
        _initialise(StrokeNet(tiny_config()), tmp_path / "saved", "outcome")


@pytest.mark.slow
def test_train_only_growth_moves_the_growth_head_and_nothing_else(tmp_path: Path) -> None:
    from Training.training.train_synth import SynthTrainConfig, run

    values = _lite_run_values(tmp_path, max_steps=2, val_every=2, growth=True, scenarios=1, lr=1e-2,
                              growth_lr_scale=20.0, warmup=0.0)
    start = StrokeNet(NetworkConfig.from_dict({**NetworkConfig.lite().to_dict(), "growth": True}))
    _initialise(start, tmp_path / "init", "outcome")
    run(SynthTrainConfig(**values, train_only="growth"))
    trained = torch.load(tmp_path / "run" / "outcome" / "checkpoints" / "last.pt", weights_only=False)["model"]
    before = start.state_dict()
    frozen = [k for k in before if not k.startswith("growth.")]
    assert frozen and all(torch.equal(trained[k], before[k]) for k in frozen)
    assert any(not torch.equal(trained[k], before[k]) for k in before if k.startswith("growth."))
    assert all(torch.equal(trained[k], before[k]) for k in before if k.startswith("risk."))  # frozen too

    run(SynthTrainConfig(**{**values, "out": tmp_path / "risk"}, train_only="growth, risk"))
    trained = torch.load(tmp_path / "risk" / "outcome" / "checkpoints" / "last.pt", weights_only=False)["model"]
    frozen = [k for k in before if not k.startswith(("growth.", "risk."))]
    assert frozen and all(torch.equal(trained[k], before[k]) for k in frozen)
    assert all(not torch.equal(trained[k], before[k]) for k in before if k.startswith("risk."))
    for bad, match in (({"train_only": "decoder"}, "--train-only must be one of 'growth', 'growth,risk'"),
                       ({"train_only": "growth", "growth": False}, "needs --growth and --init")):
        with pytest.raises(cfg.ConfigError, match=match):
            run(SynthTrainConfig(**{**values, "out": tmp_path / "bad", **bad}))
