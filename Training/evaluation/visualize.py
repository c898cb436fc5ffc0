"""``python -m Training visualize --run RUN | --eval EVAL_DIR --out DIR``: PNG figures (matplotlib Agg).

* ``--run RUN``: ``training_curves.png`` from ``RUN/log.csv`` (losses, validation Dice, learning rate).
* ``--eval EVAL_DIR`` (from ``python -m Training evaluate`` with predictions saved):
  ``reliability_<label>.png`` (reliability diagram with the bin counts, pooled over the cases),
  ``overlay_<label>_<case>.png`` (DWI with ground-truth contour, prediction and baseline, and the
  uncertainty, on the slice with the most lesion), ``attention_<label>.png`` (mean feature
  attention over the cases, with the sd).
* ``--mimics-montage PNG``: synthetic real-scan mimics, embolic showers and a small lesion
  (:func:`mimics_montage`; no data needed, procedural lesions).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib.errors import OutputExistsError, StrokePredictorError
from StrokePredictorLib.io import atomic_path, read_volume
from Training import config as config_mod

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisualizeConfig:
    """Options of ``python -m Training visualize``."""

    run: Path | None = field(default=None, metadata={"help": "training run folder (log.csv)"})
    eval: Path | None = field(default=None, metadata={"help": "evaluation folder (python -m Training evaluate)"})
    out: Path | None = field(default=None, metadata={"help": "folder for the PNG figures (required)"})
    mimics_montage: Path | None = field(default=None, metadata={
        "help": "write a PNG montage of synthetic real-scan mimics and embolic showers (needs no --out)"})
    seed: int = field(default=14, metadata={"help": "seed of the synthetic cases of --mimics-montage"})
    max_cases: int = field(default=6, metadata={"help": "overlays for at most this many cases per data set"})
    dpi: int = field(default=110, metadata={"help": "resolution of the PNG files"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing figures"})


def _pyplot():  # noqa: ANN202 - matplotlib module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: object, path: Path, dpi: int, overwrite: bool) -> Path:
    plt = _pyplot()
    with atomic_path(path, overwrite) as temporary:
        figure.savefig(temporary, dpi=dpi, format="png", bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(figure)
    return path


def training_curves(run: Path, out: Path, *, dpi: int = 110, overwrite: bool = False) -> Path:
    """Plot ``RUN/log.csv``: train/val loss, validation Dice and the learning rate against the step."""
    log = Path(run) / "log.csv"
    if not log.is_file():
        raise StrokePredictorError(f"Run {run} has no log.csv (is it a python -m Training train run folder?).")
    with log.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise StrokePredictorError(f"{log} has no logged epoch yet.")

    def column(name: str) -> np.ndarray:
        return np.array([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows])

    plt = _pyplot()
    step = column("step")
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")  # no label over the next panel
    axes[0].plot(step, column("train_loss"), label="train loss")
    axes[0].plot(step, column("val_loss"), label="validation loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot(step, column("val_dice"), marker="o", label="validation Dice")
    axes[1].plot(step, column("best_val_dice"), linestyle="--", label="best")
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("step")
    axes[1].legend()
    axes[2].plot(step, column("lr"))
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("learning rate")
    figure.suptitle(f"Training run {Path(run).name}")
    return _save(figure, Path(out) / "training_curves.png", dpi, overwrite)


def reliability_diagram(reliability: dict, path: Path, *, title: str, dpi: int = 110, overwrite: bool = False) -> Path:
    """Plot a reliability diagram from :meth:`Training.evaluation.metrics.ReliabilityBins.to_dict` data."""
    plt = _pyplot()
    edges = np.asarray(reliability["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = np.diff(edges)
    fraction = np.array([np.nan if v is None else v for v in reliability["fraction_positive"]], dtype=float)
    mean_p = np.array([np.nan if v is None else v for v in reliability["mean_probability"]], dtype=float)
    counts = np.asarray(reliability["counts"], dtype=float)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers, np.nan_to_num(fraction), width=width, edgecolor="k", alpha=0.7, label="observed lesion fraction")
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.plot(mean_p, fraction, "ro", markersize=3, label="mean probability in bin")
    top.set_ylabel("fraction of lesion voxels")
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, np.maximum(counts, 1), width=width, log=True, color="grey")
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("voxels")
    return _save(figure, path, dpi, overwrite)


def _contour(ax: object, mask: np.ndarray, colour: str) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.0)  # type: ignore[attr-defined]


def case_overlay(folder: Path, path: Path, *, title: str, dpi: int = 110, overwrite: bool = False) -> Path:
    """Overlay figure of one evaluated case (a ``predictions/<label>/<case>`` folder)."""
    info = json.loads((folder / "case.json").read_text())
    dwi = read_volume(info["dwi"], role="DWI").array
    truth = read_volume(info["truth"], role="ground truth").array > 0.5
    probability = read_volume(folder / "probability.nii.gz").array
    entropy = read_volume(folder / "entropy.nii.gz").array
    lesion = read_volume(folder / "lesion.nii.gz").array > 0.5
    baseline = read_volume(folder / "baseline.nii.gz").array > 0.5 if (folder / "baseline.nii.gz").is_file() else None
    per_slice = truth.sum(axis=(1, 2)) + lesion.sum(axis=(1, 2))
    k = int(np.argmax(per_slice)) if per_slice.any() else dwi.shape[0] // 2
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    background = np.flipud(dwi[k])  # [j, i]: show with anterior/superior up
    for ax in axes:
        ax.imshow(background, cmap="gray")
        ax.axis("off")
    axes[0].set_title("DWI, ground truth (green)")
    _contour(axes[0], np.flipud(truth[k]), "lime")
    axes[1].imshow(np.ma.masked_less(np.flipud(probability[k]), 0.05), cmap="hot", vmin=0, vmax=1, alpha=0.6)
    _contour(axes[1], np.flipud(truth[k]), "lime")
    _contour(axes[1], np.flipud(lesion[k]), "cyan")
    if baseline is not None:
        _contour(axes[1], np.flipud(baseline[k]), "magenta")
    axes[1].set_title("probability; prediction (cyan), rule (magenta)")
    shown = axes[2].imshow(np.ma.masked_less(np.flipud(entropy[k]), 0.02), cmap="viridis", vmin=0, vmax=1, alpha=0.7)
    _contour(axes[2], np.flipud(truth[k]), "lime")
    axes[2].set_title("uncertainty (entropy, bits)")
    figure.colorbar(shown, ax=axes[2], fraction=0.046)
    figure.suptitle(f"{title} (slice k={k})")
    return _save(figure, path, dpi, overwrite)


def attention_chart(weights: dict[str, list[float]], path: Path, *, title: str, dpi: int = 110,
                    overwrite: bool = False) -> Path:
    """Bar chart of the mean (and sd) feature attention over cases: ``{feature: [weight per case]}``."""
    plt = _pyplot()
    names = list(weights)
    means = [float(np.mean(weights[n])) for n in names]
    sds = [float(np.std(weights[n])) for n in names]
    figure, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(range(len(names)), means, yerr=sds, capsize=3, color="steelblue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=40, ha="right")
    ax.set_ylabel("attention weight")
    ax.axhline(1 / max(len(names), 1), color="grey", linestyle="--", linewidth=0.8, label="uniform")
    ax.legend()
    ax.set_title(title)
    return _save(figure, path, dpi, overwrite)


def evaluation_figures(evaluation: Path, out: Path, *, max_cases: int = 6, dpi: int = 110,
                       overwrite: bool = False) -> list[Path]:
    """All figures of an evaluation folder; returns the written paths."""
    summary_path = Path(evaluation) / "summary.json"
    if not summary_path.is_file():
        raise StrokePredictorError(f"{evaluation} has no summary.json (run python -m Training evaluate first).")
    summary = json.loads(summary_path.read_text())
    written: list[Path] = []
    for label, per_method in summary["datasets"].items():
        model = per_method.get("model", {})
        if "reliability" in model:
            ece = model.get("pooled_ece", math.nan)
            written.append(reliability_diagram(model["reliability"], Path(out) / f"reliability_{label}.png",
                                               title=f"{label}: ECE {ece:.4f}", dpi=dpi, overwrite=overwrite))
        folders = sorted(p for p in (Path(evaluation) / "predictions" / label).glob("*") if (p / "case.json").is_file())
        weights: dict[str, list[float]] = {}
        for index, folder in enumerate(folders):
            info = json.loads((folder / "case.json").read_text())
            for name, weight in info.get("feature_attention", {}).items():
                weights.setdefault(name, []).append(float(weight))
            if index < max_cases:
                written.append(case_overlay(folder, Path(out) / f"overlay_{label}_{folder.name}.png",
                                            title=f"{label} / {folder.name}", dpi=dpi, overwrite=overwrite))
        if weights:
            written.append(attention_chart(weights, Path(out) / f"attention_{label}.png",
                                           title=f"{label}: clinical feature attention ({len(folders)} cases)",
                                           dpi=dpi, overwrite=overwrite))
    return written


def _mimic_case(index: int, seed: int, **options: float) -> tuple:  # noqa: ANN001
    """A physical case with the real-scan mimics and its twin without them (same seed, so the same
    anatomy, lesion and noise draws): their ratio shows where the mimics changed DWI and ADC."""
    from Training.synthesis.case import SynthesisParams, synthesize_case

    base = {"lesion_kind": "territorial", "empty_fraction": 0.0, "adc_unit": "mm2/s", "cerebellar_adc": 1.0,
            **options}
    with_mimics = synthesize_case(index, seed, SynthesisParams(scan_mimics=1.0, **base))
    without = synthesize_case(index, seed, SynthesisParams(scan_mimics=0.0, **base))
    return with_mimics, without


def mimics_montage(png: Path, *, seed: int = 14, dpi: int = 110, overwrite: bool = False) -> Path:
    """Montage of synthetic cases of the generator (``python -m Training generate`` with
    ``--scan-mimics 1``, :mod:`Training.synthesis.mimics`): rows show a skull-base slice with
    susceptibility artefacts, an embolic shower, a slice with high-ADC mimics (chronic infarcts,
    lacunes, white-matter hyperintensities) and a single small lesion; columns DWI, ADC, FLAIR
    (registered onto the DWI grid) and DWI with the acute lesion (red), the mimics that brighten DWI
    with a normal ADC (yellow: DWI x1.25 or more, ADC within 15%) and those that raise the ADC (cyan:
    x1.4 or more). Cases are procedural (no lesion library needed) and reproducible from ``seed``."""
    from StrokePredictorLib.preprocess import resample
    from Training.synthesis.acquisition import euler_transform

    plt = _pyplot()
    rows = [("skull base: susceptibility (bright DWI, normal ADC)", 1, {}, "inferior"),
            ("cardio-embolic shower", 4, {"showers": 1.0}, "lesion"),
            ("chronic infarcts / lacunes / WMH (high ADC)", 3, {}, "adc"),
            ("single small lesion", 6, {"small_lesions": 1.0}, "lesion")]
    figure, axes = plt.subplots(len(rows), 4, figsize=(12.5, 3.2 * len(rows)), squeeze=False)
    for row, (title, index, options, focus) in enumerate(rows):
        case, twin = _mimic_case(index, seed, **options)
        dwi, adc = case.dwi.array, case.adc.array
        brain = twin.adc.array > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            r_dwi = np.where(brain, dwi / np.maximum(twin.dwi.array, 1e-9), 1.0)
            r_adc = np.where(brain, adc / np.maximum(twin.adc.array, 1e-12), 1.0)
        lesion = case.mask > 0
        bright = brain & ~lesion & (r_dwi >= 1.25) & (np.abs(r_adc - 1) <= 0.15)
        high_adc = brain & ~lesion & (r_adc >= 1.4)
        if focus == "inferior":
            per_slice = bright.sum(axis=(1, 2)).astype(float)
            lower = np.arange(dwi.shape[0]) < dwi.shape[0] * 0.45  # k grows superior in the scanner frame
            per_slice = per_slice * lower if (per_slice * lower).any() else per_slice
        elif focus == "adc":
            per_slice = high_adc.sum(axis=(1, 2)).astype(float)
        else:
            labels = [len(np.unique(_slice_components(lesion[k]))) - 1 for k in range(dwi.shape[0])]
            per_slice = np.asarray(labels, float) * 100 + lesion.sum(axis=(1, 2))
        k = int(np.argmax(per_slice)) if per_slice.any() else dwi.shape[0] // 2
        ft = case.metadata["flair_transform"]
        flair = resample(case.flair.array, case.flair.geometry, case.dwi.geometry, order=1,
                         transform=euler_transform(np.asarray(ft["matrix"]), np.asarray(ft["center_lps"])))
        volume = case.metadata["lesion"]["volume_ml"]
        for column, (image, name) in enumerate(((dwi, "DWI"), (adc * 1e3, "ADC (x10^-3 mm^2/s)"),
                                                (flair, "FLAIR (registered)"), (dwi, "lesion / mimics"))):
            ax = axes[row, column]
            section = np.flipud(image[k])
            inside = section[np.flipud(brain[k])] if brain[k].any() else section.ravel()
            low, high = (0.0, 2.5) if column == 1 else tuple(np.percentile(inside, [1, 99.5]))
            ax.imshow(section, cmap="gray", vmin=low, vmax=high if high > low else low + 1)
            ax.axis("off")
            ax.set_title(f"{title}\n{name}" if column == 0 else name, fontsize=8)
            if column == 3:
                _contour(ax, np.flipud(lesion[k]), "red")
                _contour(ax, np.flipud(bright[k]), "yellow")
                _contour(ax, np.flipud(high_adc[k]), "cyan")
                ax.set_title(f"lesion {volume:.2f} mL (red), DWI-bright mimics (yellow), high-ADC mimics (cyan)",
                             fontsize=7)
    figure.suptitle(f"Synthetic real-scan mimics and embolic showers (python -m Training visualize "
                    f"--mimics-montage, seed {seed}; physical mode)", fontsize=9)
    return _save(figure, Path(png), dpi, overwrite)


def _slice_components(mask: np.ndarray) -> np.ndarray:
    """2-D connected components (8-connectivity) of a slice, for counting lesion foci."""
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3), bool))[0]


def run(config: VisualizeConfig) -> list[Path]:
    if config.mimics_montage is not None and config.run is None and config.eval is None:
        return [mimics_montage(config.mimics_montage, seed=config.seed, dpi=config.dpi, overwrite=config.overwrite)]
    if config.out is None or (config.run is None and config.eval is None):
        raise StrokePredictorError("Give --out and at least one of --run RUN or --eval EVAL_DIR.")
    out = Path(config.out)
    # only figures this verb writes count: a folder holding other pictures (the generator's montage) is fine
    ours = (["training_curves.png"] if config.run is not None else []) + (
        ["reliability_*.png", "overlay_*.png", "attention_*.png"] if config.eval is not None else [])
    existing = sorted(p.name for pattern in ours for p in out.glob(pattern)) if out.is_dir() else []
    if existing and not config.overwrite:
        raise OutputExistsError(f"{out} holds figures of an earlier run ({', '.join(existing[:3])}"
                                f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them.")
    written: list[Path] = []
    if config.run is not None:
        written.append(training_curves(config.run, out, dpi=config.dpi, overwrite=config.overwrite))
    if config.eval is not None:
        written += evaluation_figures(config.eval, out, max_cases=config.max_cases, dpi=config.dpi,
                                      overwrite=config.overwrite)
    config_mod.save(config, out / "visualize_config.json")
    logger.info("Wrote %d figure(s) to %s", len(written), out)
    return written


def main(argv: list[str]) -> int:
    config = config_mod.parse(VisualizeConfig, argv, __doc__.split("\n")[0], prog="python -m Training visualize")
    run(config)
    return 0
