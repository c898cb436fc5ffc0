"""``python -m Training train``: train StrokeNet on a preprocessed cache (CPU, CUDA, torchrun).

The front end of the shared training loop (:mod:`Training.training.loop`) for the cache
(:class:`Training.training.sources.CacheSource`):

* AdamW, linear warm-up then cosine decay, gradient clipping, non-finite steps skipped.
* Loss: MONAI ``DiceCELoss`` with a sigmoid (Dice per case, plus binary cross-entropy), and with
  ``--lesion-loss W`` a per-lesion Dice term (:mod:`Training.training.losses`) for small lesions.
* Augmentation (:mod:`Training.data.dataset`): left-right flips, small rotations/scaling/shifts,
  optional elastic deformation, gamma/contrast/noise per channel, FLAIR drop-out and
  clinical-feature drop-out, picked per sample from the sample's stream position (replayable).
* bf16 autocast on CUDA and channels-last (``--precision auto``; fp32 on the CPU); optional
  deterministic mode.
* Several processes with DistributedDataParallel when started by ``torchrun``; the global batch
  of a step is the same whatever the number of processes.
* Every epoch: validation Dice on the ``val`` split, an atomically written checkpoint
  (``RUN/checkpoints/last.pt``: model, optimiser, scaler, RNG states of every process, epoch,
  step, cumulative elapsed time, config), ``best.pt`` when the validation Dice improves, a CSV
  row (``RUN/log.csv``) and TensorBoard scalars (``RUN/tensorboard``). ``last.pt`` is also
  written every ``--checkpoint-minutes`` within an epoch, so an interruption loses minutes, not
  an epoch. Early stopping after ``patience`` epochs without gain.
* ``--resume`` continues ``last.pt`` exactly where it stopped, with the run's own saved config
  (``RUN/train_config.json``): ``--out RUN --resume`` is enough. Flags given again may only
  extend the budget (``--epochs``, ``--max-steps``, ``--time-limit``; logged) or change how the
  run is carried out (device, workers, progress, checkpoint interval); any other typed value that
  differs from the saved one is refused by name. Elapsed time and steps add up across resumes
  (``elapsed_s`` in ``log.csv``, ``--time-limit`` counts the whole run).
* ``--max-steps``, ``--steps-per-epoch`` and ``--time-limit`` (seconds) fit a run into a budget;
  warm-up is a fraction of the run (``--warmup``), so it never outlasts a short one, and when the
  time limit ends the run the cosine follows the elapsed fraction of it.
* A progress line (step, loss, learning rate, seconds per step, time left) is logged at least
  every ``--progress-seconds`` (30 s), also with ``--no-progress``.

Training checkpoints are pickled (``torch.save``) and only ever loaded from the user's own run
folder; the model bundle (``python -m Training export``) is the safetensors file that is shipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from StrokePredictorLib.errors import OutputExistsError
from StrokePredictorLib.preprocess import ModelGrid, Normalization
from Training import config as configlib
from Training.data.dataset import (
    AugmentConfig,
    CacheDataset,
    CacheError,
    StreamSampler,
    load_index,
    make_loader,
    steps_per_pass,
    task_cases,
)
from Training.training import distributed as distlib
from Training.training import loop
from Training.training.loop import load_checkpoint
from Training.training.losses import with_lesion_term
from Training.training.sources import CacheSource, cache_batch

logger = logging.getLogger(__name__)
# Fields that must not change between a run and its resumption (checked against the checkpoint too).
RESUME_FIXED = ("task", "imaging_only", "preset", "network", "batch_size", "seed", "lr", "weight_decay",
                "warmup", "warmup_steps", "augment")
# Budget fields that a resumed run may extend (0 = no limit for max_steps and time_limit).
RESUME_BUDGET = ("epochs", "max_steps", "time_limit")
# Fields about how the run is carried out, not what it computes: a resumed run may change them.
RESUME_OPERATIONAL = ("device", "workers", "prefetch", "progress", "progress_seconds", "tensorboard", "log_every",
                      "checkpoint_minutes")


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of ``python -m Training train`` (saved as ``RUN/train_config.json``)."""

    cache: Path = field(default=Path("cache"), metadata={"help": "training cache (python -m Training preprocess)"})
    out: Path = field(default=Path("runs/run"), metadata={"help": "run folder for checkpoints and logs"})
    task: str = field(default="acute", metadata={"help": "acute (lesion on DWI) or outcome (follow-up infarct)"})
    imaging_only: bool = field(default=False, metadata={"help": "ablation: ignore clinical features"})
    preset: str = field(default="lite", metadata={"help": "network preset: lite|base"})
    network: str = field(default="", metadata={"help": "JSON object of NetworkConfig overrides"})
    epochs: int = field(default=100, metadata={"help": "maximum number of epochs"})
    steps_per_epoch: int = field(default=0, metadata={"help": "optimiser steps per epoch (0: one pass over train)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimiser steps (0: no limit)"})
    time_limit: float = field(default=0.0, metadata={"help": "stop after this many seconds (0: none)"})
    batch_size: int = field(default=2, metadata={"help": "global batch size (all processes together)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (not on norms and biases)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    warmup: float = field(default=0.05, metadata={"help": "linear warm-up as a fraction of the run's steps"})
    warmup_steps: int = field(default=0, metadata={
        "help": "fixed warm-up steps instead of --warmup (0: use --warmup); at most a fifth of the run"})
    min_lr_ratio: float = field(default=0.02, metadata={"help": "final learning rate / peak of the cosine"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0: off)"})
    lambda_dice: float = field(default=1.0, metadata={"help": "weight of the Dice loss"})
    lambda_ce: float = field(default=1.0, metadata={"help": "weight of the cross-entropy loss"})
    lesion_loss: float = field(default=0.0, metadata={
        "help": "weight of a per-lesion soft Dice added to the loss (Training.training.losses; Kofler et al.'s "
                "blob loss uses 0.5), so that small lesions count as much as large ones; 0: off"})
    patience: int = field(default=0, metadata={"help": "early stopping: epochs without val Dice gain (0: off)"})
    val_threshold: float = field(default=0.5, metadata={"help": "probability threshold of the validation Dice"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms (slower)"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on a CUDA device that supports it, else fp32)|bf16|fp16|fp32"})
    channels_last: bool = field(default=True, metadata={"help": "channels-last 3-D memory layout"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes per training process"})
    prefetch: int = field(default=4, metadata={"help": "batches prefetched per worker"})
    augment: bool = field(default=True, metadata={"help": "random augmentation of training samples"})
    flip_p: float = field(default=0.5, metadata={"help": "left-right flip probability"})
    rotate_deg: float = field(default=10.0, metadata={"help": "max axial rotation (degrees)"})
    scale: float = field(default=0.1, metadata={"help": "max relative scaling"})
    elastic_p: float = field(default=0.0, metadata={"help": "elastic deformation probability"})
    intensity_p: float = field(default=0.8, metadata={"help": "gamma/contrast/noise probability"})
    flair_drop_p: float = field(default=0.3, metadata={"help": "FLAIR drop-out probability"})
    clinical_drop_p: float = field(default=0.25, metadata={"help": "per-feature clinical drop-out probability"})
    checkpoint_minutes: float = field(default=10.0, metadata={
        "help": "also write last.pt within an epoch at least this often (minutes; 0: per epoch only)"})
    progress_seconds: float = field(default=30.0, metadata={
        "help": "log a progress line at least this often (seconds), also with --no-progress"})
    resume: bool = field(default=False, metadata={
        "help": "continue RUN/checkpoints/last.pt with the run's own saved config (--out RUN --resume)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run in --out"})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard scalars"})
    log_every: int = field(default=10, metadata={"help": "TensorBoard step-scalar interval"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.task not in ("acute", "outcome"):
            raise ValueError(f"task must be 'acute' or 'outcome', got '{self.task}'")
        if self.preset not in ("lite", "base"):
            raise ValueError(f"preset must be 'lite' or 'base', got '{self.preset}'")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got '{self.precision}'")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be at least 1")
        if not 0.0 <= self.warmup < 1.0 or self.warmup_steps < 0:
            raise ValueError("warmup must be a fraction in [0, 1) and warmup_steps at least 0")
        if self.checkpoint_minutes < 0 or self.progress_seconds < 0 or self.time_limit < 0 or self.max_steps < 0:
            raise ValueError("checkpoint_minutes, progress_seconds, time_limit and max_steps may not be negative")
        if self.lesion_loss < 0:
            raise ValueError(f"lesion_loss must be >= 0, got {self.lesion_loss}")

    def augment_config(self) -> AugmentConfig | None:
        if not self.augment:
            return None
        return AugmentConfig(flip_p=self.flip_p, rotate_deg=self.rotate_deg, scale=self.scale,
                             elastic_p=self.elastic_p, intensity_p=self.intensity_p,
                             flair_drop_p=self.flair_drop_p, clinical_drop_p=self.clinical_drop_p)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`run`."""

    run_dir: Path
    best_checkpoint: Path
    best_val_dice: float
    steps: int = 0
    epochs: int = 0
    stopped: str = ""
    final_train_loss: float = float("nan")


# ----------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------
def network_config(config: TrainConfig) -> Any:
    """The :class:`NetworkConfig` of a training config (preset + JSON overrides + imaging_only)."""
    from StrokePredictorLib.network import NetworkConfig

    overrides: dict = {}
    if config.network:
        try:
            overrides = json.loads(config.network)
        except json.JSONDecodeError as error:
            raise configlib.ConfigError(f"--network must be a JSON object of NetworkConfig fields: {error}.") from None
        if not isinstance(overrides, dict):
            raise configlib.ConfigError("--network must be a JSON object of NetworkConfig fields.")
    overrides["imaging_only"] = config.imaging_only
    try:
        return getattr(NetworkConfig, config.preset)(**overrides)
    except (TypeError, ValueError) as error:
        raise configlib.ConfigError(f"Invalid network configuration: {error}") from None


def _prepare_run_dir(config: TrainConfig, info: distlib.DistInfo) -> Path:
    run_dir = Path(config.out)
    last = run_dir / "checkpoints" / "last.pt"
    if config.resume:
        if not last.is_file():
            raise CacheError(f"Cannot resume: {last} does not exist (start without --resume).")
        return run_dir
    if info.is_main:
        if last.exists() and not config.overwrite:
            raise OutputExistsError(
                f"Run folder {run_dir} holds a training run already; pass --resume to continue it or "
                "--overwrite to replace it."
            )
        if config.overwrite:
            for name in ("checkpoints", "tensorboard"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            for name in ("log.csv", "train_config.json", "result.json"):
                (run_dir / name).unlink(missing_ok=True)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    distlib.barrier(info)
    return run_dir


def _check_resume(saved: dict, config: TrainConfig) -> None:
    current = configlib.to_dict(config)
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != current[k]]
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise configlib.ConfigError(f"Cannot resume with a different {details}; start a new run instead.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _extends(name: str, saved: Any, new: Any) -> bool:
    """Whether ``new`` extends the budget ``saved`` (0 = no limit for max_steps and time_limit)."""
    if name == "epochs":
        return new > saved
    return (new == 0 and saved != 0) or (saved != 0 and new > saved)


def resume_config(config: TrainConfig, given: frozenset[str] | None = None) -> TrainConfig:
    """The config a ``--resume`` continues with: the run's own saved config, extended.

    Args:
        config: the config as typed (``out`` names the run; ``resume`` is set).
        given: the fields the user typed (flags or ``--config`` file); None (a call from Python)
            compares every field.

    Returns:
        The saved config, with budget fields (``epochs``, ``max_steps``, ``time_limit``) extended
        and operational fields (device, workers, progress, ...) changed where typed; each change
        is logged.

    Raises:
        CacheError: the run folder holds no run to resume.
        ConfigError: a typed value differs from the saved one where it may not, or a budget is
            shortened; the message names the flags.
    """
    run_dir = Path(config.out)
    saved_path = run_dir / "train_config.json"
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        raise CacheError(f"Cannot resume: {last} does not exist (start without --resume).")
    if saved_path.is_file():
        try:
            values = json.loads(saved_path.read_text())
        except json.JSONDecodeError as error:
            raise configlib.ConfigError(f"Cannot resume: {saved_path} is not valid JSON ({error}).") from None
        source = str(saved_path)
    else:  # an older run folder: the checkpoint carries the config too
        values, source = dict(load_checkpoint(last)["config"]), str(last)
    saved = configlib.build(TrainConfig, values, source=f"the saved config {source}")
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("resume", "out", "overwrite")]
    if given is not None:
        names = [name for name in names if name in given]
    changes: dict[str, Any] = {}
    refused: list[str] = []
    shortened: list[str] = []
    for name in names:
        old, new = getattr(saved, name), getattr(config, name)
        if old == new:
            continue
        if name in RESUME_BUDGET and not _extends(name, old, new):
            shortened.append(name)
        elif name in RESUME_BUDGET or name in RESUME_OPERATIONAL:
            changes[name] = new
        else:
            refused.append(name)
    if refused:
        details = "; ".join(f"{_flag(n)} {getattr(config, n)!s} (saved: {getattr(saved, n)!s})" for n in refused)
        raise configlib.ConfigError(
            f"--resume continues {run_dir} with its own saved config ({source}); {details} cannot change. "
            f"Only {', '.join(map(_flag, RESUME_BUDGET))} may be extended (and "
            f"{', '.join(map(_flag, RESUME_OPERATIONAL))} changed); start a new run with another --out otherwise."
        )
    if shortened:
        details = "; ".join(f"{_flag(n)} {getattr(config, n)} (saved: {getattr(saved, n)})" for n in shortened)
        raise configlib.ConfigError(f"--resume may extend the budget, not shorten it: {details} "
                                    "(0 means no limit for --max-steps and --time-limit).")
    for name, value in changes.items():
        kind = "budget extended" if name in RESUME_BUDGET else "changed"
        logger.info("resume: %s %s -> %s (%s)", _flag(name), getattr(saved, name), value, kind)
    return dataclasses.replace(saved, out=config.out, resume=True, overwrite=False, **changes)


def data_summary(cache: Path, task: str) -> dict:
    """Training-data description for the checkpoint and the bundle (from the cache index)."""
    index = load_index(cache)
    from Training.data.dataset import load_split

    split = load_split(cache)
    with_task = {m["case_id"] for m in index["cases"] if task in m["targets"]}
    dataset = index.get("dataset") or {}
    return {
        "source": index.get("source"),
        "dataset_name": dataset.get("name") if isinstance(dataset, dict) else None,
        "dataset": dataset,
        "n_cases": {name: sum(c in with_task for c in ids) for name, ids in split.items()},
        "split_seed": json.loads((Path(cache) / "split.json").read_text()).get("seed"),
        "preset": index.get("preset"),
        "clinical_csv": index.get("clinical_csv"),
        "flair_fraction": float(np.mean([m["flair_present"] for m in index["cases"]])) if index["cases"] else 0.0,
    }


def training_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, scaler: Any,
                  loss_fn: Any, *, device: torch.device, autocast: dict, grad_clip: float = 1.0,
                  channels_last: bool = False, stats: dict | None = None) -> torch.Tensor:
    """One optimiser step on a collated cache batch, as the loop takes it: to the device,
    augmentation (when the batch carries ``aug_*`` parameters), then :func:`loop.optimise`
    (forward under autocast, loss, backward, clipping, update).

    A step whose loss or gradient norm is not finite is skipped (the weights stay finite; with
    fp16 the grad scaler does this itself): counted in ``stats["skipped"]`` when ``stats`` is given.

    Returns:
        The loss (a detached scalar tensor; reading it synchronises the device).
    """
    batch = cache_batch(batch, device)
    image = batch["image"].contiguous(memory_format=torch.channels_last_3d) if channels_last else batch["image"]
    loss, applied = loop.optimise(model, image, batch, batch["target"], optimizer, scaler, loss_fn,
                                  autocast=autocast, grad_clip=grad_clip)
    if not applied and stats is not None:
        stats["skipped"] = stats.get("skipped", 0) + 1
    return loss


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------
def run(config: TrainConfig, given: frozenset[str] | None = None) -> TrainResult:
    """Train a model as configured; returns the run folder and the best checkpoint.

    In a ``torchrun`` launch every process calls this; rank 0 writes the files. With
    ``config.resume`` the run continues with its own saved config (:func:`resume_config`;
    ``given`` names the fields the user typed, None compares all).

    Raises:
        CacheError: no cache, no training case for the task.
        OutputExistsError: ``out`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        ConfigError: invalid options, or options that a resumed run may not change.
    """
    from monai.losses import DiceCELoss

    from StrokePredictorLib.network import StrokeNet

    if config.resume:
        config = resume_config(config, given)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    info = distlib.setup(config.device)
    try:
        return _run(config, info, StrokeNet, DiceCELoss)
    finally:
        distlib.cleanup(info)


def _run(config: TrainConfig, info: distlib.DistInfo, StrokeNet: Any, DiceCELoss: Any) -> TrainResult:  # noqa: N803
    device = info.device
    cuda = device.type == "cuda"
    run_dir = _prepare_run_dir(config, info)
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt") if config.resume else None
    if checkpoint is not None:
        _check_resume(checkpoint["config"], config)
    if info.is_main:
        configlib.save(config, run_dir / "train_config.json")

    # -- determinism and seeds ------------------------------------------------------------------
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    # -- data ---------------------------------------------------------------------------------
    index = load_index(config.cache)
    grid = ModelGrid.from_dict(index["grid"])
    normalization = Normalization.from_dict(index["normalization"])
    train_ids = task_cases(config.cache, "train", config.task)
    val_ids = task_cases(config.cache, "val", config.task)
    if not train_ids:
        raise CacheError(f"Cache {config.cache} has no training case with a '{config.task}' target.")
    if not val_ids:
        logger.warning("No validation case with a '%s' target: the last checkpoint counts as the best.", config.task)
    train_set = CacheDataset(config.cache, train_ids, config.task, augment=config.augment_config(), seed=config.seed)
    val_set = CacheDataset(config.cache, val_ids, config.task)
    sampler = StreamSampler(len(train_set), config.batch_size, rank=info.rank, world_size=info.world_size,
                            seed=config.seed)
    loader = make_loader(train_set, sampler=sampler, batch_size=sampler.local_batch, workers=config.workers,
                         pin_memory=cuda, prefetch=config.prefetch, seed=config.seed)
    source = CacheSource(train_set, val_set, sampler, loader, info, workers=config.workers,
                         val_threshold=config.val_threshold, progress_seconds=config.progress_seconds, log=logger)
    steps_per_epoch = config.steps_per_epoch or steps_per_pass(len(train_set), config.batch_size)
    planned = config.epochs * steps_per_epoch
    if config.max_steps:
        planned = min(planned, config.max_steps)

    # -- the network --------------------------------------------------------------------------
    net_config = network_config(config)
    model = StrokeNet(net_config)
    bad = [s for s in grid.size if s % model.size_divisor]
    if bad:
        raise configlib.ConfigError(
            f"The cache's model grid {grid.size} is not divisible by the network's size divisor "
            f"{model.size_divisor}; preprocess again with --preset {config.preset} or a matching --grid-size."
        )

    def wrap(network: torch.nn.Module) -> torch.nn.Module:
        runner = torch.compile(network) if config.compile else network
        if info.distributed:
            runner = torch.nn.parallel.DistributedDataParallel(runner, device_ids=[device.index] if cuda else None)
        return runner  # type: ignore[return-value]

    meta = {"config": configlib.to_dict(config), "network": net_config.to_dict(), "task": config.task,
            "grid": grid.to_dict(), "normalization": normalization.to_dict(),
            "data": data_summary(Path(config.cache), config.task)}
    member = loop.Member(config.task, config.task, model, run_dir, meta, checkpoint=checkpoint, wrap=wrap)
    options = loop.LoopOptions(
        schedule=loop.Schedule(config.lr, config.min_lr_ratio, config.warmup, config.warmup_steps, steps=planned,
                               seconds=config.time_limit),
        epoch_steps=steps_per_epoch, batch_size=config.batch_size,
        steps_reason="max_steps" if config.max_steps and config.max_steps <= config.epochs * steps_per_epoch
        else "epochs",
        patience=config.patience, weight_decay=config.weight_decay, adam_eps=config.adam_eps,
        fused=cuda and not config.deterministic, grad_clip=config.grad_clip,
        checkpoint_minutes=config.checkpoint_minutes, progress_seconds=config.progress_seconds,
        progress_bar=config.progress, tensorboard=config.tensorboard, log_every=config.log_every)
    loss_fn = with_lesion_term(
        DiceCELoss(sigmoid=True, batch=False, lambda_dice=config.lambda_dice, lambda_ce=config.lambda_ce),
        config.lesion_loss)
    precision = loop.Precision.resolve(config.precision, device, config.channels_last)
    result = loop.run_loop([member], source, loss_fn, precision, options, info=info, log=logger)[member.name]
    return TrainResult(run_dir, Path(result["best_checkpoint"]), result["best_val_dice"], result["steps"],
                       result["epochs"], result["stopped"], result["final_train_loss"])


def main(argv: list[str]) -> int:
    config, given = configlib.parse_given(TrainConfig, argv, "Train StrokeNet on a preprocessed cache.",
                                          prog="python -m Training train")
    run(config, given)
    return 0
