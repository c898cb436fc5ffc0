"""``python -m Training train``: train StrokeNet on a preprocessed cache (CPU, CUDA, torchrun).

* AdamW, linear warm-up then cosine decay (per optimiser step), gradient clipping.
* Loss: MONAI ``DiceCELoss`` with a sigmoid (Dice per case, plus binary cross-entropy).
* Augmentation (:mod:`Training.data.dataset`): left-right flips, small rotations/scaling/shifts,
  optional elastic deformation, gamma/contrast/noise per channel, FLAIR drop-out and
  clinical-feature drop-out, picked per sample from the sample's stream position (replayable).
* bf16 autocast and channels-last on CUDA; optional deterministic mode.
* Several processes with DistributedDataParallel when started by ``torchrun``; the global batch
  of a step is the same whatever the number of processes.
* Every epoch: validation Dice on the ``val`` split, an atomically written checkpoint
  (``RUN/checkpoints/last.pt``: model, optimiser, scheduler, scaler, RNG states of every
  process, epoch, step, cumulative elapsed time, config), ``best.pt`` when the validation Dice
  improves, a CSV row (``RUN/log.csv``) and TensorBoard scalars (``RUN/tensorboard``).
  ``last.pt`` is also written every ``--checkpoint-minutes`` within an epoch, so an interruption
  loses minutes, not an epoch. Early stopping after ``patience`` epochs without gain.
* ``--resume`` continues ``last.pt`` exactly where it stopped, with the run's own saved config
  (``RUN/train_config.json``): ``--out RUN --resume`` is enough. Flags given again may only
  extend the budget (``--epochs``, ``--max-steps``, ``--time-limit``; logged) or change how the
  run is carried out (device, workers, progress, checkpoint interval); any other typed value that
  differs from the saved one is refused by name. Elapsed time and steps add up across resumes
  (``elapsed_s`` in ``log.csv``, ``--time-limit`` counts the whole run).
* ``--max-steps``, ``--steps-per-epoch`` and ``--time-limit`` (seconds) fit a run into a budget;
  warm-up is a fraction of the run (``--warmup``), so it never outlasts a short one.
* A progress line (step, loss, learning rate, seconds per step, time left) is logged at least
  every ``--progress-seconds`` (30 s), also with ``--no-progress``.

Training checkpoints are pickled (``torch.save``) and only ever loaded from the user's own run
folder; the model bundle (``python -m Training export``) is the safetensors file that is shipped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from StrokePredictorLib.errors import OutputExistsError
from StrokePredictorLib.io import atomic_path
from StrokePredictorLib.preprocess import ModelGrid, Normalization
from Training import config as configlib
from Training.data.dataset import (
    AugmentConfig,
    CacheDataset,
    CacheError,
    StreamSampler,
    apply_augmentation,
    load_index,
    make_loader,
    steps_per_pass,
    task_cases,
)
from Training.training import distributed as distlib

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_dice", "best_val_dice", "elapsed_s",
               "samples_per_s")
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
    patience: int = field(default=0, metadata={"help": "early stopping: epochs without val Dice gain (0: off)"})
    val_threshold: float = field(default=0.5, metadata={"help": "probability threshold of the validation Dice"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms (slower)"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU)|bf16|fp16|fp32"})
    channels_last: bool = field(default=True, metadata={"help": "channels-last 3-D memory layout on CUDA"})
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


def lr_factor(step: int, warmup: int, horizon: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(horizon - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_length(config: TrainConfig, horizon: int) -> int:
    """Warm-up steps of a run of ``horizon`` steps: ``warmup`` x horizon, or a fixed
    ``warmup_steps`` capped at a fifth of the run (a fixed count must not outlast a short run)."""
    if config.warmup_steps:
        return max(1, min(config.warmup_steps, horizon // 5))
    return max(1, round(config.warmup * horizon))


def dice_score(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean arrays; 1.0 when both are empty."""
    total = int(prediction.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, target).sum()) / total


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: Path) -> Path:
    """``torch.save`` to a temporary file, then rename (never a half-written checkpoint)."""
    with atomic_path(path, overwrite=True) as temporary:
        torch.save(state, temporary)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a TRAINING checkpoint written by this module (pickle: only from your own run folder)."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"Checkpoint {path} does not exist.")
    return torch.load(path, map_location="cpu", weights_only=False)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim > 1 and "embedding" not in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def _batch_to(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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
    """One optimiser step on a collated batch: to the device, augmentation (when the batch
    carries ``aug_*`` parameters), forward under autocast, loss, backward, clipping, step.

    A step whose loss or gradient norm is not finite is skipped (the weights stay finite; with
    fp16 the grad scaler does this itself): counted in ``stats["skipped"]`` when ``stats`` is given.

    Returns:
        The loss (a detached scalar tensor; reading it synchronises the device).
    """
    batch = _batch_to(batch, device)
    image, target = batch["image"], batch["target"]
    if "aug_theta" in batch:
        image, target = apply_augmentation(image, target, batch["brain"], batch)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast(**autocast):
        out = model(image, batch["clinical_values"], batch["clinical_missing"], batch["flair_present"])
    loss = loss_fn(out["logits"].float(), target)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if not scaler.is_enabled() and not bool(torch.isfinite(norm) & torch.isfinite(loss.detach())):
        optimizer.zero_grad(set_to_none=True)  # a non-finite gradient would make every weight NaN
        if stats is not None:
            stats["skipped"] = stats.get("skipped", 0) + 1
        return loss.detach()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------
def validate(model: torch.nn.Module, dataset: CacheDataset, loss_fn: Any, info: distlib.DistInfo,
             config: TrainConfig, autocast: dict) -> tuple[float, float]:
    """Mean validation loss and Dice over the ``val`` split (sharded over processes).

    Runs under a forked RNG, so validation never changes the training random stream.
    """
    if len(dataset) == 0:
        return float("nan"), float("nan")
    indices = list(range(info.rank, len(dataset), info.world_size))
    subset = torch.utils.data.Subset(dataset, indices)
    loader = make_loader(subset, batch_size=1, workers=min(config.workers, len(indices)),
                         pin_memory=info.device.type == "cuda", prefetch=2)
    loss_sum = dice_sum = 0.0
    devices = [info.device] if info.device.type == "cuda" else []
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # no collective calls: ranks may hold different numbers of cases
    was_training = model.training
    model.eval()
    start = last_line = time.monotonic()
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for done, batch in enumerate(loader):
            if info.is_main and time.monotonic() - last_line >= config.progress_seconds:
                last_line = time.monotonic()
                logger.info("validation: %d of %d case(s) after %.0f s", done * info.world_size, len(dataset),
                            last_line - start)
            batch = _batch_to(batch, info.device)
            image = batch["image"]
            if config.channels_last and info.device.type == "cuda":
                image = image.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(**autocast):
                out = model(image, batch["clinical_values"], batch["clinical_missing"], batch["flair_present"])
            logits = out["logits"].float()
            loss_sum += float(loss_fn(logits, batch["target"]))
            prediction = (torch.sigmoid(logits) > config.val_threshold).cpu().numpy()
            dice_sum += dice_score(prediction, batch["target"].cpu().numpy() > 0.5)
    model.train(was_training)
    loss_total, dice_total, count = distlib.all_sum([loss_sum, dice_sum, float(len(indices))], info)
    return loss_total / max(count, 1), dice_total / max(count, 1)


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
    from tqdm import tqdm

    from StrokePredictorLib.network import StrokeNet

    if config.resume:
        config = resume_config(config, given)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    info = distlib.setup(config.device)
    try:
        return _run(config, info, StrokeNet, DiceCELoss, tqdm)
    finally:
        distlib.cleanup(info)


def _run(config: TrainConfig, info: distlib.DistInfo, StrokeNet: Any, DiceCELoss: Any, tqdm: Any) -> TrainResult:  # noqa: N803
    start_time = time.monotonic()
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
    steps_per_epoch = config.steps_per_epoch or steps_per_pass(len(train_set), config.batch_size)
    planned = config.epochs * steps_per_epoch
    if config.max_steps:
        planned = min(planned, config.max_steps)

    # -- model, optimiser, schedule -------------------------------------------------------------
    net_config = network_config(config)
    model = StrokeNet(net_config)
    bad = [s for s in grid.size if s % model.size_divisor]
    if bad:
        raise configlib.ConfigError(
            f"The cache's model grid {grid.size} is not divisible by the network's size divisor "
            f"{model.size_divisor}; preprocess again with --preset {config.preset} or a matching --grid-size."
        )
    model.to(device)
    if cuda and config.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, eps=config.adam_eps,
                                  fused=cuda and not config.deterministic)
    horizon = [planned]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_length(config, horizon[0]), horizon[0], config.min_lr_ratio))
    if config.precision == "auto":
        precision = "bf16" if cuda else "fp32"
    else:
        precision = config.precision
    autocast = {"device_type": device.type, "dtype": torch.float16 if precision == "fp16" else torch.bfloat16,
                "enabled": precision in ("bf16", "fp16")}
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = DiceCELoss(sigmoid=True, batch=False, lambda_dice=config.lambda_dice, lambda_ce=config.lambda_ce)

    step = epoch = 0
    best_dice = -1.0
    best_epoch = 0
    bad_epochs = 0
    calibrated = False
    elapsed_before = 0.0  # seconds of earlier sessions of this run (resume)
    loss_sum, count = 0.0, 0  # the current epoch's training loss so far
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        step, epoch = int(checkpoint["step"]), int(checkpoint["epoch"])
        best_dice, best_epoch = float(checkpoint["best_val_dice"]), int(checkpoint["best_epoch"])
        bad_epochs = int(checkpoint["bad_epochs"])
        horizon[0] = int(checkpoint.get("horizon", planned)) if not config.max_steps else planned
        calibrated = bool(checkpoint.get("calibrated", False))
        if int(checkpoint.get("planned", planned)) != planned:  # budget extended: a new cosine over the whole run
            horizon[0], calibrated = planned, False
            logger.info("Budget extended: the learning-rate schedule now spans %d steps.", planned)
        elapsed_before = float(checkpoint.get("elapsed_s", 0.0))
        if step % steps_per_epoch:  # written within an epoch: that epoch's loss so far
            loss_sum, count = float(checkpoint.get("epoch_loss_sum", 0.0)), int(checkpoint.get("epoch_steps", 0))
        states = checkpoint["rng"]
        if len(states) == info.world_size:
            set_rng_state(states[info.rank])
        else:
            logger.warning("Checkpoint saved by %d process(es), resumed by %d: RNG states not restored.",
                           len(states), info.world_size)
        logger.info("Resumed %s at epoch %d, step %d, after %.0f s of training.", run_dir, epoch, step,
                    elapsed_before)
    if config.compile:
        model_to_run: torch.nn.Module = torch.compile(model)  # type: ignore[assignment]
    else:
        model_to_run = model
    if info.distributed:
        model_to_run = torch.nn.parallel.DistributedDataParallel(
            model_to_run, device_ids=[device.index] if cuda else None)

    writer = None
    if info.is_main and config.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step if step else None)
    log_path = run_dir / "log.csv"
    if info.is_main and not log_path.is_file():
        with log_path.open("w", newline="") as handle:
            csv.writer(handle).writerow(LOG_COLUMNS)
    summary = data_summary(Path(config.cache), config.task)

    def elapsed_total() -> float:
        """Seconds of this run, earlier sessions included."""
        return elapsed_before + time.monotonic() - start_time

    def make_state(val_loss: float, val_dice: float) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": distlib.gather_objects(rng_state(), info),
            "epoch": epoch,
            "step": step,
            "best_val_dice": best_dice,
            "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
            "horizon": horizon[0],
            "planned": planned,
            "calibrated": calibrated,
            "elapsed_s": elapsed_total(),
            "epoch_loss_sum": loss_sum,
            "epoch_steps": count,
            "val_loss": val_loss,
            "val_dice": val_dice,
            "config": configlib.to_dict(config),
            "network": net_config.to_dict(),
            "task": config.task,
            "grid": grid.to_dict(),
            "normalization": normalization.to_dict(),
            "data": summary,
            "world_size": info.world_size,
            "torch_version": torch.__version__,
        }

    # -- loop ---------------------------------------------------------------------------------
    stopped = ""
    last_train_loss = float("nan")
    val_seconds = 0.0
    model_to_run.train()
    if step >= planned:
        stopped = "max_steps" if config.max_steps and step >= config.max_steps else "epochs"
    elif config.time_limit > 0 and elapsed_before >= config.time_limit:
        stopped = "time_limit"
    if stopped and checkpoint is not None:
        logger.info("Nothing to train: the run has used its budget (%s). Extend --epochs, --max-steps or "
                    "--time-limit to continue it.", stopped)
    elif info.is_main:
        budget = f"{planned} steps ({steps_per_epoch} per epoch)"
        if config.time_limit > 0:
            budget += f" or {config.time_limit:.0f} s in all"
        logger.info("Training %s from step %d; warm-up %d steps; last.pt every epoch%s; progress every %.0f s.",
                    budget, step, warmup_length(config, horizon[0]),
                    f" and every {config.checkpoint_minutes:g} min" if config.checkpoint_minutes > 0 else "",
                    config.progress_seconds)
    session_start_step = step
    step_stats: dict = {}
    skipped_before = 0
    last_checkpoint = last_progress = time.monotonic()
    while not stopped:
        epoch_start = time.monotonic()
        epoch_first_step = step
        stop_step = min(step + steps_per_epoch - (step % steps_per_epoch), planned)
        if step % steps_per_epoch == 0:
            loss_sum, count = 0.0, 0
        sampler.set_range(step, stop_step)
        bar = tqdm(total=stop_step - step, desc=f"epoch {epoch + 1}", unit="step", leave=False,
                   disable=not (config.progress and info.is_main))
        time_up = False
        for batch in loader:
            loss = training_step(model_to_run, batch, optimizer, scaler, loss_fn, device=device,
                                 autocast=autocast, grad_clip=config.grad_clip,
                                 channels_last=cuda and config.channels_last, stats=step_stats)
            if step_stats.get("skipped", 0) > skipped_before:
                skipped_before = step_stats["skipped"]
                logger.warning("step %d: the loss or gradient is not finite (%s); the update was skipped "
                               "(%d so far).", step + 1, precision, skipped_before)
                if skipped_before >= 20 and skipped_before > 0.2 * (step + 1 - session_start_step):
                    raise configlib.ConfigError(
                        f"Training diverged: {skipped_before} of {step + 1 - session_start_step} steps had a "
                        f"non-finite loss or gradient ({precision}); try --precision fp32 or a lower --lr.")
            scheduler.step()
            step += 1
            value = float(loss)
            loss_sum += value
            count += 1
            bar.update()
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if writer is not None and step % max(config.log_every, 1) == 0:
                writer.add_scalar("train/loss_step", value, step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            now = time.monotonic()
            if info.is_main and now - last_progress >= config.progress_seconds:
                last_progress = now
                per_step = (now - start_time) / max(step - session_start_step, 1)
                left = per_step * (min(planned, horizon[0]) - step)
                if config.time_limit > 0:
                    left = min(left, max(config.time_limit - elapsed_total(), 0.0))
                message = (f"epoch {epoch + 1} step {step}/{planned}: loss {value:.4f} (epoch mean "
                           f"{loss_sum / count:.4f}), lr {scheduler.get_last_lr()[0]:.2e}, {per_step:.2f} s/step, "
                           f"{elapsed_total():.0f} s elapsed, about {left / 60:.0f} min left")
                if bar.disable:
                    logger.info(message)
                else:
                    bar.write(message)
            if config.time_limit > 0:
                time_up = distlib.broadcast_flag(elapsed_total() + 1.5 * val_seconds + 2.0 > config.time_limit, info)
                if time_up:
                    break
            if config.checkpoint_minutes > 0 and step < stop_step and distlib.broadcast_flag(
                    now - last_checkpoint >= 60.0 * config.checkpoint_minutes, info):
                state = make_state(float("nan"), float("nan"))  # collective in DDP: every rank
                if info.is_main:
                    save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
                    logger.info("step %d: wrote %s (%.0f s elapsed).", step, run_dir / "checkpoints" / "last.pt",
                                elapsed_total())
                last_checkpoint = time.monotonic()
        bar.close()
        epoch += 1
        loss_total, count_total = distlib.all_sum([loss_sum, float(count)], info)
        last_train_loss = loss_total / max(count_total, 1)
        tick = time.monotonic()
        val_loss, val_dice = validate(model_to_run, val_set, loss_fn, info, config, autocast)
        val_seconds = time.monotonic() - tick
        improved = (not val_ids) or val_dice > best_dice + 1e-6
        if improved:
            best_dice, best_epoch, bad_epochs = (val_dice if val_ids else float("nan")), epoch, 0
        else:
            bad_epochs += 1
        session_steps = step - epoch_first_step
        if config.time_limit > 0 and not config.max_steps and not time_up:
            # Fit the cosine schedule to the time left, at the rate of the latest epoch
            # (validation included); refitted every epoch, as the first one includes warm-up costs.
            rate = session_steps / max(time.monotonic() - epoch_start, 1e-6)
            remaining = config.time_limit - elapsed_total()
            horizon[0] = max(min(planned, step + int(0.97 * remaining * rate)), step + 1)
            if not calibrated:
                logger.info("Time limit %.0f s: cosine schedule fitted to about %d steps.", config.time_limit,
                            horizon[0])
            calibrated = True
        if time_up:
            stopped = "time_limit"
        elif config.max_steps and step >= config.max_steps:
            stopped = "max_steps"
        elif step >= planned:
            stopped = "epochs"
        elif config.patience and bad_epochs >= config.patience:
            stopped = "early_stopping"
        state = make_state(val_loss, val_dice)
        if info.is_main:
            save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
            if improved:
                shutil.copyfile(run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / ".best.tmp")
                os.replace(run_dir / "checkpoints" / ".best.tmp", run_dir / "checkpoints" / "best.pt")
            samples = session_steps * config.batch_size
            row = [epoch, step, scheduler.get_last_lr()[0], last_train_loss, val_loss, val_dice, best_dice,
                   round(elapsed_total(), 2), samples / max(time.monotonic() - epoch_start, 1e-6)]
            with log_path.open("a", newline="") as handle:
                csv.writer(handle).writerow(row)
            if writer is not None:
                writer.add_scalar("train/loss", last_train_loss, step)
                writer.add_scalar("val/loss", val_loss, step)
                writer.add_scalar("val/dice", val_dice, step)
                writer.flush()
            logger.info("epoch %d step %d: train loss %.4f, val loss %.4f, val Dice %.4f (best %.4f, epoch %d), "
                        "%.0f s elapsed", epoch, step, last_train_loss, val_loss, val_dice, best_dice, best_epoch,
                        elapsed_total())
        last_checkpoint = time.monotonic()
        distlib.barrier(info)

    best_path = run_dir / "checkpoints" / "best.pt"
    result = TrainResult(run_dir, best_path, best_dice, step, epoch, stopped, last_train_loss)
    if info.is_main:
        from StrokePredictorLib.io import write_json

        write_json({"best_checkpoint": str(best_path), "best_val_dice": best_dice, "best_epoch": best_epoch,
                    "steps": step, "epochs": epoch, "stopped": stopped, "final_train_loss": last_train_loss,
                    "device": str(device), "world_size": info.world_size, "seconds": elapsed_total(),
                    "session_seconds": time.monotonic() - start_time}, run_dir / "result.json", overwrite=True)
        logger.info("Stopped (%s) after %d steps; best val Dice %.4f -> %s", stopped, step, best_dice, best_path)
    if writer is not None:
        writer.close()
    return result


def main(argv: list[str]) -> int:
    config, given = configlib.parse_given(TrainConfig, argv, "Train StrokeNet on a preprocessed cache.",
                                          prog="python -m Training train")
    run(config, given)
    return 0
