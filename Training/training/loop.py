"""The training engine that ``train`` and ``train-synth`` share: one loop, interchangeable data.

The loop trains one or several networks (:class:`Member`; ``train-synth`` trains its variants in
lockstep on the same batches) from a :class:`DataSource` (the preprocessed cache, the CPU pool
of pre-rendered volumes, or synthesis on the GPU; :mod:`Training.training.sources`):

* AdamW without weight decay on norms, biases and embeddings (:func:`make_optimizer`);
* a linear warm-up, then a cosine decay (:class:`Schedule`) over the budget: the step clock when
  the step budget ends the run, the elapsed fraction of the time budget when time does (so a run
  fits its ``--time-limit`` without calibration);
* bf16/fp16 autocast, channels-last where it is faster (:class:`Precision`);
* gradient-norm clipping, and a step whose loss or gradient is not finite is skipped (the
  weights stay finite; a run where more than a fifth of at least 20 steps were skipped stops);
* an epoch is the stretch of steps between two validations (a pass over the cache for ``train``,
  ``--val-every`` steps for ``train-synth``). After each: validation, ``log.csv`` (and
  TensorBoard), ``checkpoints/last.pt`` and, when the validation Dice improved, ``best.pt``;
  ``last.pt`` is also written every ``checkpoint_minutes`` within an epoch. Early stopping after
  ``patience`` epochs without gain; with ``snapshot_every`` the state every that many steps is
  also kept as ``checkpoints/step_NNNNNN.pt``, so that a checkpoint can be chosen afterwards on
  checks the validation Dice does not measure (``python -m Training select``);
* checkpoints are written atomically and all have one format, which ``export`` reads: the model,
  optimiser and scaler states, the RNG state of every process, epoch, step, best Dice, the
  cumulative elapsed time, the epoch's loss so far, and what the front end adds to rebuild the
  model (config, network, task, grid, normalisation, data description);
* ``resume`` continues every member from its ``last.pt``: steps and elapsed time add up across
  resumes (``elapsed_s`` in ``log.csv``, the time budget counts the whole run);
* a progress line (step, losses, learning rate, seconds per step, the network's share of the
  time, time left) at least every ``progress_seconds``, with or without a progress bar;
* in a ``torchrun`` launch every process runs the loop; rank 0 writes the files.

Training checkpoints are pickled (``torch.save``) and only ever loaded from the user's own run
folder; the model bundle (``python -m Training export``) is the safetensors file that is shipped.
"""

from __future__ import annotations

import collections
import csv
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from StrokePredictorLib.io import atomic_path, write_json
from Training import config as configlib
from Training.data.dataset import CacheError
from Training.training import distributed as distlib

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_dice", "best_val_dice", "elapsed_s",
               "samples_per_s")
#: Ticks of the clock on which the schedule follows elapsed time.
TIME_TICKS = 10_000
#: Skipped (non-finite) steps that stop a run, when they are also more than a fifth of its steps.
DIVERGED_STEPS, DIVERGED_SHARE = 20, 0.2
#: One process (the loop's device is the Precision's; this DistInfo serves the collectives only).
SINGLE_PROCESS = distlib.DistInfo(0, 1, 0, torch.device("cpu"))


# ----------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------
def lr_factor(step: int, warmup: int, horizon: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(horizon - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_length(horizon: int, fraction: float, fixed: int = 0) -> int:
    """Warm-up steps of a run of ``horizon`` steps: ``fraction`` x horizon, or ``fixed`` steps
    capped at a fifth of the run (a fixed count must not outlast a short run)."""
    if fixed:
        return max(1, min(fixed, horizon // 5))
    return max(1, round(fraction * horizon))


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up, then cosine decay to ``min_ratio`` x the peak, over the run's budget.

    With a step budget only, the schedule runs on the step clock (a function of the step, so a
    resumed run repeats it exactly). With a time budget that ends the run first, it follows the
    elapsed fraction of the budget (resumes included): warm-up over ``warmup`` of the time, or
    over ``warmup_steps`` steps when those are given.
    """

    lr: float  # peak learning rate
    min_ratio: float  # final learning rate / peak
    warmup: float = 0.05  # warm-up as a fraction of the budget
    warmup_steps: int = 0  # fixed warm-up steps instead (0: use ``warmup``)
    steps: int = 0  # step budget (0: none)
    seconds: float = 0.0  # time budget in seconds, resumes included (0: none)

    def by_time(self, step: int, elapsed: float) -> bool:
        """Whether the time budget, not the step budget, sets the pace at this point."""
        if self.seconds <= 0:
            return False
        return not self.steps or elapsed / self.seconds > step / self.steps

    def warmup_of(self, horizon: int) -> int:
        return warmup_length(horizon, self.warmup, self.warmup_steps)

    def factor(self, step: int, elapsed: float) -> float:
        """Multiplier of the peak rate for optimiser step ``step`` (0-based) after ``elapsed`` s."""
        if not self.by_time(step, elapsed):
            return lr_factor(step, self.warmup_of(max(self.steps, 1)), max(self.steps, 1), self.min_ratio)
        tick = int(min(elapsed / self.seconds, 1.0) * TIME_TICKS)
        if self.warmup_steps:
            cosine = lr_factor(tick, 0, TIME_TICKS, self.min_ratio)
            return min((step + 1) / self.warmup_steps, 1.0) * cosine
        return lr_factor(tick, max(int(self.warmup * TIME_TICKS), 1), TIME_TICKS, self.min_ratio)


# ----------------------------------------------------------------------------------------
# Precision, optimiser, one step
# ----------------------------------------------------------------------------------------
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA device that supports it, or a CPU on
    which oneDNN has bf16 kernels (AVX-512 or AMX; ``torch.ops.mkldnn._is_mkldnn_bf16_supported``)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN, or an older one without the query
            return False
    return False


@dataclass(frozen=True)
class Precision:
    """Autocast type and memory layout of a run on ``device``."""

    device: torch.device
    name: str  # bf16 | fp16 | fp32
    channels_last: bool

    @classmethod
    def resolve(cls, name: str, device: torch.device, channels_last: bool = True) -> Precision:
        """``auto`` is bf16 on a CUDA device that supports it and fp32 elsewhere: on the CPU, ``train``
        keeps fp32 (bf16 autocast gave non-finite gradients there, README); ``train-synth``'s CPU recipe
        takes bf16 where the CPU has it natively (:func:`Training.training.train_synth.resolve_precision`).
        A CPU without native bf16 (AVX2 but no AVX-512) emulates it about 20 times slower than fp32 (32 s
        against 1.8 s per 64^3 forward and backward pass of the lite network, AMD EPYC with AVX2, 2
        threads, a one-off timing), where a CPU with it runs bf16 about 1.9x faster than fp32
        (Testing/benchmarks/bench_cpu_train.py); an explicit ``bf16`` there is honoured with a warning.
        Channels-last (when asked for) is used on every device: on the CPU it is faster in fp32 too (per
        step of 2 x 64^3 patches: 0.790 against 1.086 s with AVX-512, 1.730 against 1.887 s on the AVX2
        machine; bench_cpu_train.py)."""
        native = native_bf16(device)
        if name == "auto":
            name = "bf16" if device.type == "cuda" and native else "fp32"
        if name not in ("bf16", "fp16", "fp32"):
            raise configlib.ConfigError(f"--precision must be auto, bf16, fp16 or fp32, not '{name}'.")
        if name == "bf16" and device.type == "cpu" and not native:
            logger.warning("--precision bf16: this CPU has no native bfloat16 (no AVX-512 BF16 or AMX); autocast "
                           "emulates it, about 20 times slower than fp32. Use --precision auto or fp32.")
        return cls(device, name, channels_last)

    @property
    def autocast_args(self) -> dict:
        """Keyword arguments of :class:`torch.autocast`."""
        return {"device_type": self.device.type, "dtype": torch.float16 if self.name == "fp16" else torch.bfloat16,
                "enabled": self.name in ("bf16", "fp16")}

    def autocast(self) -> torch.autocast:
        return torch.autocast(**self.autocast_args)

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled for fp16 only."""
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

    def layout(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else image


def param_groups(model: torch.nn.Module, weight_decay: float, growth_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay on weights, none on norms, biases and embeddings.

    With ``growth_lr_scale`` != 1, the growth head's parameters (``growth.*``: a handful of scalars
    and a small MLP that fine-tuning must move far from their near-neutral start) form a third
    group, without weight decay, whose rate is ``lr_scale`` times the schedule's.
    """
    decay, no_decay, growth = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if growth_lr_scale != 1.0 and name.startswith("growth."):
            growth.append(parameter)
        else:
            (decay if parameter.ndim > 1 and "embedding" not in name else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if growth:
        groups.append({"params": growth, "weight_decay": 0.0, "lr_scale": growth_lr_scale})
    return groups


def set_lr(groups: list[dict], lr: float) -> None:
    """The schedule's rate ``lr`` into every parameter group, times the group's ``lr_scale``."""
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, eps: float = 1e-8,
                   fused: bool = False, growth_lr_scale: float = 1.0) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, growth_lr_scale)
    set_lr(groups, lr)
    return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, model: torch.nn.Module) -> None:
    """Load ``state`` into ``optimizer``; a state of one parameter group over ``model.parameters()``
    (as runs of ``train-synth`` wrote before it had weight-decay groups) is mapped onto the groups."""
    if len(state["param_groups"]) == len(optimizer.param_groups) or len(state["param_groups"]) != 1:
        optimizer.load_state_dict(state)
        return
    position = {id(p): i for i, p in enumerate(model.parameters())}
    mapped: dict = {"state": {}, "param_groups": []}
    index = 0
    for group in optimizer.param_groups:
        ids = []
        for parameter in group["params"]:
            old = position[id(parameter)]
            if old in state["state"]:
                mapped["state"][index] = state["state"][old]
            ids.append(index)
            index += 1
        mapped["param_groups"].append({**state["param_groups"][0], "params": ids,
                                       "weight_decay": group["weight_decay"]})
    optimizer.load_state_dict(mapped)


def forward(model: torch.nn.Module, image: torch.Tensor, batch: dict) -> dict:
    """``model`` on a batch (clinical values, missing flags, FLAIR flags, and a patch's ``window``
    when it has one)."""
    args = [image, batch["clinical_values"], batch["clinical_missing"], batch["flair_present"]]
    if batch.get("window") is not None:
        args.append(batch["window"])
    return model(*args)


def optimise(model: torch.nn.Module, image: torch.Tensor, batch: dict, target: torch.Tensor,
             optimizer: torch.optim.Optimizer, scaler: Any, loss_fn: Any, *, autocast: dict,
             grad_clip: float = 1.0, parameters: Any = None, core_weight: float = 0.0,
             growth_l2: float = 0.0) -> tuple[torch.Tensor, bool]:
    """One optimiser step: forward under autocast, loss, backward, clipping, update.

    With ``core_weight`` > 0, a network with a growth head (``core_logits`` in its output) also
    learns its core head on the acute lesion (``batch["acute"]``, when the batch has it): the loss
    adds ``core_weight`` times the same loss of the core against it. With ``growth_l2`` > 0 it also
    adds ``growth_l2`` times the mean square of the growth offset's additive per-feature shares
    (``growth_terms``): a ridge penalty, so that a clinical feature moves the growth only as far as
    the data keep asking it to.

    A step whose loss or gradient norm is not finite is skipped (the weights stay finite; with
    fp16 the grad scaler does this itself).

    Returns:
        The loss (a detached scalar tensor; reading it synchronises the device) and whether the
        update was applied.
    """
    with torch.autocast(**autocast):
        out = forward(model, image, batch)
    loss = loss_fn(out["logits"].float(), target)
    if core_weight > 0 and "core_logits" in out and "acute" in batch:
        loss = loss + core_weight * loss_fn(out["core_logits"].float(), batch["acute"])
    if growth_l2 > 0 and "growth_terms" in out:
        loss = loss + growth_l2 * out["growth_terms"].float().square().mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters() if parameters is None else parameters,
                                          grad_clip if grad_clip > 0 else math.inf)
    if not scaler.is_enabled() and not bool(torch.isfinite(norm) & torch.isfinite(loss.detach())):
        optimizer.zero_grad(set_to_none=True)  # a non-finite gradient would make every weight NaN
        return loss.detach(), False
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), True


# ----------------------------------------------------------------------------------------
# Checkpoints and RNG
# ----------------------------------------------------------------------------------------
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


def snapshot_name(step: int) -> str:
    """File name of the checkpoint kept at ``step`` (``LoopOptions.snapshot_every``)."""
    return f"step_{step:06d}.pt"


def load_checkpoint(path: str | Path) -> dict:
    """Load a TRAINING checkpoint written by this loop (pickle: only from your own run folder)."""
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"Checkpoint {path} does not exist.")
    return torch.load(path, map_location="cpu", weights_only=False)


def _open_log(path: Path, append: bool) -> Any:
    """``log.csv`` open for appending rows of :data:`LOG_COLUMNS`; a log of other columns (an
    older ``train-synth`` run: ``seconds`` for ``elapsed_s``) is rewritten in these columns."""
    if append and path.is_file():
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = tuple(reader.fieldnames or ())
        if header != LOG_COLUMNS:
            with atomic_path(path, overwrite=True) as temporary, Path(temporary).open("w", newline="") as handle:
                writer = csv.DictWriter(handle, LOG_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows({"elapsed_s": row.get("seconds", ""), **row} for row in rows)
        return path.open("a", newline="")
    handle = path.open("w", newline="")
    csv.writer(handle).writerow(LOG_COLUMNS)
    return handle


# ----------------------------------------------------------------------------------------
# Members and data sources
# ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class Member:
    """One network the loop trains, with its own optimiser, run folder and log.

    Args:
        name: shown in log lines when the loop trains several members.
        task: the target it learns (``acute`` or ``outcome``), as the data source names it.
        model: the network, on the CPU or already on the device.
        run_dir: ``checkpoints/``, ``log.csv``, ``result.json`` (and ``tensorboard/``) go here.
        meta: checkpoint fields that rebuild the model (config, network, task, grid, normalisation,
            data description).
        checkpoint: a loaded ``last.pt`` to continue from (resume).
        wrap: applied to the model after its state is restored (torch.compile, DDP).
    """

    name: str
    task: str
    model: torch.nn.Module
    run_dir: Path
    meta: dict
    checkpoint: dict | None = None
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    runner: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: Any = None
    best: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    skipped: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    last_train_loss: float = float("nan")
    log: Any = None
    writer: Any = None


class DataSource(Protocol):
    """Where the loop's batches come from (:mod:`Training.training.sources`)."""

    #: Validation cases (0: none; the latest checkpoint then counts as the best).
    val_cases: int

    def start(self, step: int) -> None:
        """Prepare to deliver the batches of a run that is at ``step`` (0, or a resumed run's step)."""

    def begin_epoch(self, step: int, stop: int) -> None:
        """The next batches are those of steps ``step`` to ``stop`` - 1."""

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch, on the device and ready for the network (augmented; ``image``,
        ``clinical_values``, ``clinical_missing``, ``flair_present``, the targets, maybe ``window``)."""

    def target(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """The batch's target for ``task``."""

    def validate(self, members: list[Member], loss_fn: Any, precision: Precision) -> dict[str, tuple[float, float]]:
        """Validation loss and Dice of every member (by name); the models are left in training mode."""

    def status(self) -> str:
        """A few words for the progress line (may be empty)."""

    def close(self) -> None:
        """Stop background work."""


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs; each front end fills it from its own config."""

    schedule: Schedule
    epoch_steps: int  # steps between validations
    batch_size: int  # global batch (all processes), for samples per second
    steps_reason: str = "max_steps"  # the stop reason when the step budget is used up
    patience: int = 0  # early stopping: epochs without validation gain (0: off)
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    fused: bool = False  # fused AdamW (CUDA)
    grad_clip: float = 1.0
    checkpoint_minutes: float = 10.0
    snapshot_every: int = 0  # also keep checkpoints/step_NNNNNN.pt every this many steps (0: off)
    progress_seconds: float = 30.0
    progress_bar: bool = False
    tensorboard: bool = False
    log_every: int = 10  # TensorBoard step-scalar interval
    core_weight: float = 0.0  # growth heads: weight of the core head's loss against the acute lesion
    growth_lr_scale: float = 1.0  # growth heads: their parameters' rate over the schedule's
    growth_l2: float = 0.0  # growth heads: ridge penalty on the offset's additive per-feature shares


@dataclass
class _Clock:
    """Elapsed time of the run, earlier sessions included."""

    before: float
    start: float = field(default_factory=time.monotonic)

    def total(self) -> float:
        return self.before + time.monotonic() - self.start


def _member_state(member: Member, *, info: distlib.DistInfo, epoch: int, step: int, elapsed: float,
                  val_loss: float, val_dice: float) -> dict:
    return {
        "model": member.model.state_dict(),
        "optimizer": member.optimizer.state_dict(),
        "scaler": member.scaler.state_dict(),
        "rng": distlib.gather_objects(rng_state(), info),
        "epoch": epoch,
        "step": step,
        "best_val_dice": member.best,
        "best_epoch": member.best_epoch,
        "bad_epochs": member.bad_epochs,
        "elapsed_s": elapsed,
        "epoch_loss_sum": member.loss_sum,
        "epoch_steps": member.loss_count,
        "val_loss": val_loss,
        "val_dice": val_dice,
        "world_size": info.world_size,
        "torch_version": torch.__version__,
        **member.meta,
    }


def run_loop(members: list[Member], source: DataSource, loss_fn: Any, precision: Precision,
             options: LoopOptions, *, info: distlib.DistInfo = SINGLE_PROCESS,
             log: logging.Logger = logger) -> dict[str, dict]:
    """Train ``members`` in lockstep on ``source``'s batches until the budget is used.

    Args:
        members: the networks; with ``checkpoint`` set they continue from it (all at one step).
        source: the data (:class:`DataSource`); closed when the loop ends.
        loss_fn: ``loss_fn(logits, target)`` (float32 logits).
        precision: autocast and memory layout (:meth:`Precision.resolve`).
        options: schedule, budget, epochs, checkpoints and progress (:class:`LoopOptions`).
        info: this process in a ``torchrun`` launch (one process by default).
        log: the logger of the front end (its name appears on the command line).

    Returns:
        Per member name: ``run_dir``, ``best_checkpoint``, ``best_val_dice``, ``best_epoch``,
        ``steps``, ``epochs``, ``stopped`` (``time_limit``, ``options.steps_reason`` or
        ``early_stopping``), ``final_train_loss``, ``seconds`` (the whole run),
        ``session_seconds``, ``network_share`` and ``skipped_steps``; also written to each run
        folder's ``result.json``.
    """
    try:
        return _Loop(members, source, loss_fn, precision, options, info, log).run()
    finally:
        source.close()


class _Loop:
    def __init__(self, members: list[Member], source: DataSource, loss_fn: Any, precision: Precision,
                 options: LoopOptions, info: distlib.DistInfo, log: logging.Logger) -> None:
        self.members, self.source, self.loss_fn = members, source, loss_fn
        self.precision, self.options, self.info, self.log = precision, options, info, log
        self.schedule = options.schedule
        self.step = self.epoch = 0
        self.net_seconds = 0.0
        self.lr = options.schedule.lr
        elapsed_before = 0.0
        for member in members:
            self._restore(member)
        resumed = members[0].checkpoint
        if resumed is not None:
            self.step, self.epoch = int(resumed["step"]), int(resumed["epoch"])
            elapsed_before = float(resumed.get("elapsed_s", 0.0))
            self.log.info("Resumed %s at epoch %d, step %d, after %.0f s of training.",
                          ", ".join(str(m.run_dir) for m in members), self.epoch, self.step, elapsed_before)
        self.clock = _Clock(elapsed_before)
        self.session_start_step = self.step

    # -- set-up ------------------------------------------------------------------------------
    def _restore(self, member: Member) -> None:
        options = self.options
        member.model.to(self.precision.device)
        if self.precision.channels_last:
            member.model.to(memory_format=torch.channels_last_3d)
        member.optimizer = make_optimizer(member.model, options.schedule.lr, options.weight_decay,
                                          options.adam_eps, options.fused, options.growth_lr_scale)
        member.scaler = self.precision.scaler()
        saved = member.checkpoint
        if saved is not None:
            member.model.load_state_dict(saved["model"])
            load_optimizer_state(member.optimizer, saved["optimizer"], member.model)
            if saved.get("scaler"):
                member.scaler.load_state_dict(saved["scaler"])
            member.best = float(saved["best_val_dice"])
            member.best_epoch = int(saved.get("best_epoch", 0))
            member.bad_epochs = int(saved.get("bad_epochs", 0))
            member.loss_sum = float(saved.get("epoch_loss_sum", 0.0))
            member.loss_count = int(saved.get("epoch_steps", 0))
            states = saved.get("rng") or []
            if len(states) == self.info.world_size:
                set_rng_state(states[self.info.rank])
            elif states:
                self.log.warning("Checkpoint saved by %d process(es), resumed by %d: RNG states not restored.",
                                 len(states), self.info.world_size)
        member.runner = member.wrap(member.model) if member.wrap is not None else member.model
        if self.info.is_main:
            (member.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            member.log = _open_log(member.run_dir / "log.csv", append=saved is not None)
            if options.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                step = int(saved["step"]) if saved is not None else 0
                member.writer = SummaryWriter(str(member.run_dir / "tensorboard"), purge_step=step or None)

    def _budget_used(self) -> str:
        if self.schedule.steps and self.step >= self.schedule.steps:
            return self.options.steps_reason
        if self.schedule.seconds > 0 and self.clock.total() >= self.schedule.seconds:
            return "time_limit"
        return ""

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, dict]:
        options, info = self.options, self.info
        stopped = self._budget_used()
        if stopped and self.members[0].checkpoint is not None:
            self.log.info("Nothing to train: the run has used its budget (%s). Extend --epochs, --max-steps or "
                          "--time-limit to continue it.", stopped)
        elif info.is_main:
            budget = [f"{self.schedule.steps} steps" if self.schedule.steps else "",
                      f"{self.schedule.seconds:.0f} s in all" if self.schedule.seconds > 0 else ""]
            warmup = (f"warm-up {self.schedule.warmup_of(self.schedule.steps)} steps"
                      if not self.schedule.by_time(0, 0.0) else
                      f"warm-up {self.schedule.warmup_steps} steps" if self.schedule.warmup_steps else
                      f"warm-up {self.schedule.warmup:.0%} of the time")
            self.log.info("Training %s (%d per epoch) from step %d; %s; last.pt every epoch%s; progress every %.0f s.",
                          " or ".join(b for b in budget if b), options.epoch_steps, self.step, warmup,
                          f" and every {options.checkpoint_minutes:g} min" if options.checkpoint_minutes > 0 else "",
                          options.progress_seconds)
        for member in self.members:
            member.runner.train()
        if not stopped:
            self.source.start(self.step)
        self.clock.start = time.monotonic()  # training time: from here (not the set-up, e.g. the pool's rendering)
        self.val_seconds = 0.0
        self.last_progress = self.last_checkpoint = time.monotonic()
        while not stopped:
            stopped = self._epoch()
        return self._finish(stopped)

    def _epoch(self) -> str:
        options, info = self.options, self.info
        epoch_start, epoch_first_step = time.monotonic(), self.step
        stop_step = self.step + options.epoch_steps - (self.step % options.epoch_steps)
        if self.schedule.steps:
            stop_step = min(stop_step, self.schedule.steps)
        if self.step % options.epoch_steps == 0:
            for member in self.members:
                member.loss_sum, member.loss_count = 0.0, 0
        self.source.begin_epoch(self.step, stop_step)
        bar = self._bar(stop_step)
        time_up = False
        while self.step < stop_step:
            self._train_step()
            bar.update()
            bar.set_postfix(loss=f"{self._recent(self.members[0]):.4f}", lr=f"{self.lr:.2e}")
            now = time.monotonic()
            if info.is_main and now - self.last_progress >= options.progress_seconds:
                self.last_progress = now
                self._progress_line(bar)
            if self.schedule.seconds > 0:
                time_up = distlib.broadcast_flag(
                    self.clock.total() + 1.5 * self.val_seconds + 2.0 > self.schedule.seconds, info)
                if time_up:
                    break
            if options.snapshot_every and self.step % options.snapshot_every == 0:
                for member in self.members:
                    self._save(member, float("nan"), float("nan"), best=False, snapshot=True)
            if options.checkpoint_minutes > 0 and self.step < stop_step and distlib.broadcast_flag(
                    now - self.last_checkpoint >= 60.0 * options.checkpoint_minutes, info):
                for member in self.members:
                    self._save(member, float("nan"), float("nan"), best=False)
                if info.is_main:
                    self.log.info("step %d: wrote last.pt (%.0f s elapsed).", self.step, self.clock.total())
                self.last_checkpoint = time.monotonic()
        bar.close()
        self.epoch += 1
        tick = time.monotonic()
        scores = self.source.validate(self.members, self.loss_fn, self.precision)
        self.val_seconds = time.monotonic() - tick
        stopped = ""
        if time_up:
            stopped = "time_limit"
        elif self.schedule.steps and self.step >= self.schedule.steps:
            stopped = options.steps_reason
        session_steps = self.step - epoch_first_step
        samples_per_s = session_steps * options.batch_size / max(time.monotonic() - epoch_start, 1e-6)
        for member in self.members:
            loss_total, count_total = distlib.all_sum([member.loss_sum, float(member.loss_count)], info)
            member.last_train_loss = loss_total / count_total if count_total else float("nan")
            val_loss, val_dice = scores[member.name]
            improved = self.source.val_cases == 0 or val_dice > member.best + 1e-6
            if improved:
                member.best = val_dice if self.source.val_cases else float("nan")
                member.best_epoch, member.bad_epochs = self.epoch, 0
            else:
                member.bad_epochs += 1
            self._save(member, val_loss, val_dice, best=improved)
            if info.is_main:
                self._log_epoch(member, val_loss, val_dice, samples_per_s)
        if not stopped and options.patience and all(m.bad_epochs >= options.patience for m in self.members):
            stopped = "early_stopping"
        self.last_checkpoint = time.monotonic()
        distlib.barrier(info)
        return stopped

    def _train_step(self) -> None:
        batch = self.source.next_batch()
        tic = time.monotonic()
        image = self.precision.layout(batch["image"])
        self.lr = self.schedule.lr * self.schedule.factor(self.step, self.clock.total())
        for member in self.members:
            set_lr(member.optimizer.param_groups, self.lr)
            loss, applied = optimise(member.runner, image, batch, self.source.target(batch, member.task),
                                     member.optimizer, member.scaler, self.loss_fn,
                                     autocast=self.precision.autocast_args, grad_clip=self.options.grad_clip,
                                     parameters=member.model.parameters(), core_weight=self.options.core_weight,
                                     growth_l2=self.options.growth_l2)
            if applied:
                value = float(loss)
                member.loss_sum += value
                member.loss_count += 1
                member.recent.append(value)
                if member.writer is not None and (self.step + 1) % max(self.options.log_every, 1) == 0:
                    member.writer.add_scalar("train/loss_step", value, self.step + 1)
                    member.writer.add_scalar("train/lr", self.lr, self.step + 1)
            else:
                self._skipped(member)
        self.net_seconds += time.monotonic() - tic
        self.step += 1

    def _skipped(self, member: Member) -> None:
        member.skipped += 1
        who = f"{member.name} " if len(self.members) > 1 else ""
        self.log.warning("%sstep %d: the loss or gradient is not finite (%s); the update was skipped (%d so far).",
                         who, self.step + 1, self.precision.name, member.skipped)
        steps = self.step + 1 - self.session_start_step
        if member.skipped >= DIVERGED_STEPS and member.skipped > DIVERGED_SHARE * steps:
            raise configlib.ConfigError(
                f"Training diverged: {who}{member.skipped} of {steps} steps had a non-finite loss or gradient "
                f"({self.precision.name}); try --precision fp32 or a lower --lr.")

    # -- output ------------------------------------------------------------------------------
    def _bar(self, stop_step: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=stop_step - self.step, desc=f"epoch {self.epoch + 1}", unit="step", leave=False,
                    disable=not (self.options.progress_bar and self.info.is_main))

    @staticmethod
    def _recent(member: Member) -> float:
        return float(np.mean(member.recent)) if member.recent else float("nan")

    def _progress_line(self, bar: Any) -> None:
        now = time.monotonic()
        session = now - self.clock.start
        per_step = session / max(self.step - self.session_start_step, 1)
        left = math.inf
        if self.schedule.steps:
            left = per_step * (self.schedule.steps - self.step)
        if self.schedule.seconds > 0:
            left = min(left, max(self.schedule.seconds - self.clock.total(), 0.0))
        total = f"/{self.schedule.steps}" if self.schedule.steps else ""
        losses = ", ".join(
            (f"{m.name} " if len(self.members) > 1 else "")
            + f"{m.recent[-1] if m.recent else float('nan'):.4f} (epoch mean "
            + (f"{m.loss_sum / m.loss_count:.4f})" if m.loss_count else "nan)")
            for m in self.members)
        status = self.source.status()
        message = (f"epoch {self.epoch + 1} step {self.step}{total}: loss {losses}, lr {self.lr:.2e}, "
                   f"{per_step:.2f} s/step, network {100 * self.net_seconds / max(session, 1e-9):.0f}% of the time, "
                   f"{self.clock.total():.0f} s elapsed, about {left / 60:.0f} min left")
        if status:
            message += f", {status}"
        if bar.disable:
            self.log.info(message)
        else:
            bar.write(message)

    def _save(self, member: Member, val_loss: float, val_dice: float, *, best: bool, snapshot: bool = False) -> None:
        state = _member_state(member, info=self.info, epoch=self.epoch, step=self.step, elapsed=self.clock.total(),
                              val_loss=val_loss, val_dice=val_dice)  # collective in DDP: every rank
        if not self.info.is_main:
            return
        folder = member.run_dir / "checkpoints"
        if snapshot:  # kept for a later choice between checkpoints (python -m Training select)
            save_checkpoint(state, folder / snapshot_name(self.step))
            return
        save_checkpoint(state, folder / "last.pt")
        if best:
            shutil.copyfile(folder / "last.pt", folder / ".best.tmp")
            os.replace(folder / ".best.tmp", folder / "best.pt")

    def _log_epoch(self, member: Member, val_loss: float, val_dice: float, samples_per_s: float) -> None:
        row = [self.epoch, self.step, self.lr, member.last_train_loss, val_loss, val_dice, member.best,
               round(self.clock.total(), 2), samples_per_s]
        csv.writer(member.log).writerow(row)
        member.log.flush()
        if member.writer is not None:
            member.writer.add_scalar("train/loss", member.last_train_loss, self.step)
            member.writer.add_scalar("val/loss", val_loss, self.step)
            member.writer.add_scalar("val/dice", val_dice, self.step)
            member.writer.flush()
        who = f"{member.name}: " if len(self.members) > 1 else ""
        self.log.info("%sepoch %d step %d: train loss %.4f, val loss %.4f, val Dice %.4f (best %.4f, epoch %d), "
                      "%.0f s elapsed", who, self.epoch, self.step, member.last_train_loss, val_loss, val_dice,
                      member.best, member.best_epoch, self.clock.total())

    def _finish(self, stopped: str) -> dict[str, dict]:
        session = time.monotonic() - self.clock.start
        results = {}
        for member in self.members:
            best_path = member.run_dir / "checkpoints" / "best.pt"
            result = {"run_dir": str(member.run_dir), "best_checkpoint": str(best_path),
                      "best_val_dice": member.best, "best_epoch": member.best_epoch, "steps": self.step,
                      "epochs": self.epoch, "stopped": stopped, "final_train_loss": member.last_train_loss,
                      "device": str(self.precision.device), "world_size": self.info.world_size,
                      "seconds": self.clock.total(), "session_seconds": session,
                      "network_share": self.net_seconds / max(session, 1e-9), "skipped_steps": member.skipped}
            results[member.name] = result
            if self.info.is_main:
                write_json(result, member.run_dir / "result.json", overwrite=True)
                self.log.info("%sStopped (%s) after %d steps; best val Dice %.4f -> %s",
                              f"{member.name}: " if len(self.members) > 1 else "", stopped, self.step, member.best,
                              best_path)
            if member.log is not None:
                member.log.close()
            if member.writer is not None:
                member.writer.close()
        return results
