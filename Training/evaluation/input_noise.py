"""``python -m Training noise``: is the training synthesis as noisy as the sets the model is judged on?

    python -m Training noise --pack pack.npz [--grid-noise 0.05,0.11] \\
        --cache .cache/vc_val_mimics,.cache/vc_val_phys [--max-cases 8] [--volumes 12] [--out noise.json]

A network that trains on cleaner images than it meets fires on noise: a noise blob raises the DWI
and, the ADC being computed from the same noisy b0/b-image pair, lowers the ADC, which is exactly
how a small infarct looks. This command measures the fine-scale fluctuation of the network's input
(model grid, normalised channels, as the network sees it) in the same way for pool volumes rendered
by the training synthesis (:class:`Training.synthesis.pool.Renderer`, with ``--grid-noise``) and for
the cases of training caches of fixed sets (``python -m Training preprocess``):

* parenchyma: brain voxels with an ADC of 0.55-0.85 x10^-3 mm^2/s (grey and white matter, no CSF,
  no lesion core), eroded by one voxel;
* DWI: the robust standard deviation (1.4826 x median absolute deviation) of
  ``(DWI - G(DWI)) / G(DWI)`` there, ``G`` a Gaussian of 2 voxels (the relative fine-scale fluctuation:
  noise and the finest texture);
* ADC: the same of ``ADC - G(ADC)`` (10^-3 mm^2/s).

It prints the 10th, 50th and 90th percentiles over the volumes of each source, and writes them with
every volume's values to ``--out`` (JSON). Measured on this repository's data (acute model card):
the training pool without ``--grid-noise`` had about half the fluctuation of the generated
validation sets.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib.errors import OutputExistsError, StrokePredictorError
from StrokePredictorLib.io import write_json
from Training import config as config_mod

logger = logging.getLogger(__name__)

#: Parenchyma: ADC (10^-3 mm^2/s) between these.
PARENCHYMA_ADC = (0.55, 0.85)
#: Scale (voxels) of the Gaussian that the fluctuation is measured against.
SMOOTH_VOX = 2.0


@dataclass(frozen=True)
class NoiseConfig:
    """Options of ``python -m Training noise``."""

    pack: Path | None = field(default=None, metadata={"help": "synthesis pack: measure volumes rendered from it"})
    grid_noise: tuple[float, ...] = field(default=(0.0, 0.0), metadata={
        "help": "the rendered volumes' --grid-noise LO,HI (as train-synth; 0,0: off)"})
    volumes: int = field(default=12, metadata={"help": "volumes to render from --pack"})
    seed: int = field(default=123, metadata={"help": "seed of the rendered volumes"})
    cache: tuple[Path, ...] = field(default=(), metadata={
        "help": "training caches of fixed sets (python -m Training preprocess); comma-separated or repeated"})
    max_cases: int = field(default=8, metadata={"help": "at most this many cases per cache (0: all)"})
    out: Path | None = field(default=None, metadata={"help": "write the values here (JSON)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})


def fluctuation(image: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    """(DWI relative, ADC absolute) fine-scale fluctuation of a normalised ``(3, K, J, I)`` image in the
    parenchyma of ``brain`` (see the module docstring); NaN when there is no parenchyma."""
    from scipy import ndimage

    dwi, adc = (np.asarray(image[c], dtype=np.float32) for c in (0, 1))
    parenchyma = ndimage.binary_erosion(np.asarray(brain, dtype=bool) & (adc > PARENCHYMA_ADC[0])
                                        & (adc < PARENCHYMA_ADC[1]))
    if not parenchyma.any():
        return float("nan"), float("nan")
    smooth_dwi = ndimage.gaussian_filter(dwi, SMOOTH_VOX)
    relative = (dwi - smooth_dwi)[parenchyma] / np.maximum(smooth_dwi[parenchyma], 1e-3)
    absolute = (adc - ndimage.gaussian_filter(adc, SMOOTH_VOX))[parenchyma]
    return _robust_sd(relative), _robust_sd(absolute)


def _robust_sd(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _summary(values: list[tuple[float, float]]) -> dict:
    array = np.asarray(values, dtype=float).reshape(-1, 2)
    return {"n": int(array.shape[0]), "values": array.tolist(),
            **{f"{name}_q10_50_90": np.nanpercentile(array[:, i], [10, 50, 90]).round(4).tolist()
               for i, name in enumerate(("dwi", "adc"))}}


def run(config: NoiseConfig) -> dict:
    """Measure every source; returns ``{source: summary}`` (also written to ``--out``)."""
    if config.out is not None and Path(config.out).exists() and not config.overwrite:
        raise OutputExistsError(f"{config.out} exists; pass --overwrite to replace it.")
    from Training.synthesis.gpu_synth import SynthConfig

    if config.pack is None and not config.cache:
        raise StrokePredictorError("Give --pack (rendered training volumes) and/or --cache (fixed sets) to measure.")
    try:
        synth = SynthConfig.with_grid_noise(config.grid_noise)
    except ValueError as error:
        raise config_mod.ConfigError(f"--grid-noise {error}.") from None
    if config.pack is not None and not Path(config.pack).is_file():
        raise StrokePredictorError(f"--pack {config.pack}: no such file (made by python -m Training synthpack).")
    missing = [str(cache) for cache in config.cache if not (Path(cache) / "index.json").is_file()]
    if missing:
        raise StrokePredictorError(f"--cache {', '.join(missing)}: no index.json (make it with python -m Training "
                                   f"preprocess).")
    result: dict[str, dict] = {}
    grid_size = None
    for cache in config.cache:
        grid_size = tuple(json.loads((Path(cache) / "index.json").read_text())["grid"]["size"])
        cases = sorted(p for p in (Path(cache) / "cases").iterdir() if (p / "image.npy").is_file())
        cases = cases[:config.max_cases] if config.max_cases else cases
        result[f"cache {Path(cache).name}"] = _summary(
            [fluctuation(np.load(case / "image.npy"), np.load(case / "brain.npy")) for case in cases])
    if config.pack is not None:
        from StrokePredictorLib.bundle import default_bundle_dir, load_bundle
        from Training.synthesis.pool import Renderer

        # the caches' grid, else the bundled acute model's
        size = grid_size or tuple(load_bundle(default_bundle_dir("acute")).grid.size)
        volumes = Renderer(config.pack, size, seed=config.seed, synth=synth).render(config.volumes)
        label = f"pool (--grid-noise {','.join(str(v) for v in config.grid_noise)})"
        result[label] = _summary([fluctuation(v.image, v.brain) for v in volumes])
    width = max(len(name) for name in result)
    for name, summary in result.items():
        print(f"{name:<{width}}  n={summary['n']:<3} DWI q10/50/90 {summary['dwi_q10_50_90']}  "
              f"ADC q10/50/90 {summary['adc_q10_50_90']}")
    if config.out is not None:
        write_json({"config": config_mod.to_dict(config), "sources": result}, Path(config.out),
                   overwrite=config.overwrite)
    return result


def main(argv: list[str]) -> int:
    config = config_mod.parse(NoiseConfig, argv, __doc__.split("\n")[0], prog="python -m Training noise")
    run(config)
    return 0
