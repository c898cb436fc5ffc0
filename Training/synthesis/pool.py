"""A pool of pre-rendered synthetic volumes for training on the CPU, refreshed in the background.

Synthesising a full domain-randomised volume (:class:`Training.synthesis.gpu_synth.GpuSynthesizer`) costs
far more on a CPU than a training step does, so the CPU recipe does not synthesise per step:

* the pool holds ``size`` whole model-grid volumes (image float16, acute and outcome targets,
  brain mask, clinical record), rendered once at the start;
* a background process (:func:`_render_forever`, one thread) keeps rendering new volumes, and
  :meth:`SynthPool.refresh` swaps them in for the oldest ones, so the data keeps changing while
  the training process spends its time in the network;
* every step cuts patches out of pool volumes and re-augments them cheaply
  (:func:`augment_patch`: left-right mirror, DWI/FLAIR gain and gamma, small ADC scale and
  noise), a third of them (``lesion_fraction``) centred on a lesion component chosen uniformly
  among the volume's components, so that small lesions and embolic foci are seen as often as
  large infarcts (nnU-Net's foreground oversampling, per component); with ``mimic_fraction``,
  that share of the other patches is centred on a *hard negative*: a voxel that is bright on DWI
  with a normal or raised ADC away from any lesion (:func:`bright_normal_adc`), which is what the
  real-scan mimics (susceptibility, T2 shine-through, cortical ribbon) look like to the network.
* with ``scenarios`` (outcome task), each volume also carries that many counterfactual onset
  time/treatment scenarios of the same case with their simulated final infarcts
  (:class:`Training.synthesis.gpu_synth.LabelSampler`), and each patch takes one of the volume's
  scenarios at random: the same image with different clinical values and targets, which is the
  direct lesson of what onset time and treatment change (about 0.2 s more per rendered volume).

A patch's first voxel is a multiple of the network's size divisor and comes with its ``window``
(first voxel and whole-grid size), which :class:`StrokePredictorLib.network.StrokeNet` uses to
give the patch's bottleneck tokens their full-grid positions.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

if TYPE_CHECKING:
    from Training.synthesis.gpu_synth import SynthConfig

logger = logging.getLogger(__name__)

TASKS = ("acute", "outcome")


@dataclass
class PoolVolume:
    """One pre-rendered case on the model grid ``(K, J, I)``."""

    image: np.ndarray  # float16 (3, K, J, I): DWI, ADC, FLAIR, normalised as at inference
    acute: np.ndarray  # bool (K, J, I)
    outcome: np.ndarray  # bool (K, J, I)
    brain: np.ndarray  # bool (K, J, I)
    clinical_values: np.ndarray  # float32 (10,)
    clinical_missing: np.ndarray  # bool (10,)
    flair_present: bool
    components: dict[str, list[np.ndarray]]  # task -> voxel indices (n, 3) of each 26-connected component
    hard_negatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))  # (n, 3) voxel indices
    # counterfactual scenarios of the same image (LabelSampler ``scenarios``): (values, missing, outcome mask)
    scenarios: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


#: A hard negative: DWI at least this many times the brain median ...
HARD_NEGATIVE_DWI = 1.4
#: ... with an ADC (10^-3 mm^2/s) at least this (infarcts restrict diffusion: 0.55-0.73 on real scans,
#: real-scan mimics 0.82-0.91) ...
HARD_NEGATIVE_ADC = 0.78
#: ... and at least this many voxels from any lesion of either task.
HARD_NEGATIVE_MARGIN = 3


def bright_normal_adc(image: np.ndarray, brain: np.ndarray, lesions: np.ndarray) -> np.ndarray:
    """Voxel indices ``(n, 3)`` of the hard negatives of one normalised volume ``image`` (3, K, J, I):
    bright on DWI, normal or raised ADC, inside ``brain`` and away from ``lesions`` (bool)."""
    dwi, adc = image[0].astype(np.float32), image[1].astype(np.float32)
    near = ndimage.binary_dilation(lesions, iterations=HARD_NEGATIVE_MARGIN) if lesions.any() else lesions
    return np.argwhere((dwi >= HARD_NEGATIVE_DWI) & (adc >= HARD_NEGATIVE_ADC) & brain & ~near)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return []
    order = np.argsort(labels, axis=None, kind="stable")
    flat = labels.ravel()[order]
    bounds = np.searchsorted(flat, np.arange(1, count + 2))
    coords = np.stack(np.unravel_index(order, mask.shape), axis=1)
    return [coords[bounds[i]:bounds[i + 1]] for i in range(count)]


def volumes_from_batch(batch: dict[str, torch.Tensor]) -> list[PoolVolume]:
    """Split a synthesised batch (:class:`GpuSynthesizer` output) into pool volumes."""
    out = []
    for n in range(batch["image"].shape[0]):
        acute = batch["acute"][n, 0].cpu().numpy() > 0.5
        outcome = batch["outcome"][n, 0].cpu().numpy() > 0.5
        image = batch["image"][n].cpu().numpy()
        brain = batch["brain"][n, 0].cpu().numpy().astype(bool)
        out.append(PoolVolume(
            image=image.astype(np.float16),
            acute=acute, outcome=outcome, brain=brain,
            clinical_values=batch["clinical_values"][n].cpu().numpy().astype(np.float32),
            clinical_missing=batch["clinical_missing"][n].cpu().numpy().astype(bool),
            flair_present=bool(batch["flair_present"][n]),
            components={"acute": _components(acute), "outcome": _components(outcome)},
            hard_negatives=bright_normal_adc(image, brain, acute | outcome),
            scenarios=[(batch["clinical_values_alt"][n, s].cpu().numpy().astype(np.float32),
                        batch["clinical_missing_alt"][n, s].cpu().numpy().astype(bool),
                        batch["outcome_alt"][n, s].cpu().numpy() > 0.5)
                       for s in range(batch["outcome_alt"].shape[1] if "outcome_alt" in batch else 0)],
        ))
    return out


class Renderer:
    """Renders pool volumes from the synthesis pack (label sampling + image synthesis, on the CPU)."""

    def __init__(self, pack_path: str | Path, grid_size: tuple[int, int, int], *, subset: str = "train",
                 seed: int = 0, scenarios: int = 0, synth: SynthConfig | None = None) -> None:
        from Training.synthesis.gpu_synth import GpuSynthesizer, LabelSampler, Pack, SynthConfig

        pack = Pack.load(pack_path)
        self.labels = LabelSampler(pack, subset=subset, seed=seed, length=2**62, scenarios=scenarios)
        self.synth = GpuSynthesizer(pack, grid_size, "cpu", synth or SynthConfig())
        self.generator = torch.Generator().manual_seed(seed)
        self.next_index = 0

    def render(self, n: int) -> list[PoolVolume]:
        items = [self.labels[self.next_index + i] for i in range(n)]
        self.next_index += n
        batch = self.synth(torch.utils.data.default_collate(items), self.generator)
        return volumes_from_batch(batch)


def _render_forever(pack_path: str, grid_size: tuple[int, int, int], seed: int, out: mp.Queue,
                    stop: mp.Event, pause: float = 0.0, scenarios: int = 0, synth: SynthConfig | None = None
                    ) -> None:  # pragma: no cover - runs in a child process
    torch.set_num_threads(1)
    renderer = Renderer(pack_path, grid_size, seed=seed, scenarios=scenarios, synth=synth)
    while not stop.is_set():
        if pause > 0 and stop.wait(pause):  # leave the cores to the training step most of the time
            break
        for volume in renderer.render(1):
            while not stop.is_set():
                try:
                    out.put(volume, timeout=1.0)
                    break
                except queue.Full:
                    continue


def augment_patch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cheap re-augmentation of a float32 (3, k, j, i) patch; DWI and FLAIR are relative, ADC is not.

    DWI and FLAIR: gain U(0.85, 1.15) and gamma exp(N(0, 0.1)); ADC: scale U(0.95, 1.05) (scanner
    variability of a quantitative map); all three: Gaussian noise with sigma U(0, 0.03).
    """
    out = image.copy()
    for channel in (0, 2):
        data = np.clip(out[channel], 0, None)
        out[channel] = rng.uniform(0.85, 1.15) * data ** float(np.exp(rng.normal(0, 0.1)))
    out[1] *= rng.uniform(0.95, 1.05)
    sigma = rng.uniform(0, 0.03)
    if sigma > 0:
        brain = image[1] > 0
        out += (rng.standard_normal(out.shape, dtype=np.float32) * sigma) * brain
    return out


class SynthPool:
    """Pre-rendered volumes + background refresh + lesion-centred, re-augmented patches.

    Args:
        pack_path: the synthesis pack (``python -m Training synthpack``).
        grid_size: model grid (i, j, k).
        size: number of volumes held.
        seed: seeds rendering (the pool's and the background process's streams differ) and patches.
        background: start the refreshing process.
        divisor: patch starts are multiples of it (the network's size divisor).
        pause: seconds the background renderer waits after each volume (rendering one costs about
            0.8 s of one core; on 2 cores an unpaced renderer slows the training step by 40%).
        scenarios: counterfactual onset/treatment scenarios rendered with each volume (outcome
            task); a patch then takes one of the volume's ``scenarios + 1`` at random (its
            clinical values and outcome target together).
        synth: the image synthesis's ranges (:class:`Training.synthesis.gpu_synth.SynthConfig`; default
            ranges when None), for the pool's and the background process's renderers alike.
    """

    def __init__(self, pack_path: str | Path, grid_size: tuple[int, int, int], *, size: int = 64, seed: int = 0,
                 background: bool = True, divisor: int = 16, pause: float = 0.0, scenarios: int = 0,
                 synth: SynthConfig | None = None) -> None:
        self.grid_kji = tuple(int(v) for v in grid_size[::-1])
        self.divisor = divisor
        self.rng = np.random.default_rng(seed)
        self.renderer = Renderer(pack_path, grid_size, seed=seed, scenarios=scenarios, synth=synth)
        self.volumes: list[PoolVolume] = []
        while len(self.volumes) < size:
            self.volumes.extend(self.renderer.render(min(2, size - len(self.volumes))))
        self.oldest = 0
        self.refreshed = 0
        self._process = None
        if background:
            context = mp.get_context("spawn")
            self._queue = context.Queue(maxsize=4)
            self._stop = context.Event()
            self._process = context.Process(target=_render_forever, daemon=True,
                                            args=(str(pack_path), tuple(grid_size), seed + 7919, self._queue,
                                                  self._stop, pause, scenarios, self.renderer.synth.config))
            self._process.start()

    def refresh(self, limit: int = 2) -> int:
        """Swap up to ``limit`` freshly rendered volumes in for the oldest ones; returns how many."""
        if self._process is None:
            return 0
        swapped = 0
        while swapped < limit:
            try:
                volume = self._queue.get_nowait()
            except queue.Empty:
                break
            self.volumes[self.oldest] = volume
            self.oldest = (self.oldest + 1) % len(self.volumes)
            swapped += 1
        self.refreshed += swapped
        return swapped

    def close(self) -> None:
        if self._process is not None:
            self._stop.set()
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.terminate()
            self._process = None

    def _start(self, centre: np.ndarray | None, patch: tuple[int, int, int]) -> np.ndarray:
        full = np.array(self.grid_kji)
        size = np.array(patch)
        top = full - size
        if centre is None:
            start = np.array([self.rng.integers(0, t // self.divisor + 1) * self.divisor for t in top])
        else:
            jitter = self.rng.integers(-size // 4, size // 4 + 1)
            wanted = centre - size // 2 + jitter
            start = np.round(wanted / self.divisor).astype(int) * self.divisor
        return np.clip(start, 0, top // self.divisor * self.divisor)

    def batch(self, n: int, patch: tuple[int, int, int], *, task: str = "acute", lesion_fraction: float = 1 / 3,
              mimic_fraction: float = 0.0, augment: bool = True) -> dict[str, torch.Tensor]:
        """``n`` patches (k, j, i sizes ``patch``, multiples of the divisor) with targets and windows.

        A ``lesion_fraction`` of the patches is centred on a component of ``task``'s target, which
        is ``target``; ``acute`` and ``outcome`` hold both tasks' targets of the same patches (so
        that variants of either task can train on one batch). Of the other patches, a
        ``mimic_fraction`` is centred on one of the volume's hard negatives (when it has any), the
        rest placed uniformly. With ``mimic_fraction`` 0 the random stream is the one without it."""
        cuts = []
        for _ in range(n):
            volume = self.volumes[int(self.rng.integers(len(self.volumes)))]
            components = volume.components[task]
            centre = None
            if components and self.rng.random() < lesion_fraction:
                component = components[int(self.rng.integers(len(components)))]
                centre = component[int(self.rng.integers(len(component)))]
            elif mimic_fraction > 0 and len(volume.hard_negatives) and self.rng.random() < mimic_fraction:
                centre = volume.hard_negatives[int(self.rng.integers(len(volume.hard_negatives)))]
            cuts.append(self._cut(volume, centre, patch, augment))
        return self._stack(cuts, task)

    def focus_batch(self, patch: tuple[int, int, int], *, task: str = "acute", max_voxels: int,
                    augment: bool = True) -> dict[str, torch.Tensor]:
        """Two patches that put the smallest lesions next to what mimics them: one centred on a
        component of ``task``'s target with fewer than ``max_voxels`` voxels (in a pool volume that
        has one; any component when none has), one centred on a hard negative of another random
        volume (DWI bright, ADC normal; a random place when it has none). Whole-volume training
        sees a few small foci among a million voxels; these crops show them, and their look-alikes,
        at the scale of a patch."""
        small = [(v, [c for c in v.components[task] if len(c) < max_voxels]) for v in self.volumes]
        small = [(v, cs) for v, cs in small if cs] or [(v, v.components[task]) for v in self.volumes
                                                       if v.components[task]]
        cuts = []
        if small:
            volume, components = small[int(self.rng.integers(len(small)))]
            component = components[int(self.rng.integers(len(components)))]
            cuts.append(self._cut(volume, component[int(self.rng.integers(len(component)))], patch, augment))
        volume = self.volumes[int(self.rng.integers(len(self.volumes)))]
        negatives = volume.hard_negatives
        centre = negatives[int(self.rng.integers(len(negatives)))] if len(negatives) else None
        cuts.append(self._cut(volume, centre, patch, augment))
        return self._stack(cuts, task)

    def _cut(self, volume: PoolVolume, centre: np.ndarray | None, patch: tuple[int, int, int],
             augment: bool) -> dict:
        """One patch of ``volume`` around ``centre`` (uniform when None), with its targets and window."""
        start = self._start(centre, patch)
        region = tuple(slice(int(s), int(s) + p) for s, p in zip(start, patch, strict=True))
        image = volume.image[(slice(None), *region)].astype(np.float32)
        cut = {name: getattr(volume, name)[region] for name in TASKS}
        clinical = (volume.clinical_values, volume.clinical_missing)
        if volume.scenarios:  # one of the image's scenarios: the observed one or a counterfactual
            pick = int(self.rng.integers(len(volume.scenarios) + 1))
            if pick:
                scenario_values, scenario_missing, scenario_outcome = volume.scenarios[pick - 1]
                clinical = (scenario_values, scenario_missing)
                cut["outcome"] = scenario_outcome[region]
        mirrored = self.grid_kji[2] - start[2] - patch[2]  # where the cut lies in the mirrored grid
        if augment and mirrored % self.divisor == 0 and self.rng.random() < 0.5:
            image = image[..., ::-1]  # left-right mirror of the whole grid
            cut = {name: mask[..., ::-1] for name, mask in cut.items()}
            start = np.array([start[0], start[1], mirrored])
        if augment:
            image = augment_patch(image, self.rng)
        return {"image": np.ascontiguousarray(image),
                "targets": {name: np.ascontiguousarray(mask, dtype=np.float32)[None] for name, mask in cut.items()},
                "values": clinical[0], "missing": clinical[1], "flair": volume.flair_present,
                "window": [list(start), list(self.grid_kji)]}

    @staticmethod
    def _stack(cuts: list[dict], task: str) -> dict[str, torch.Tensor]:
        stacked = {name: torch.from_numpy(np.stack([c["targets"][name] for c in cuts])) for name in TASKS}
        return {
            "image": torch.from_numpy(np.stack([c["image"] for c in cuts])),
            "target": stacked[task],
            **stacked,
            "clinical_values": torch.from_numpy(np.stack([c["values"] for c in cuts])),
            "clinical_missing": torch.from_numpy(np.stack([c["missing"] for c in cuts])),
            "flair_present": torch.tensor([c["flair"] for c in cuts], dtype=torch.bool),
            "window": torch.tensor([c["window"] for c in cuts], dtype=torch.long),
        }
