"""``python -m Training export``: the best checkpoint of a run -> a model bundle for Slicer.

The bundle (``weights.safetensors`` + ``model.json``) is written by
:func:`StrokePredictorLib.bundle.save_bundle` with the task, model grid and normalisation of the
run's cache, the measured validation metrics and a description of the training data.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from Training import config as configlib
from Training.data.dataset import CacheError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """Configuration of ``python -m Training export``."""

    run: Path = field(default=Path("runs/run"), metadata={"help": "run folder of python -m Training train"})
    out: Path = field(default=Path("bundle"), metadata={"help": "bundle folder to write"})
    name: str | None = field(default=None, metadata={"help": "bundle name (default: the folder name)"})
    checkpoint: str = field(default="best", metadata={"help": "best|last, or a checkpoint file in the run"})
    overwrite: bool = field(default=False, metadata={"help": "replace the weights and model.json of an existing "
                                                              "bundle (any other folder is refused)"})


def _checkpoint_path(config: ExportConfig) -> Path:
    if config.checkpoint in ("best", "last"):
        return Path(config.run) / "checkpoints" / f"{config.checkpoint}.pt"
    path = Path(config.checkpoint)
    return path if path.is_absolute() else Path(config.run) / path


def export(config: ExportConfig) -> Path:
    """Write the bundle; returns its folder.

    Raises:
        CacheError: the run has no such checkpoint.
        OutputExistsError: the bundle folder is not empty and ``overwrite`` is off, or it is not a
            bundle folder (then nothing is replaced even with ``overwrite``), or it cannot be written.
    """
    from StrokePredictorLib.bundle import save_bundle
    from StrokePredictorLib.network import NetworkConfig, StrokeNet
    from StrokePredictorLib.preprocess import ModelGrid, Normalization
    from Training.training.loop import load_checkpoint

    path = _checkpoint_path(config)
    if not path.is_file():
        raise CacheError(f"Run {config.run} has no checkpoint {path.name} (train first, or choose --checkpoint).")
    from StrokePredictorLib.bundle import check_bundle_destination

    check_bundle_destination(config.out, config.overwrite)  # before any work; --overwrite replaces only a bundle
    state = load_checkpoint(path)  # the user's own run folder: a training checkpoint, not a bundle
    model = StrokeNet(NetworkConfig.from_dict(state["network"]))
    model.load_state_dict(state["model"])
    model.eval()
    train_config = state["config"]
    metrics = {
        "val_dice": state["val_dice"],
        "val_loss": state["val_loss"],
        "best_val_dice": state["best_val_dice"],
        "val_threshold": train_config.get("val_threshold", 0.5),
        "split": "val",
        "n_val_cases": state["data"].get("n_cases", {}).get("val"),
    }
    # a checkpoint written between validations (every --checkpoint-minutes, or a step snapshot) has none, and
    # before the first validation the best Dice is still the loop's starting value (-1)
    metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    if metrics["best_val_dice"] is not None and metrics["best_val_dice"] < 0:
        metrics["best_val_dice"] = None
    data = dict(state["data"])
    data["training"] = {
        "epoch": state["epoch"],
        "step": state["step"],
        "checkpoint": path.name,
        "batch_size": train_config.get("batch_size"),
        "imaging_only": train_config.get("imaging_only"),
        "preset": train_config.get("preset"),
        "augment": train_config.get("augment"),
        "world_size": state.get("world_size", 1),
        "torch_version": state.get("torch_version"),
    }
    directory = save_bundle(
        config.out, model, task=state["task"], grid=ModelGrid.from_dict(state["grid"]),
        normalization=Normalization.from_dict(state["normalization"]), data=data, metrics=metrics,
        overwrite=config.overwrite, name=config.name,
    )
    logger.info("Exported %s (epoch %d, step %d, val Dice %s) to %s.", path, state["epoch"], state["step"],
                "none" if metrics["val_dice"] is None else f"{metrics['val_dice']:.4f}", directory)
    return directory


def main(argv: list[str]) -> int:
    config = configlib.parse(ExportConfig, argv, "Export a training checkpoint as a model bundle.",
                             prog="python -m Training export")
    directory = export(config)
    configlib.save(config, Path(directory) / "export_config.json")
    print(json.dumps({"bundle": str(directory)}))
    return 0
