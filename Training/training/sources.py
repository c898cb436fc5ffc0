"""The training loop's data sources (:class:`Training.training.loop.DataSource`), interchangeable:

* :class:`CacheSource`: the preprocessed cache (``train``): a replayable sample stream, the batch
  of a step a function of the step alone, augmented on the device; validation on the cache's
  ``val`` split, sharded over the processes of a ``torchrun`` launch;
* :class:`PoolSource`: the CPU recipe of ``train-synth``: lesion-centred patches of pre-rendered
  volumes that a background process keeps refreshing (:class:`Training.synthesis.pool.SynthPool`);
* :class:`GpuSynthSource`: ``train-synth`` on a GPU: label samples from CPU workers, images
  synthesised on the device at every step (:class:`Training.synthesis.gpu_synth.GpuSynthesizer`).

The two synthetic sources drop clinical features at random on the device and validate every
member on the same fixed, whole-volume cases: synthesised from held-out lesions
(:func:`synthetic_validation`), or the preprocessed fixed evaluation sets (:func:`cached_validation`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from Training.data.dataset import CacheDataset, StreamSampler, apply_augmentation, make_loader
from Training.training import distributed as distlib
from Training.training.loop import Member, Precision, forward

logger = logging.getLogger(__name__)

#: Stream offset per step of the synthetic sources' seeds, so that a resumed run draws new data.
RESUME_SEED_STRIDE = 1_000_003


def to_device(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def cache_batch(batch: dict, device: torch.device) -> dict:
    """A collated cache batch on ``device``, augmented there when it carries ``aug_*`` parameters."""
    batch = to_device(batch, device)
    if "aug_theta" in batch:
        batch["image"], batch["target"] = apply_augmentation(batch["image"], batch["target"], batch["brain"], batch)
    return batch


def dice_score(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean arrays; 1.0 when both are empty."""
    total = int(prediction.sum()) + int(target.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, target).sum()) / total


def dice_per_case(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of ``logits > 0`` (probability 0.5) against ``target > 0.5``, per case (N,); 1 when
    both are empty."""
    prediction = logits > 0
    truth = target > 0.5
    inter = (prediction & truth).flatten(1).sum(1).float()
    total = prediction.flatten(1).sum(1).float() + truth.flatten(1).sum(1).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


# ----------------------------------------------------------------------------------------
# The preprocessed cache
# ----------------------------------------------------------------------------------------
class CacheSource:
    """Batches of the cache's ``train`` split, validation on its ``val`` split.

    Args:
        train_set, val_set: the datasets (augmentation is set on ``train_set``).
        sampler: the stream of this process (:class:`StreamSampler`), behind ``loader``.
        loader: the DataLoader of ``train_set`` with ``sampler``.
        info: this process in a ``torchrun`` launch.
        workers: DataLoader workers of the validation.
        val_threshold: probability threshold of the validation Dice.
        progress_seconds: a validation progress line at least this often.
        log: the front end's logger.
    """

    def __init__(self, train_set: CacheDataset, val_set: CacheDataset, sampler: StreamSampler, loader: Any,
                 info: distlib.DistInfo, *, workers: int = 0, val_threshold: float = 0.5,
                 progress_seconds: float = 30.0, log: logging.Logger = logger) -> None:
        self.train_set, self.val_set, self.sampler, self.loader = train_set, val_set, sampler, loader
        self.info, self.workers, self.val_threshold = info, workers, val_threshold
        self.progress_seconds, self.log = progress_seconds, log
        self.val_cases = len(val_set)
        self._batches: Iterator[dict] | None = None

    def start(self, step: int) -> None:
        pass  # the stream is positioned per epoch

    def begin_epoch(self, step: int, stop: int) -> None:
        self.sampler.set_range(step, stop)
        self._batches = iter(self.loader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return cache_batch(next(self._batches), self.info.device)

    def target(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:  # noqa: ARG002
        return batch["target"]  # the cache's datasets hold the run's task

    def status(self) -> str:
        return ""

    def close(self) -> None:
        self._batches = None

    def validate(self, members: list[Member], loss_fn: Any, precision: Precision) -> dict[str, tuple[float, float]]:
        return {m.name: self.validate_model(m.runner, loss_fn, precision) for m in members}

    def validate_model(self, model: torch.nn.Module, loss_fn: Any, precision: Precision) -> tuple[float, float]:
        """Mean validation loss and Dice over the ``val`` split (sharded over processes).

        Runs under a forked RNG, so validation never changes the training random stream.
        """
        info, dataset = self.info, self.val_set
        if len(dataset) == 0:
            return float("nan"), float("nan")
        indices = list(range(info.rank, len(dataset), info.world_size))
        subset = torch.utils.data.Subset(dataset, indices)
        loader = make_loader(subset, batch_size=1, workers=min(self.workers, len(indices)),
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
                if info.is_main and time.monotonic() - last_line >= self.progress_seconds:
                    last_line = time.monotonic()
                    self.log.info("validation: %d of %d case(s) after %.0f s", done * info.world_size, len(dataset),
                                  last_line - start)
                batch = to_device(batch, info.device)
                with precision.autocast():
                    out = forward(model, precision.layout(batch["image"]), batch)
                logits = out["logits"].float()
                loss_sum += float(loss_fn(logits, batch["target"]))
                prediction = (torch.sigmoid(logits) > self.val_threshold).cpu().numpy()
                dice_sum += dice_score(prediction, batch["target"].cpu().numpy() > 0.5)
        model.train(was_training)
        loss_total, dice_total, count = distlib.all_sum([loss_sum, dice_sum, float(len(indices))], info)
        return loss_total / max(count, 1), dice_total / max(count, 1)


# ----------------------------------------------------------------------------------------
# Synthesis
# ----------------------------------------------------------------------------------------
def synthetic_validation(pack: Any, synth: Any, *, subset: str, seed: int, count: int, batch_size: int,
                         device: torch.device) -> list[dict[str, torch.Tensor]]:
    """``count`` whole-volume cases synthesised from the pack's ``subset`` lesions (held out from
    training for ``val``), fixed by ``seed``, in batches of ``batch_size``."""
    from Training.synthesis.gpu_synth import LabelSampler

    labels = LabelSampler(pack, subset=subset, seed=seed + 10_000, length=count)
    generator = torch.Generator(device=device).manual_seed(seed + 20_000)
    batches = []
    for start in range(0, count, batch_size):
        items = [labels[i] for i in range(start, min(start + batch_size, count))]
        batches.append(synth(torch.utils.data.default_collate(items), generator))
    return batches


def cached_validation(caches: tuple[Path, ...] | list[Path], grid_size: tuple[int, int, int], tasks: set[str], *,
                      max_cases: int = 0, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Whole-grid validation cases (one per batch) from preprocessed caches of fixed sets
    (``python -m Training preprocess --data data/val_mimics --out CACHE``): every case of each cache,
    whatever its split, or its first ``max_cases``. Selecting checkpoints on the fixed sets with
    real-scan mimics, showers and small lesions instead of freshly synthesised whole volumes.

    Raises:
        CacheError: a cache on another grid, or a case without the target of one of ``tasks``.
    """
    from Training.data.dataset import CacheError, load_index

    batches = []
    for cache in caches:
        ids = [meta["case_id"] for meta in load_index(cache)["cases"]][: max_cases or None]
        # one dataset per task: each names a case without its target
        datasets = {task: CacheDataset(cache, ids, task) for task in sorted(tasks)}
        first = next(iter(datasets.values()))
        if first.size_kji != tuple(int(v) for v in grid_size[::-1]):
            raise CacheError(f"Validation cache {cache} is on a {first.size_kji[::-1]} grid; this run's grid is "
                             f"{tuple(grid_size)}.")
        for i in range(len(ids)):
            item = first.load(i)
            batch = {key: torch.as_tensor(item[key])[None]
                     for key in ("image", "brain", "clinical_values", "clinical_missing", "flair_present")}
            for task, dataset in datasets.items():
                batch[task] = torch.from_numpy(item["target"] if dataset is first else dataset.load_target(i))[None]
            batches.append(to_device(batch, device))
    if not batches:
        raise CacheError(f"No validation cases in {', '.join(str(c) for c in caches)}.")
    return batches


class _SynthSource:
    """What the two synthetic sources share: clinical drop-out and validation."""

    def __init__(self, *, val_batches: list[dict[str, torch.Tensor]], generator: torch.Generator,
                 clinical_drop_p: float, device: torch.device) -> None:
        self.val_batches, self.generator = val_batches, generator
        self.clinical_drop_p, self.device = clinical_drop_p, device
        self.val_cases = sum(int(b["image"].shape[0]) for b in val_batches)

    def begin_epoch(self, step: int, stop: int) -> None:
        pass  # an endless stream

    def target(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        return batch[task]

    def status(self) -> str:
        return ""

    def _drop_clinical(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        drop = torch.rand(batch["clinical_missing"].shape, generator=self.generator, device=self.device)
        missing = batch["clinical_missing"] | (drop < self.clinical_drop_p)
        return {**batch, "clinical_missing": missing, "clinical_values": batch["clinical_values"] * ~missing}

    def validate(self, members: list[Member], loss_fn: Any, precision: Precision) -> dict[str, tuple[float, float]]:
        """Every member on the same fixed cases: mean loss over the batches and mean Dice per case."""
        scores: dict[str, list[torch.Tensor]] = {m.name: [] for m in members}
        losses: dict[str, list[float]] = {m.name: [] for m in members}
        for member in members:
            member.runner.eval()
        with torch.no_grad(), precision.autocast():
            for batch in self.val_batches:
                image = precision.layout(batch["image"])
                for member in members:
                    logits = forward(member.runner, image, batch)["logits"].float()
                    target = self.target(batch, member.task)
                    scores[member.name].append(dice_per_case(logits, target))
                    losses[member.name].append(float(loss_fn(logits, target)))
        for member in members:
            member.runner.train()
        return {name: (float(np.mean(losses[name])) if losses[name] else float("nan"),
                       float(torch.cat(values).mean()) if values else float("nan"))
                for name, values in scores.items()}


class PoolSource(_SynthSource):
    """Lesion-centred patches of a pool of pre-rendered volumes, refreshed in the background.

    Args:
        pack: the synthesis pack file.
        grid_size: the model grid (i, j, k).
        patch: patch size (k, j, i), multiples of ``divisor``.
        task: the task whose lesions the patches are centred on.
        batch_size, lesion_fraction: patches per step, and the share centred on a lesion.
        mimic_fraction: the share of the other patches centred on a hard negative (DWI bright,
            ADC normal; :func:`Training.synthesis.pool.bright_normal_adc`).
        scenarios: counterfactual onset/treatment scenarios per pool volume (outcome task).
        size, refresh, pause: volumes in the pool, fresh volumes swapped in per step at most, and
            the background renderer's pause after each volume (seconds).
        seed: seed of the pool (offset by the step a resumed run starts at).
        focus_fraction, focus_patch, focus_voxels: the share of steps that train instead on a focus
            pair (:meth:`Training.synthesis.pool.SynthPool.focus_batch`: a ``focus_patch`` crop centred
            on a lesion of fewer than ``focus_voxels`` voxels and one centred on a hard negative).
        synth: the image synthesis's ranges (:class:`Training.synthesis.gpu_synth.SynthConfig`; None: defaults).
    """

    def __init__(self, pack: Path, grid_size: tuple[int, int, int], *, patch: tuple[int, int, int], task: str,
                 batch_size: int, lesion_fraction: float, size: int, refresh: int, pause: float, seed: int,
                 divisor: int, mimic_fraction: float = 0.0, scenarios: int = 0, focus_fraction: float = 0.0,
                 focus_patch: tuple[int, int, int] = (64, 64, 64), focus_voxels: int = 125, synth: Any = None,
                 **shared: Any) -> None:
        super().__init__(**shared)
        self.synth = synth
        self.focus_fraction, self.focus_patch, self.focus_voxels = focus_fraction, focus_patch, focus_voxels
        self.focus_steps = 0
        self.pack, self.grid_size, self.patch, self.task = pack, grid_size, patch, task
        self.batch_size, self.lesion_fraction, self.mimic_fraction = batch_size, lesion_fraction, mimic_fraction
        self.scenarios = scenarios
        self.size, self.refresh, self.pause, self.seed, self.divisor = size, refresh, pause, seed, divisor
        self.pool: Any = None

    def start(self, step: int) -> None:
        from Training.synthesis.pool import SynthPool

        logger.info("rendering %d pool volumes ...", self.size)
        self.pool = SynthPool(self.pack, self.grid_size, size=self.size, seed=self.seed + RESUME_SEED_STRIDE * step,
                              divisor=self.divisor, pause=self.pause, scenarios=self.scenarios, synth=self.synth)

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.pool.refresh(self.refresh)
        if self.focus_fraction > 0 and self.pool.rng.random() < self.focus_fraction:
            self.focus_steps += 1
            batch = self.pool.focus_batch(self.focus_patch, task=self.task, max_voxels=self.focus_voxels)
        else:
            batch = self.pool.batch(self.batch_size, self.patch, task=self.task,
                                    lesion_fraction=self.lesion_fraction, mimic_fraction=self.mimic_fraction)
        return self._drop_clinical(to_device(batch, self.device))

    def status(self) -> str:
        if self.pool is None:
            return ""
        return f"pool refreshed {self.pool.refreshed}" + (f", focus steps {self.focus_steps}"
                                                           if self.focus_fraction else "")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


class GpuSynthSource(_SynthSource):
    """Whole volumes synthesised on the device at every step from label samples of CPU workers.

    Args:
        pack: the loaded synthesis pack; ``synth`` renders its label samples.
        batch_size, reuse: images per step, and images synthesised from each label sample.
        workers: label-sampling worker processes.
        seed: seed of the label stream (offset by the step a resumed run starts at).
    """

    def __init__(self, pack: Any, synth: Any, *, batch_size: int, reuse: int, workers: int, seed: int,
                 **shared: Any) -> None:
        super().__init__(**shared)
        self.pack, self.synth = pack, synth
        self.batch_size, self.reuse, self.workers, self.seed = batch_size, max(reuse, 1), workers, seed
        self._labels: Iterator[dict] | None = None

    def start(self, step: int) -> None:
        from Training.synthesis.gpu_synth import LabelSampler

        sampler = LabelSampler(self.pack, subset="train", seed=self.seed + RESUME_SEED_STRIDE * step,
                               length=10_000_000)
        loader = torch.utils.data.DataLoader(
            sampler, batch_size=max(1, self.batch_size // self.reuse), shuffle=False, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
            prefetch_factor=4 if self.workers > 0 else None,
        )
        self._labels = iter(loader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        labels = next(self._labels)
        labels = {k: v.repeat_interleave(self.reuse, dim=0) if torch.is_tensor(v) else v for k, v in labels.items()}
        return self._drop_clinical(self.synth(labels, self.generator))

    def close(self) -> None:
        self._labels = None
