"""``python -m Training interpolate``: a bundle whose weights lie between two bundles (WiSE-FT).

    python -m Training interpolate --start BASE --end FINETUNED --alpha 0.5 --out BUNDLE

Weight-space ensembling of a model and its fine-tuned version (Wortsman et al., "Robust fine-tuning
of zero-shot models", CVPR 2022): ``w = (1 - alpha) * w_start + alpha * w_end``, parameter by
parameter (buffers too). Fine-tuning on a narrower or harder distribution often loses what the base
model did well; an intermediate ``alpha`` frequently keeps the gains of both at no cost at inference.
Both bundles must share the architecture, task, grid and normalisation; choose ``alpha`` on
validation data (``python -m Training postprocess`` reports a score per bundle), never on test or
real validation cases. The new bundle records both parents and ``alpha`` under ``data.training``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from StrokePredictorLib.errors import StrokePredictorError
from Training import config as config_mod

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterpolateConfig:
    """Options of ``python -m Training interpolate``."""

    start: Path | None = field(default=None, metadata={"help": "bundle at alpha = 0 (e.g. the base model)"})
    end: Path | None = field(default=None, metadata={"help": "bundle at alpha = 1 (e.g. its fine-tuned version)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of --end, between 0 and 1"})
    out: Path | None = field(default=None, metadata={"help": "bundle folder to write"})
    name: str = field(default="", metadata={"help": "bundle name (default: the --end bundle's)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the weights and model.json of an existing "
                                                              "bundle (any other folder is refused)"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie between 0 and 1, got {self.alpha}")


def interpolate(config: InterpolateConfig) -> Path:
    """Write the interpolated bundle; returns its folder.

    Raises:
        StrokePredictorError: missing options or bundles that cannot be interpolated.
    """
    import torch

    from StrokePredictorLib.bundle import load_bundle, save_bundle
    from StrokePredictorLib.network import StrokeNet

    if config.start is None or config.end is None or config.out is None:
        raise StrokePredictorError("--start, --end and --out are required.")
    from StrokePredictorLib.bundle import check_bundle_destination

    check_bundle_destination(config.out, config.overwrite)  # before any work; --overwrite replaces only a bundle
    start, end = load_bundle(config.start), load_bundle(config.end)
    for what, a, b in (("architecture", start.config.to_dict(), end.config.to_dict()), ("task", start.task, end.task),
                       ("grid", start.grid.to_dict(), end.grid.to_dict()),
                       ("normalization", start.normalization.to_dict(), end.normalization.to_dict())):
        if a != b:
            raise StrokePredictorError(f"{config.start} and {config.end} differ in their {what}; "
                                       "only bundles of the same model can be interpolated.")
    alpha = float(config.alpha)
    start_state, end_state = start.model.state_dict(), end.model.state_dict()
    mixed = {}
    for key, value in end_state.items():
        if value.is_floating_point():
            mixed[key] = torch.lerp(start_state[key].float(), value.float(), alpha).to(value.dtype)
        else:  # integer buffers (e.g. counters) come from the end bundle
            mixed[key] = value
    model = StrokeNet(end.config)
    model.load_state_dict(mixed)
    model.eval()
    data = json.loads(json.dumps(end.metadata.get("data", {})))
    data.setdefault("training", {})["interpolated"] = {
        "method": "WiSE-FT weight-space interpolation: (1 - alpha) * start + alpha * end",
        "alpha": alpha, "start_sha256": start.sha256, "end_sha256": end.sha256,
        "start": start.name, "end": end.name,
    }
    metrics = {"note": "interpolated weights: the parents' validation metrics do not apply"}
    directory = save_bundle(config.out, model, task=end.task, grid=end.grid, normalization=end.normalization,
                            data=data, metrics=metrics, overwrite=config.overwrite, name=config.name or end.name,
                            version=end.version, growth_seed=end.growth_seed)  # a design choice, not searched
    logger.info("Interpolated %s and %s at alpha %.2f into %s.", start.name, end.name, alpha, directory)
    return directory


def main(argv: list[str]) -> int:
    config = config_mod.parse(InterpolateConfig, argv, __doc__.split("\n")[0], prog="python -m Training interpolate")
    directory = interpolate(config)
    config_mod.save(config, Path(directory) / "interpolate_config.json")
    print(json.dumps({"bundle": str(directory)}))
    return 0
