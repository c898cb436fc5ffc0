"""``python -m Training fit-growth``: fit a bundle's clinical growth head on frozen imaging features.

The outcome network's growth head (:class:`StrokePredictorLib.network._GrowthHead`) turns the
clinical values into one offset ``s`` per case, and the outcome logit is ``logaddexp(core, risk + s)``.
Its few hundred parameters (an additive model of the clinical tokens and monotone functions of onset
time per treatment) learn slowly inside end-to-end training: AdamW moves each by about the learning
rate per step, and per patch the sign of their gradient is mostly noise. They do not need the
images' gradient, though: with the network frozen, ``core`` and ``risk`` are fixed maps and the loss
is a cheap function of ``s``. So this verb

1. renders ``--volumes`` synthetic whole volumes from the training lesions of the synthesis pack,
   each with ``--scenarios`` counterfactual onset-time/treatment scenarios besides the observed one
   and their simulated final infarcts (:class:`Training.synthesis.pool.Renderer`);
2. runs the frozen network once per volume and scenario (deterministic, no dropout) and keeps the
   ``core`` and ``risk`` logits and the target inside the brain;
3. fits only the growth head, full batch, with Adam (``--steps``, ``--lr``) on the training loss
   (soft Dice + binary cross-entropy per case), with clinical features dropped at random
   (``--clinical-drop-p``) so that a missing field keeps a sensible default;
4. reports the loss, Dice and predicted/true volume ratio before and after on ``--val-volumes``
   volumes rendered from the held-out validation lesions, and writes the bundle to ``--out`` with
   the fitted head (everything else, post-processing included, copied).

For an imaging-only twin (``imaging_only``) only the constant offset is fitted: the paired
ablation compares twins given the same fit.

``--volume`` builds an outcome network that grows by volume
(:class:`StrokePredictorLib.network.NetworkConfig` ``growth_volume``: the deterministic core grown
outward, nearest tissue first, by ``exp(s)`` times its volume) from ``--bundle`` (an acute bundle:
its head becomes the core; or an outcome bundle, whose risk map and growth head are dropped), and
fits its growth head by least squares on ``log(final / core volume)``: the growth needs no image,
so it is fitted on ``--samples`` label samples of the training lesions
(:class:`Training.synthesis.gpu_synth.LabelSampler`, the training recipe's lesions, showers and
clinical values), each under its observed and ``--scenarios`` counterfactual onset/treatment
scenarios, with clinical drop-out. ``--twin-out`` also writes the ablation twin: the same weights
run clinically blind (``clinical_blind``: every clinical value missing), its growth the constant
fitted by the same regression. The report gives the error of the log volume ratio on
``--val-samples`` label samples of the validation lesions, before and after. With
``--seed-reported`` both bundles grow from the core the source bundle reports: its post-processing
block is stored as their ``growth_seed`` (:attr:`StrokePredictorLib.bundle.Bundle.growth_seed`), or the
block in ``--seed-block`` (a searched ``postprocess.json``: run g27 grew from the acute weights' score-optimal
block while the acute bundle shows a guarded one). ``--alone``: the outcome is the grown core alone
(``growth_alone``), without the core head's samples beside it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from Training import config as cfg

logger = logging.getLogger(__name__)

#: ``--volume``: every this many steps (and at the last) the fit's error on the whole training set, without
#: drop-out, is measured and the best parameters so far kept, so that a fit that overshoots (full-batch Adam
#: at too high a rate: fit-growth's lr 0.02 from the cpu17 acute weights ended at twice its starting error)
#: returns its best step, never a worse one than it started from.
KEEP_EVERY = 25


@dataclass(frozen=True)
class FitGrowthConfig:
    bundle: Path | None = field(default=None, metadata={"help": "outcome bundle with a growth head (required)"})
    pack: Path = field(default=Path("pack.npz"), metadata={"help": "synthesis pack (python -m Training synthpack)"})
    out: Path | None = field(default=None, metadata={"help": "bundle folder to write (required)"})
    volumes: int = field(default=32, metadata={"help": "training volumes rendered (training lesions)"})
    val_volumes: int = field(default=12, metadata={"help": "held-out volumes for the before/after report"})
    val_subset: str = field(default="val", metadata={
        "help": "lesions of the report's volumes: val (held out), or train for smoke tests on a tiny pack"})
    scenarios: int = field(default=3, metadata={"help": "counterfactual onset/treatment scenarios per volume"})
    steps: int = field(default=300, metadata={"help": "full-batch Adam steps"})
    lr: float = field(default=0.02, metadata={"help": "Adam learning rate of the growth head's parameters"})
    clinical_drop_p: float = field(default=0.2, metadata={"help": "per-feature clinical drop-out during the fit"})
    seed: int = field(default=0, metadata={"help": "seed of the rendering and the drop-out"})
    heads: bool = field(default=False, metadata={
        "help": "also refit the two 1x1x1 heads on the frozen features: core on the acute lesion (so that it is the "
                "core, not the final infarct) and risk with the growth offset on the final infarct"})
    overwrite: bool = field(default=False, metadata={"help": "replace the weights of an existing bundle at --out"})
    volume: bool = field(default=False, metadata={
        "help": "build a growth-by-volume outcome network from --bundle (acute or outcome) and fit its growth head "
                "by regression of log(final / core volume) on label samples (see the module docstring)"})
    samples: int = field(default=1500, metadata={"help": "with --volume: label samples of the training lesions"})
    val_samples: int = field(default=300, metadata={"help": "with --volume: label samples of the validation lesions"})
    twin_out: Path | None = field(default=None, metadata={
        "help": "with --volume: also write the clinically blind twin (constant growth) here"})
    seed_probability: float = field(default=0.5, metadata={
        "help": "with --volume: the core grows from where its probability is at least this (the acute bundle's "
                "threshold, e.g. 0.3, so that every core the acute model reports grows)"})
    seed_reported: bool = field(default=False, metadata={
        "help": "with --volume: grow from the core the acute model reports (its Monte-Carlo mean, flip-averaged "
                "probability under --bundle's own post-processing block, stored as the outcome bundle's growth_seed) "
                "instead of the deterministic core; the regression reads labels only and is the same"})
    seed_block: Path | None = field(default=None, metadata={
        "help": "with --seed-reported: the block that turns the core into the seed, from this JSON file (its "
                "'postprocessing' object: a postprocess.json or model.json) instead of --bundle's own"})
    alone: bool = field(default=False, metadata={
        "help": "with --volume: the outcome is the grown core alone (growth_alone), not added to the core head's "
                "Monte-Carlo samples"})
    tissue_adc_max: float = field(default=0.0, metadata={
        "help": "with --volume: grow only into parenchyma, where the ADC is below this (10^-3 mm^2/s; 1.5 keeps grey "
                "and white matter and leaves out CSF, as the simulation's penumbra does); 0: wherever ADC > 0"})


@dataclass
class _Item:
    """One volume under one clinical scenario, inside the brain."""

    features: torch.Tensor  # (C, V) float32: the decoder's output before the 1x1x1 heads
    acute: torch.Tensor  # (V,) float32 0/1
    target: torch.Tensor  # (V,) float32 0/1: the final infarct of this scenario
    values: torch.Tensor  # (10,)
    missing: torch.Tensor  # (10,) bool


def _items(model: torch.nn.Module, volumes: list) -> list[_Item]:
    """Frozen decoder features of every volume under each of its scenarios (observed first)."""
    items = []
    with torch.no_grad():  # not inference_mode: the fit computes gradients through these tensors
        for volume in volumes:
            image = torch.from_numpy(volume.image.astype(np.float32))[None]
            encoded = model.encode_image(image, torch.tensor([volume.flair_present]))
            brain = torch.from_numpy(volume.brain).flatten()
            acute = torch.from_numpy(volume.acute).flatten()[brain].float()
            scenarios = [(volume.clinical_values, volume.clinical_missing, volume.outcome), *volume.scenarios]
            for values, missing, outcome in scenarios:
                values_t = torch.from_numpy(np.asarray(values, np.float32))
                missing_t = torch.from_numpy(np.asarray(missing, bool))
                features = model.decode(encoded, values_t[None], missing_t[None])["features"][:, :-1]
                target = torch.from_numpy(np.asarray(outcome, bool)).flatten()[brain].float()
                items.append(_Item(features.float().flatten(2)[0][:, brain], acute, target, values_t, missing_t))
    return items


def _head(conv: torch.nn.Conv3d, features: torch.Tensor) -> torch.Tensor:
    return (conv.weight.reshape(1, -1) @ features)[0] + conv.bias


def _dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probability = torch.sigmoid(logits)
    dice = 1 - (2 * (probability * target).sum() + 1) / (probability.sum() + target.sum() + 1)
    return dice + F.binary_cross_entropy_with_logits(logits, target)


def _loss(model: torch.nn.Module, items: list[_Item], drop_p: float, generator: torch.Generator | None,
          core_weight: float = 0.0) -> tuple[torch.Tensor, list[dict]]:
    """Mean soft Dice + BCE of the outcome over ``items`` (plus ``core_weight`` times that of the core
    head against the acute lesion), and per-item statistics."""
    values = torch.stack([i.values for i in items])
    missing = torch.stack([i.missing for i in items])
    if drop_p > 0 and generator is not None:
        missing = missing | (torch.rand(missing.shape, generator=generator) < drop_p)
        values = values * ~missing
    tokens = model.clinical(values, missing) if model.clinical is not None else None
    offsets = model.growth(tokens, values, missing)
    losses, stats = [], []
    for item, offset in zip(items, offsets, strict=True):
        core = _head(model.head, item.features)
        logits = torch.logaddexp(core, _head(model.risk, item.features) + offset)
        loss = _dice_bce(logits, item.target)
        if core_weight > 0:
            loss = loss + core_weight * _dice_bce(core, item.acute)
        losses.append(loss)
        predicted = float((logits > 0).sum())
        truth = float(item.target.sum())
        hard = 2 * float(((logits > 0) & (item.target > 0.5)).sum()) / max(predicted + truth, 1.0)
        stats.append({"dice": hard if predicted + truth > 0 else 1.0, "predicted": predicted, "truth": truth})
    return torch.stack(losses).mean(), stats


def _summary(loss: torch.Tensor, stats: list[dict]) -> dict:
    ratios = [(s["predicted"] + 50) / (s["truth"] + 50) for s in stats]  # 50 voxels = 0.4 mL of slack
    return {"loss": round(float(loss), 4), "dice": round(float(np.mean([s["dice"] for s in stats])), 4),
            "median_volume_ratio": round(float(np.median(ratios)), 3)}


def fit(config: FitGrowthConfig) -> dict:
    from StrokePredictorLib.bundle import load_bundle, save_bundle
    from StrokePredictorLib.io import write_json
    from Training.synthesis.pool import Renderer

    if config.bundle is None or config.out is None:
        raise cfg.ConfigError("--bundle and --out are required.")
    bundle = load_bundle(config.bundle)
    model = bundle.model.eval().float()
    if not bundle.config.growth or bundle.task != "outcome":
        raise cfg.ConfigError(f"Bundle {config.bundle} has no growth head (train-synth --growth; task outcome).")
    out = Path(config.out)
    if (out / "model.json").exists() and not config.overwrite:
        raise cfg.ConfigError(f"{out} holds a bundle already; pass --overwrite to replace its weights.")
    started = time.perf_counter()
    rendered = {}
    for name, subset, count, offset in (("train", "train", config.volumes, 0),
                                        ("val", config.val_subset, config.val_volumes, 1)):
        renderer = Renderer(config.pack, bundle.grid.size, subset=subset, seed=config.seed * 2 + offset,
                            scenarios=config.scenarios)
        volumes = []
        while len(volumes) < count:
            volumes.extend(renderer.render(min(2, count - len(volumes))))
        rendered[name] = _items(model, volumes)
        logger.info("fit-growth: %d %s volume(s) x %d scenario(s) rendered and encoded", count, name,
                    config.scenarios + 1)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    fitted = list(model.growth.parameters())
    if config.heads:
        fitted += [*model.head.parameters(), *model.risk.parameters()]
    core_weight = 1.0 if config.heads else 0.0
    for parameter in fitted:
        parameter.requires_grad_(True)
    report = {}
    with torch.no_grad():
        report["before"] = {s: _summary(*_loss(model, items, 0.0, None)) for s, items in rendered.items()}
    optimiser = torch.optim.Adam(fitted, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    for step in range(config.steps):
        optimiser.zero_grad()
        loss, _ = _loss(model, rendered["train"], config.clinical_drop_p, generator, core_weight)
        loss.backward()
        optimiser.step()
        if step % 50 == 0:
            logger.info("fit-growth: step %d loss %.4f", step, float(loss.detach()))
    with torch.no_grad():
        report["after"] = {s: _summary(*_loss(model, items, 0.0, None)) for s, items in rendered.items()}
    report.update({"steps": config.steps, "volumes": config.volumes, "val_volumes": config.val_volumes,
                   "scenarios": config.scenarios, "lr": config.lr, "heads": config.heads,
                   "seconds": round(time.perf_counter() - started, 1),
                   "source": str(config.bundle)})
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    metadata = bundle.metadata
    save_bundle(out, model, task=bundle.task, grid=bundle.grid, normalization=bundle.normalization,
                data={**metadata.get("data", {}), "growth_fit": report}, metrics=metadata.get("metrics", {}),
                overwrite=config.overwrite, name=bundle.name, version=bundle.version,
                postprocessing=bundle.postprocessing)
    write_json(report, out / "fit_growth.json", overwrite=True)
    logger.info("fit-growth: before %s, after %s; wrote %s", report["before"], report["after"], out)
    return report


def volume_samples(pack: object, subset: str, count: int, scenarios: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` label samples of ``subset`` with a lesion, each under its observed and ``scenarios``
    counterfactual scenarios: clinical ``values`` (N, 10), ``missing`` (N, 10) and ``log_ratio`` (N,),
    the log of the final infarct's volume over the acute core's (template grid, fractions >= 0.5)."""
    from Training.synthesis.gpu_synth import LabelSampler

    sampler = LabelSampler(pack, subset=subset, seed=seed, scenarios=scenarios)  # type: ignore[arg-type]
    values, missing, ratios = [], [], []
    index = 0
    while len(ratios) < count * (scenarios + 1):
        item = sampler[index]
        index += 1
        core = float((np.asarray(item["lesion"]) >= 0.5).sum())
        if core == 0:
            continue
        outcomes = [item["outcome"], *item.get("outcome_alt", [])]
        clinical = [(item["clinical_values"], item["clinical_missing"])] + [
            (v, m) for v, m in zip(item.get("clinical_values_alt", []), item.get("clinical_missing_alt", []),
                                   strict=True)]
        for outcome, (v, m) in zip(outcomes, clinical, strict=True):
            values.append(np.asarray(v, np.float32))
            missing.append(np.asarray(m, bool))
            ratios.append(math.log(max(float((np.asarray(outcome) >= 0.5).sum()), core) / core))
    return {"values": np.stack(values), "missing": np.stack(missing), "log_ratio": np.asarray(ratios, np.float32)}


def _volume_loss(model: torch.nn.Module, data: dict[str, torch.Tensor], drop_p: float,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error of the predicted log volume ratio ``log(1 + exp(s))``, and the predictions."""
    values, missing = data["values"], data["missing"]
    if drop_p > 0 and generator is not None:
        missing = missing | (torch.rand(missing.shape, generator=generator) < drop_p)
        values = values * ~missing
    missing = model.seen_missing(missing)
    tokens = model.clinical(values, missing) if model.clinical is not None else None
    predicted = F.softplus(model.growth(tokens, values, missing))
    return ((predicted - data["log_ratio"]) ** 2).mean(), predicted


def fit_volume(config: FitGrowthConfig) -> dict:
    """``--volume``: build the growth-by-volume outcome network (and its blind twin) and fit their growth."""
    import dataclasses

    from StrokePredictorLib.bundle import load_bundle, save_bundle
    from StrokePredictorLib.io import write_json
    from StrokePredictorLib.network import StrokeNet, load_weights
    from StrokePredictorLib.postprocess import read_block
    from Training.synthesis.gpu_synth import Pack

    if config.bundle is None or config.out is None:
        raise cfg.ConfigError("--bundle and --out are required.")
    if config.samples < 1 or config.val_samples < 1:
        raise cfg.ConfigError("--samples and --val-samples must be >= 1.")
    if not 0 < config.seed_probability < 1:
        raise cfg.ConfigError(f"--seed-probability must lie in (0, 1), not {config.seed_probability}.")
    if config.seed_reported and config.seed_probability != 0.5:
        raise cfg.ConfigError("--seed-reported takes the seed from --bundle's post-processing block; leave "
                              "--seed-probability at its default.")
    if config.tissue_adc_max < 0:
        raise cfg.ConfigError(f"--tissue-adc-max must be >= 0 (0: wherever ADC > 0), not {config.tissue_adc_max}.")
    if config.seed_block is not None and not config.seed_reported:
        raise cfg.ConfigError("--seed-block is a setting of --seed-reported (the block the core is read with).")
    chosen_seed = read_block(config.seed_block, "--seed-block") if config.seed_block is not None else None
    base = load_bundle(config.bundle)
    tissue_adc_max = config.tissue_adc_max * base.normalization.adc_scale / 1000.0  # in the network's ADC units
    if base.config.imaging_only:
        raise cfg.ConfigError(f"Bundle {config.bundle} is imaging-only; growth by volume needs the clinical branch.")
    targets = [(Path(config.out), False)] + ([(Path(config.twin_out), True)] if config.twin_out else [])
    for folder, _ in targets:
        if (folder / "model.json").exists() and not config.overwrite:
            raise cfg.ConfigError(f"{folder} holds a bundle already; pass --overwrite to replace it.")
    started = time.perf_counter()
    pack = Pack.load(config.pack)
    data = {name: {k: torch.from_numpy(v) for k, v in volume_samples(pack, subset, count, config.scenarios,
                                                                      config.seed * 2 + offset).items()}
            for name, subset, count, offset in (("train", "train", config.samples, 0),
                                                ("val", config.val_subset, config.val_samples, 1))}
    logger.info("fit-growth --volume: %d training and %d validation scenarios", len(data["train"]["log_ratio"]),
                len(data["val"]["log_ratio"]))
    state = {k: v for k, v in base.model.state_dict().items() if not k.startswith(("risk.", "growth."))}
    seed_block = None
    if config.seed_reported:  # the block the core is read with: --seed-block's, else --bundle's own
        block, origin = ((chosen_seed, f"the block in {config.seed_block} with the weights of")
                         if chosen_seed is not None else (base.postprocessing, "the post-processing of"))
        seed_block = block.replace(volume_log_margin=0.0, selected_on=(
            f"{origin} {config.bundle} (sha256 {base.sha256[:12]}): the growth seeds from the core it reports"))
    reports = {}
    for folder, blind in targets:
        network = dataclasses.replace(base.config, growth=True, growth_volume=True, growth_reach=0,
                                      clinical_blind=blind, growth_tissue_adc_max=tissue_adc_max,
                                      growth_seed_probability=config.seed_probability, growth_alone=config.alone)
        torch.manual_seed(config.seed)  # the growth head's initial weights: the same run, the same fit
        model = StrokeNet(network)
        load_weights(model, state)
        model.eval().float()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        fitted = list(model.growth.parameters())
        for parameter in fitted:
            parameter.requires_grad_(True)
        optimiser = torch.optim.Adam(fitted, lr=config.lr)
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            before = {name: float(_volume_loss(model, d, 0.0, None)[0]) for name, d in data.items()}
        best = (before["train"], 0, [parameter.detach().clone() for parameter in fitted])
        for step in range(1, config.steps + 1):
            optimiser.zero_grad()
            loss, _ = _volume_loss(model, data["train"], config.clinical_drop_p, generator)
            loss.backward()
            optimiser.step()
            if step % 100 == 0:
                logger.info("fit-growth --volume%s: step %d loss %.4f", " (twin)" if blind else "", step,
                            float(loss.detach()))
            if step % KEEP_EVERY == 0 or step == config.steps:  # keep the best fit of the whole training set
                with torch.no_grad():
                    whole = float(_volume_loss(model, data["train"], 0.0, None)[0])
                if whole < best[0]:
                    best = (whole, step, [parameter.detach().clone() for parameter in fitted])
        with torch.no_grad():
            for parameter, kept in zip(fitted, best[2], strict=True):
                parameter.copy_(kept)
        if best[1] < config.steps:
            logger.warning("fit-growth --volume%s: the fit was best at step %d of %d (training error %.4f); that "
                           "step is kept%s", " (twin)" if blind else "", best[1], config.steps, best[0],
                           " (no step improved on the start: try a smaller --lr)" if best[1] == 0 else "")
        with torch.no_grad():
            after = {name: float(_volume_loss(model, d, 0.0, None)[0]) for name, d in data.items()}
            _, predicted = _volume_loss(model, data["val"], 0.0, None)
        truth = data["val"]["log_ratio"]
        report = {"mse_log_ratio_before": {k: round(v, 4) for k, v in before.items()},
                  "mse_log_ratio_after": {k: round(v, 4) for k, v in after.items()},
                  "val_median_ratio_true": round(float(torch.exp(truth).median()), 3),
                  "val_median_ratio_predicted": round(float(torch.exp(predicted).median()), 3),
                  "val_correlation": round(float(np.corrcoef(predicted.numpy(), truth.numpy())[0, 1]), 3)
                  if float(predicted.std()) > 1e-6 else None,  # None: a constant (the twin)
                  "clinical_blind": blind, "samples": config.samples, "val_samples": config.val_samples,
                  "scenarios": config.scenarios, "steps": config.steps, "best_step": best[1], "lr": config.lr,
                  "clinical_drop_p": config.clinical_drop_p, "seed": config.seed, "source": str(config.bundle),
                  "tissue_adc_max": config.tissue_adc_max, "seed_probability": config.seed_probability,
                  "seed_reported": config.seed_reported, "alone": config.alone,
                  "seed_block": str(config.seed_block) if config.seed_block is not None else None,
                  "source_sha256": base.sha256, "seconds": round(time.perf_counter() - started, 1)}
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        save_bundle(folder, model, task="outcome", grid=base.grid, normalization=base.normalization,
                    data={**base.metadata.get("data", {}), "growth_fit": report}, metrics={},
                    overwrite=config.overwrite, name="strokepredictor-outcome" + ("-blind" if blind else ""),
                    version=base.version, postprocessing=base.postprocessing, growth_seed=seed_block)
        write_json(report, folder / "fit_growth.json", overwrite=True)
        logger.info("fit-growth --volume: wrote %s: %s", folder, report)
        reports["twin" if blind else "fusion"] = report
    return reports


def main(argv: list[str]) -> int:
    config = cfg.parse(FitGrowthConfig, argv, "Fit an outcome bundle's clinical growth head on frozen imaging "
                       "features.", prog="python -m Training fit-growth")
    for flag, value in (("--seed-reported", config.seed_reported), ("--alone", config.alone)):
        if value and not config.volume:
            raise cfg.ConfigError(f"{flag} is a setting of --volume (growth by volume).")
    if config.volume:
        print(json.dumps({"bundle": str(config.out), **fit_volume(config)}))
        return 0
    report = fit(config)
    print(json.dumps({"bundle": str(config.out), "before": report["before"], "after": report["after"]}))
    return 0
