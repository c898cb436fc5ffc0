"""Training data: the cached dataset, a replayable sample stream, and augmentation.

Design (so that a run can be replayed exactly and scaled to several GPUs):

* The training samples form one **stream**: pass ``p`` over the training cases is the
  permutation ``default_rng([seed, p]).permutation(n)``, and stream position ``s`` is element
  ``s % n`` of pass ``s // n``. Optimiser step ``t`` consumes the positions
  ``[t * B, (t + 1) * B)`` of the global batch ``B``; with ``R`` processes, rank ``r`` takes the
  ``r``-th contiguous chunk of ``B / R`` of them. The batch of a step is therefore a function of
  the step alone: independent of the number of processes, of DataLoader workers, and of where
  a run was interrupted (:class:`StreamSampler`).
* Augmentation **picks its parameters** from ``default_rng([seed, 1, position])`` in the
  dataset (cheap, in the DataLoader workers) and **applies** them with a deterministic function
  on the training device (:func:`apply_augmentation`: spatial resampling with ``grid_sample``,
  gamma, contrast and noise), so the loader only memory-maps and copies arrays, and the heavy
  voxel work runs on the GPU. FLAIR drop-out and clinical-feature drop-out are applied in the
  dataset (they only zero a channel or set missing flags).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from StrokePredictorLib.clinical import N_FEATURES
from StrokePredictorLib.errors import StrokePredictorError

CHANNEL_DWI, CHANNEL_ADC, CHANNEL_FLAIR = 0, 1, 2


class CacheError(StrokePredictorError):
    """The training cache is missing, incomplete or unsuitable for the requested task."""


# ----------------------------------------------------------------------------------------
# The cache on disk
# ----------------------------------------------------------------------------------------
def load_index(cache: str | Path) -> dict:
    """Read ``CACHE/index.json`` (written by ``python -m Training preprocess``)."""
    path = Path(cache) / "index.json"
    if not path.is_file():
        raise CacheError(f"{cache} is not a training cache (no index.json); run `python -m Training preprocess` first.")
    return json.loads(path.read_text())


def load_split(cache: str | Path) -> dict[str, list[str]]:
    """Read ``CACHE/split.json``."""
    from Training.data.cache import read_split

    path = Path(cache) / "split.json"
    if not path.is_file():
        raise CacheError(f"Training cache {cache} has no split.json; run `python -m Training preprocess` again.")
    return read_split(path)


def task_cases(cache: str | Path, split: str, task: str) -> list[str]:
    """Case ids of ``split`` that have a target for ``task`` (``acute`` or ``outcome``)."""
    index = load_index(cache)
    metas = {m["case_id"]: m for m in index["cases"]}
    ids = load_split(cache).get(split, [])
    return [c for c in ids if c in metas and task in metas[c]["targets"]]


# ----------------------------------------------------------------------------------------
# Augmentation: parameters (numpy, per sample) and application (torch, per batch)
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation ranges. Probabilities are per sample."""

    spatial_p: float = 0.8  # probability of a random affine (rotation, scaling, shift)
    flip_p: float = 0.5  # left-right flip (the i axis of the model grid points left)
    rotate_deg: float = 10.0  # max rotation about the axial (k) axis; half of it about the other two
    scale: float = 0.1  # isotropic scaling in [1 - scale, 1 + scale]
    shift_mm: float = 6.0  # max translation per axis
    elastic_p: float = 0.0  # probability of a smooth random deformation
    elastic_mm: float = 4.0  # max displacement of the elastic deformation
    intensity_p: float = 0.8  # probability of gamma/contrast/noise
    gamma: float = 0.3  # DWI/FLAIR gamma in [1 - gamma, 1 + gamma]
    contrast: float = 0.25  # DWI/FLAIR contrast about the brain median (1.0) in [1 - c, 1 + c]
    adc_scale: float = 0.08  # ADC is quantitative: only a scanner-like scale in [1 - s, 1 + s]
    noise: float = 0.05  # max Gaussian noise std per channel (normalised units)
    flair_drop_p: float = 0.3  # zero the FLAIR channel and mark it absent
    clinical_drop_p: float = 0.25  # mark each clinical feature missing with this probability


ELASTIC_GRID = 5  # control points per axis of the elastic deformation


def sample_augmentation(rng: np.random.Generator, config: AugmentConfig, grid_size_kji: tuple[int, int, int],
                        spacing_kji: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Draw one sample's augmentation parameters (the "random" half; see :func:`apply_augmentation`).

    Args:
        grid_size_kji, spacing_kji: model grid shape (D, H, W) and spacing in mm (k, j, i).

    Returns:
        ``aug_theta`` float32 (3, 4): output -> input map in ``affine_grid``'s normalised (x=i,
        y=j, z=k) coordinates; ``aug_elastic`` float32 (3, g, g, g) displacement (normalised);
        ``aug_gamma``, ``aug_contrast``, ``aug_scale``, ``aug_noise`` float32 (3,) per channel;
        ``aug_seed`` int64 (noise seed).
    """
    theta = np.zeros((3, 4), dtype=np.float32)
    theta[:, :3] = np.eye(3)
    extent = np.asarray(grid_size_kji[::-1], float) * np.asarray(spacing_kji[::-1], float)  # x, y, z in mm
    linear = np.eye(3)
    if rng.random() < config.spatial_p:
        angles = np.radians(rng.uniform(-1, 1, 3) * config.rotate_deg * np.array([0.5, 0.5, 1.0]))
        cx, cy, cz = np.cos(angles)
        sx, sy, sz = np.sin(angles)
        rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        zoom = 1.0 + rng.uniform(-config.scale, config.scale)
        linear = rot_z @ rot_y @ rot_x / zoom
        theta[:, 3] = rng.uniform(-1, 1, 3) * config.shift_mm / (extent / 2)
    if rng.random() < config.flip_p:
        linear = linear @ np.diag([-1.0, 1.0, 1.0])
    # physical map -> normalised coordinates: theta = N^-1 A N with N = diag(extent / 2)
    theta[:, :3] = np.diag(2 / extent) @ linear @ np.diag(extent / 2)
    elastic = np.zeros((3, ELASTIC_GRID, ELASTIC_GRID, ELASTIC_GRID), dtype=np.float32)
    if rng.random() < config.elastic_p:
        field = rng.uniform(-1, 1, elastic.shape) * config.elastic_mm
        elastic = (field / (extent / 2)[:, None, None, None]).astype(np.float32)
    gamma = np.ones(3, np.float32)
    contrast = np.ones(3, np.float32)
    scale = np.ones(3, np.float32)
    noise = np.zeros(3, np.float32)
    if rng.random() < config.intensity_p:
        gamma[[CHANNEL_DWI, CHANNEL_FLAIR]] = 1 + rng.uniform(-config.gamma, config.gamma, 2)
        contrast[[CHANNEL_DWI, CHANNEL_FLAIR]] = 1 + rng.uniform(-config.contrast, config.contrast, 2)
        scale[CHANNEL_ADC] = 1 + rng.uniform(-config.adc_scale, config.adc_scale)
        noise[:] = rng.uniform(0, config.noise, 3)
    return {
        "aug_theta": theta,
        "aug_elastic": elastic,
        "aug_gamma": gamma,
        "aug_contrast": contrast,
        "aug_scale": scale,
        "aug_noise": noise,
        "aug_seed": np.int64(rng.integers(0, 2**62)),
    }


def identity_augmentation(grid_size_kji: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Parameters that leave a sample unchanged."""
    off = AugmentConfig(**{name: 0.0 for name in AugmentConfig.__dataclass_fields__})
    return sample_augmentation(np.random.default_rng(0), off, grid_size_kji, (1.0, 1.0, 1.0))


def apply_augmentation(image: torch.Tensor, target: torch.Tensor, brain: torch.Tensor,
                       params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply recorded augmentation parameters to a batch (deterministic).

    Args:
        image: (B, 3, D, H, W) float32 normalised channels (zero outside the brain).
        target: (B, 1, D, H, W) float32 in {0, 1}.
        brain: (B, 1, D, H, W) float32 or bool brain mask.
        params: the ``aug_*`` tensors of :func:`sample_augmentation`, batched, on any device.

    Returns:
        (image, target) of the same shapes; the target stays binary and the image stays zero
        outside the (transformed) brain.
    """
    device = image.device
    batch = image.shape[0]
    brain = brain.to(image.dtype)
    theta = params["aug_theta"].to(device=device, dtype=torch.float32)
    elastic = params["aug_elastic"].to(device=device, dtype=torch.float32)
    identity = torch.eye(3, 4, device=device).expand_as(theta)
    if not torch.equal(theta, identity) or bool(elastic.abs().amax() > 0):
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        if bool(elastic.abs().amax() > 0):
            displacement = F.interpolate(elastic, size=image.shape[2:], mode="trilinear", align_corners=True)
            grid = grid + displacement.permute(0, 2, 3, 4, 1)
        grid = grid.to(image.dtype)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        stacked = torch.cat([target.to(image.dtype), brain], dim=1)
        stacked = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5
        target = stacked[:, :1].to(image.dtype)
        brain = stacked[:, 1:].to(image.dtype)
    gamma = params["aug_gamma"].to(device=device, dtype=image.dtype)[:, :, None, None, None]
    contrast = params["aug_contrast"].to(device=device, dtype=image.dtype)[:, :, None, None, None]
    scale = params["aug_scale"].to(device=device, dtype=image.dtype)[:, :, None, None, None]
    noise = params["aug_noise"].to(device=device, dtype=image.dtype)
    image = image.clamp_min(0)
    if bool((gamma != 1).any()):
        peak = image.amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
        image = peak * (image / peak) ** gamma
    image = ((1 + contrast * (image - 1)) * scale).clamp_min(0)
    if bool((noise > 0).any()):
        seeds = params["aug_seed"].tolist()
        draws = []
        for index in range(batch):
            generator = torch.Generator(device=device).manual_seed(int(seeds[index]) % (2**63 - 1))
            draws.append(torch.randn(image.shape[1:], generator=generator, device=device, dtype=image.dtype))
        image = image + torch.stack(draws) * noise[:, :, None, None, None]
        image = image.clamp_min(0)
    return image * brain, target


# ----------------------------------------------------------------------------------------
# Sample stream and dataset
# ----------------------------------------------------------------------------------------
class StreamSampler(Sampler):
    """Yields ``(case_index, stream_position)`` for this rank's share of steps ``[start, stop)``.

    See the module docstring: step ``t`` uses stream positions ``t * B + r * b + [0, b)`` on
    rank ``r`` of ``R`` (``b = B / R``); pass ``p`` over the ``n`` cases is the permutation
    ``default_rng([seed, p]).permutation(n)``.
    """

    def __init__(self, n_cases: int, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if n_cases < 1:
            raise CacheError("The training split has no case for this task.")
        if global_batch % world_size:
            raise CacheError(f"batch_size {global_batch} must be divisible by the number of processes {world_size}.")
        self.n = n_cases
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.start = 0
        self.stop = 0
        self._perm: dict[int, np.ndarray] = {}

    def set_range(self, start_step: int, stop_step: int) -> None:
        """Choose the optimiser steps the next iteration covers."""
        self.start, self.stop = int(start_step), int(stop_step)

    def _permutation(self, p: int) -> np.ndarray:
        if p not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            self._perm[p] = np.random.default_rng([self.seed, p]).permutation(self.n)
        return self._perm[p]

    def position_case(self, position: int) -> int:
        return int(self._permutation(position // self.n)[position % self.n])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in range(self.start, self.stop):
            first = step * self.global_batch + self.rank * self.local_batch
            for position in range(first, first + self.local_batch):
                yield self.position_case(position), position

    def __len__(self) -> int:
        return max(self.stop - self.start, 0) * self.local_batch


class CacheDataset(Dataset):
    """Cached cases of one split and task.

    ``dataset[i]`` gives case ``i`` unchanged (validation); ``dataset[(i, position)]`` gives it
    with the augmentation of stream ``position`` (training; see :class:`StreamSampler`).

    Items (numpy, collated to tensors): ``image`` float32 (3, D, H, W); ``target`` float32
    (1, D, H, W); ``brain`` bool (1, D, H, W); ``clinical_values`` float32 (10,);
    ``clinical_missing`` bool (10,); ``flair_present`` bool; ``index`` int; plus the ``aug_*``
    parameters when augmenting.
    """

    def __init__(self, cache: str | Path, case_ids: list[str], task: str, *,
                 augment: AugmentConfig | None = None, seed: int = 0) -> None:
        self.cache = Path(cache)
        index = load_index(cache)
        metas = {m["case_id"]: m for m in index["cases"]}
        unknown = [c for c in case_ids if c not in metas]
        if unknown:
            raise CacheError(f"Training cache {cache} has no case(s) {', '.join(unknown[:5])}.")
        lacking = [c for c in case_ids if task not in metas[c]["targets"]]
        if lacking:
            raise CacheError(f"Case(s) {', '.join(lacking[:5])} in {cache} have no '{task}' target.")
        self.case_ids = list(case_ids)
        self.metas = [metas[c] for c in case_ids]
        self.task = task
        self.augment = augment
        self.seed = seed
        grid = index["grid"]
        self.size_kji = tuple(int(v) for v in grid["size"][::-1])
        self.spacing_kji = tuple(float(v) for v in grid["spacing"][::-1])

    def __len__(self) -> int:
        return len(self.case_ids)

    def load(self, i: int) -> dict[str, np.ndarray]:
        folder = self.cache / "cases" / self.case_ids[i]
        meta = self.metas[i]
        return {
            "image": np.array(np.load(folder / "image.npy", mmap_mode="r"), dtype=np.float32),
            "target": self.load_target(i),
            "brain": np.array(np.load(folder / "brain.npy", mmap_mode="r"), dtype=bool)[None],
            "clinical_values": np.asarray(meta["clinical_values"], dtype=np.float32),
            "clinical_missing": np.asarray(meta["clinical_missing"], dtype=bool),
            "flair_present": np.bool_(meta["flair_present"]),
            "index": np.int64(i),
        }

    def load_target(self, i: int) -> np.ndarray:
        """Case ``i``'s target of this dataset's task, float32 (1, D, H, W)."""
        folder = self.cache / "cases" / self.case_ids[i]
        return np.array(np.load(folder / f"{self.task}.npy", mmap_mode="r"), dtype=np.float32)[None]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            i, position = int(key[0]), int(key[1])
        else:
            i, position = int(key), None
        item = self.load(i)
        if self.augment is None or position is None:
            return item
        rng = np.random.default_rng([self.seed, 1, position])
        config = self.augment
        if item["flair_present"] and rng.random() < config.flair_drop_p:
            item["image"][CHANNEL_FLAIR] = 0.0
            item["flair_present"] = np.bool_(False)
        drop = rng.random(N_FEATURES) < config.clinical_drop_p
        item["clinical_missing"] = item["clinical_missing"] | drop
        item["clinical_values"] = np.where(item["clinical_missing"], 0.0, item["clinical_values"]).astype(np.float32)
        item.update(sample_augmentation(rng, config, self.size_kji, self.spacing_kji))
        item["position"] = np.int64(position)
        return item


def make_loader(dataset: Dataset, *, sampler: Sampler | None = None, batch_size: int = 1, workers: int = 0,
                pin_memory: bool = False, prefetch: int = 2, seed: int = 0) -> DataLoader:
    """A DataLoader that keeps up with the model: worker processes, pinned memory, persistent
    workers and prefetching; its own generator, so it never draws from the global torch RNG."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=max(prefetch, 1))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, drop_last=False, generator=torch.Generator().manual_seed(seed), **kwargs)


def steps_per_pass(n_cases: int, global_batch: int) -> int:
    """Optimiser steps for one pass over ``n_cases`` cases."""
    return max(math.ceil(n_cases / global_batch), 1)
