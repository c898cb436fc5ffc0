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
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from Training import config as cfg

logger = logging.getLogger(__name__)


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


def main(argv: list[str]) -> int:
    config = cfg.parse(FitGrowthConfig, argv, "Fit an outcome bundle's clinical growth head on frozen imaging "
                       "features.", prog="python -m Training fit-growth")
    report = fit(config)
    print(json.dumps({"bundle": str(config.out), "before": report["before"], "after": report["after"]}))
    return 0
