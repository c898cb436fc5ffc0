"""Writing a :class:`~StrokePredictorLib.inference.Prediction` to files.

Files (all volumes on the input DWI grid):

============================  =====================================================================
``probability.nii.gz``        float32 mean lesion probability, 0..1
``uncertainty.nii.gz``        float32 predictive entropy of the probability, bits, 0..1
``uncertainty_std.nii.gz``    float32 Monte-Carlo standard deviation of the probability
``lesion.nii.gz``             uint8 0/1 thresholded lesion
``lesion.seg.nrrd``           the lesion as a 3D Slicer segmentation (name, colour, terminology)
``attention_spatial.nii.gz``  float32 0..1 spatial attention of the clinical tokens
``attention.json``/``.tsv``   one weight per clinical feature, with its value, missing flag and
                              measured effect on the volume (mL, when measured)
``summary.json``              volumes, interval, settings, bundle, inputs, timings, versions
``overview.png``              DWI slices with probability and contour, uncertainty, attention bars
``what_if.tsv``/``.json``     with ``--what-if`` only: volumes (with intervals) per clinical scenario
``what_if.png``               with ``--what-if`` only: volume against onset time, one line per treatment
``what_if_difference.nii.gz`` with two ``--what-if`` scenarios: float32 probability of the first minus the second
``what_if_regions.nii.gz``    with two scenarios: uint8 1 lesion in the first only, 2 second only, 3 both
============================  =====================================================================

The output folder is created (with ordinary permissions) and checked for writability before
anything is computed. Everything is first written into a temporary folder *inside* the output
folder (so that moving a file into place is a rename on one file system, also when the output
folder is a mount point) and then renamed into place file by file, so an error never leaves
partial outputs. The folder gets a marker (:data:`StrokePredictorLib.io.MARKER_FILE`); existing
files are kept unless ``overwrite`` is given, and ``overwrite`` replaces only the files listed
below, only in a folder that carries the marker (or an older ``summary.json``), and never when an
input lies inside the output folder. A temporary folder left by a killed run is removed by the
next run.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import os
import platform
import shutil
import textwrap
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from StrokePredictorLib import __version__
from StrokePredictorLib._lazy import sitk
from StrokePredictorLib.clinical import FEATURES
from StrokePredictorLib.errors import OutputExistsError, StrokePredictorError
from StrokePredictorLib.inference import EFFECT_MEANING, OFFSET_MEANING, UNCERTAINTY_MEANING, Prediction
from StrokePredictorLib.io import (
    MARKER_FILE,
    Geometry,
    Volume,
    ensure_writable_dir,
    partial_dir,
    path_inside,
    recognised_kind,
    remove_created_dirs,
    remove_stale_partials,
    write_folder_marker,
    write_volume,
)

logger = logging.getLogger(__name__)

OUTPUT_FILES: dict[str, str] = {
    "probability": "probability.nii.gz",
    "uncertainty": "uncertainty.nii.gz",
    "uncertainty_std": "uncertainty_std.nii.gz",
    "lesion": "lesion.nii.gz",
    "segmentation": "lesion.seg.nrrd",
    "attention_spatial": "attention_spatial.nii.gz",
    "attention_json": "attention.json",
    "attention_tsv": "attention.tsv",
    "summary": "summary.json",
    "overview": "overview.png",
}
#: Written only when asked for (``--what-if``); an overwrite removes those of an earlier run.
OPTIONAL_FILES: dict[str, str] = {
    "what_if_tsv": "what_if.tsv",
    "what_if_json": "what_if.json",
    "what_if_plot": "what_if.png",
    "what_if_difference": "what_if_difference.nii.gz",
    "what_if_regions": "what_if_regions.nii.gz",
}

SEGMENT_NAME = "Stroke lesion (predicted)"
SEGMENT_COLOR = (0.85, 0.26, 0.18)
# DICOM/SNOMED CT terminology in 3D Slicer's TerminologyEntry format:
# context~category~type~type modifier~anatomic context~anatomic region~anatomic region modifier.
SEGMENT_TERMINOLOGY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^49755003^Morphologically Altered Structure"
    "~SCT^55641003^Infarct"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~^^"
    "~^^"
)


# ----------------------------------------------------------------------------------------
# Single files
# ----------------------------------------------------------------------------------------
def write_segmentation_nrrd(
    mask: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike,
    *,
    name: str = SEGMENT_NAME,
    color: tuple[float, float, float] = SEGMENT_COLOR,
    terminology: str = SEGMENT_TERMINOLOGY,
    overwrite: bool = False,
) -> Path:
    """Write a binary ``[k, j, i]`` mask as a 3D Slicer segmentation (``.seg.nrrd``, one segment).

    The file is a labelmap NRRD (label value 1, layer 0) with Slicer's ``Segment0_*`` and
    ``Segmentation_*`` header keys; it opens in Slicer as a segmentation node and is read by
    ``slicerio``. Written atomically.
    """
    from StrokePredictorLib.io import atomic_path

    path = Path(path)
    labels = (np.asarray(mask) > 0).astype(np.uint8)
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(labels)))
    if labels.any():
        kji = np.argwhere(labels)
        lo, hi = kji.min(axis=0)[::-1], kji.max(axis=0)[::-1]
        extent = " ".join(f"{int(a)} {int(b)}" for a, b in zip(lo, hi))  # noqa: B905
    else:
        extent = "0 -1 0 -1 0 -1"
    size = geometry.size
    reference = ";".join(f"{v:.10g}" for v in geometry.ijk_to_ras.ravel()) + ";"
    reference += ";".join(f"0;{s - 1}" for s in size) + ";"
    metadata = {
        "Segment0_Color": " ".join(f"{c:.6g}" for c in color),
        "Segment0_ColorAutoGenerated": "0",
        "Segment0_Extent": extent,
        "Segment0_ID": "Segment_1",
        "Segment0_LabelValue": "1",
        "Segment0_Layer": "0",
        "Segment0_Name": name,
        "Segment0_NameAutoGenerated": "0",
        "Segment0_Tags": f"Segmentation.Status:completed|TerminologyEntry:{terminology}|",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ConversionParameters": (
            f"Reference image geometry|{reference}|Image geometry description string determining the geometry "
            "of the labelmap that is created in course of conversion.&"
        ),
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for key, value in metadata.items():
        image.SetMetaData(key, value)
    with atomic_path(path, overwrite) as temporary:
        sitk.WriteImage(image, str(temporary), True)
    return path


def attention_records(prediction: Prediction) -> list[dict]:
    """One record per clinical feature: name, label, raw value (or None), missing flag, weight,
    measured effect in mL (None when the feature is missing or effects were not measured) and the
    path by which it acts (``acts_through``: "cross-attention", or "growth offset" for a feature
    the cross-attention sees as missing; see :attr:`Prediction.offset_features`)."""
    records = []
    for feature in FEATURES:
        value = prediction.clinical.values.get(feature.name)
        effect = prediction.feature_effects.get(feature.name)
        records.append({
            "name": feature.name,
            "label": feature.label,
            "value": value,
            "unit": feature.unit,
            "missing": value is None,
            "weight": float(prediction.feature_attention[feature.name]),
            "effect_ml": None if effect is None else float(effect),
            "acts_through": "growth offset" if feature.name in prediction.offset_features else "cross-attention",
        })
    return records


def _display_axes(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Reorder a ``[k, j, i]`` array to ``[S, P, L]`` (axial slices, anterior up, patient's right on
    the left: the radiological view) when the grid is close to axis-aligned. Returns the array and
    the spacing of its three axes."""
    direction = geometry.direction_matrix
    world = np.argmax(np.abs(direction), axis=0)  # world axis (L, P, S) of each of i, j, k
    spacing = np.asarray(geometry.spacing, dtype=float)
    if len(set(world.tolist())) != 3:
        return array, spacing[::-1]
    order = [2 - int(np.where(world == w)[0][0]) for w in (2, 1, 0)]  # array axes for S, P, L
    result = np.transpose(array, order)
    for axis, w in enumerate((2, 1, 0)):
        column = int(np.where(world == w)[0][0])
        if direction[w, column] < 0:
            result = np.flip(result, axis=axis)
    spacing_display = np.array([spacing[int(np.where(world == w)[0][0])] for w in (2, 1, 0)])
    return result, spacing_display


def render_overview(prediction: Prediction, dwi: Volume, *, title: str = "") -> bytes:
    """PNG bytes: three axial DWI slices with the probability overlay and the lesion contour,
    the predictive entropy on the central slice, and the feature-attention bar chart."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    dwi_d, spacing = _display_axes(dwi.array, dwi.geometry)
    prob_d, _ = _display_axes(prediction.probability, prediction.geometry)
    mask_d, _ = _display_axes(prediction.mask, prediction.geometry)
    entropy_d, _ = _display_axes(prediction.entropy, prediction.geometry)
    n_slices = dwi_d.shape[0]
    area = mask_d.reshape(n_slices, -1).sum(axis=1)
    if area.any():
        # the largest cross-section, and the slices below and above which 15% of the lesion lies
        cumulative = np.cumsum(area) / area.sum()
        low, high = int(np.searchsorted(cumulative, 0.15)), int(np.searchsorted(cumulative, 0.85))
        centre = int(np.argmax(area))
        slices = sorted({low, centre, high} | ({max(0, centre - 1)} if low == centre == high else set()))
        while len(slices) < 3:  # a thin lesion: show its neighbours
            slices = sorted(set(slices) | {min(n_slices - 1, max(slices) + 1), max(0, min(slices) - 1)})[:3]
    else:
        signal = dwi_d.reshape(n_slices, -1).sum(axis=1)
        rows = np.nonzero(signal > 0.1 * signal.max())[0] if signal.max() > 0 else np.arange(n_slices)
        centre = int((rows.min() + rows.max()) // 2)
        step = max(1, (rows.max() - rows.min()) // 4)
        slices = [max(0, centre - step), centre, min(n_slices - 1, centre + step)]
    aspect = spacing[1] / spacing[2]
    vmax = float(np.percentile(dwi_d[dwi_d > 0], 99.5)) if np.any(dwi_d > 0) else 1.0

    figure = Figure(figsize=(13, 8.2), dpi=90)
    grid = figure.add_gridspec(2, 3, height_ratios=[1.0, 0.9])
    for column, index in enumerate(slices):
        axis = figure.add_subplot(grid[0, column])
        axis.imshow(dwi_d[index], cmap="gray", vmin=0, vmax=vmax, aspect=aspect, interpolation="nearest")
        overlay = np.ma.masked_less(prob_d[index], 0.05)
        axis.imshow(overlay, cmap="hot", vmin=0, vmax=1, alpha=0.55, aspect=aspect, interpolation="nearest")
        if mask_d[index].any():
            axis.contour(mask_d[index].astype(float), levels=[0.5], colors="cyan", linewidths=1.0)
        axis.set_title(f"DWI + probability, axial slice {index + 1}/{n_slices}", fontsize=9)
        axis.set_axis_off()
    axis = figure.add_subplot(grid[1, 0])
    shown = axis.imshow(entropy_d[centre], cmap="magma", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    axis.set_title("Uncertainty: predictive entropy (bits)", fontsize=9)
    axis.set_axis_off()
    figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
    axis = figure.add_subplot(grid[1, 1:])
    records = attention_records(prediction)
    labels = [r["label"] + (" (missing)" if r["missing"] else "")
              + (" (via growth offset)" if r["acts_through"] == "growth offset" else "") for r in records]
    weights = [r["weight"] for r in records]
    colors = ["#bbbbbb" if r["missing"] else "#3b7dd8" for r in records]
    axis.barh(range(len(records))[::-1], weights, color=colors)
    axis.set_yticks(range(len(records))[::-1], labels, fontsize=8)
    axis.set_xlabel("attention weight (sums to 1)", fontsize=9)
    axis.set_title("Clinical feature attention", fontsize=9)
    if prediction.feature_effects:
        # the measured effect beside each bar: the volume change (mL) when the feature is set to missing
        for row, record in zip(range(len(records))[::-1], records):  # noqa: B905
            text = "missing" if record["effect_ml"] is None else f"effect {record['effect_ml']:+.2f} mL"
            axis.annotate(text, (record["weight"], row), xytext=(4, 0), textcoords="offset points",
                          va="center", fontsize=7, color="#444444")
        axis.set_xlim(0, max(weights) * 1.45 if max(weights) > 0 else 1)
        axis.set_title("Clinical feature attention, and measured effect (volume with the feature set to missing "
                       "minus volume as given)", fontsize=9)
    volume = prediction.volume_ml
    figure.suptitle(
        f"{title}  lesion {volume['mask']:.1f} mL (MC median {volume['median']:.1f}, 95% interval "
        f"{volume['ci95'][0]:.1f}-{volume['ci95'][1]:.1f} mL), {prediction.n_components} component(s), "
        f"threshold {prediction.threshold:g}, {prediction.mc_samples} MC samples",
        fontsize=10,
    )
    lines = [line for warning in prediction.warnings
             for line in textwrap.wrap(f"WARNING: {warning}", 150, subsequent_indent="    ")]
    bottom = min(0.3, 0.022 * len(lines) + (0.01 if lines else 0.0))
    if lines:
        figure.text(0.01, 0.005, "\n".join(lines), color="#b00000", fontsize=8, va="bottom", ha="left")
    figure.tight_layout(rect=(0, bottom, 1, 0.96))
    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _versions() -> dict[str, str]:
    import torch

    return {
        "strokepredictor": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "SimpleITK": sitk.Version_VersionString(),
    }


def summary_dict(prediction: Prediction, *, bundle: dict, inputs: dict) -> dict:
    """The content of ``summary.json`` (see contract 4). ``warnings`` lists what the user must know
    about this result (unusual input, implausible output); an empty list means none."""
    return {
        "warnings": list(prediction.warnings),
        "lesion_volume_ml": {
            "mask": prediction.volume_ml["mask"],
            "median": prediction.volume_ml["median"],
            "ci95": list(prediction.volume_ml["ci95"]),
            "mc_ci95": list(prediction.volume_ml.get("mc_ci95", prediction.volume_ml["ci95"])),
        },
        "samples_volume_ml": [float(v) for v in prediction.samples_volume_ml],
        "n_components": prediction.n_components,
        "brain_volume_ml": prediction.brain_volume_ml,
        "mean_uncertainty_in_lesion": prediction.mean_uncertainty_in_lesion,
        "threshold": prediction.threshold,
        "postprocessing": dict(prediction.postprocessing),
        **({"growth_seed": dict(prediction.growth_seed)} if prediction.growth_seed else {}),
        "mc_samples": prediction.mc_samples,
        "seed": prediction.seed,
        "deterministic": prediction.deterministic,
        "device": prediction.device,
        "bundle": bundle,
        "inputs": {
            **inputs,
            "flair_present": prediction.flair_present,
            "adc_unit": prediction.adc_unit,
            "registration": prediction.registration,
            "warnings": prediction.warnings,
            "clinical": prediction.clinical.to_dict(),
            "dwi_geometry": prediction.geometry.to_dict(),
            "plausibility": prediction.input_statistics,
        },
        "uncertainty": {
            OUTPUT_FILES["uncertainty"]: UNCERTAINTY_MEANING["entropy"],
            OUTPUT_FILES["uncertainty_std"]: UNCERTAINTY_MEANING["std"],
            "mean_uncertainty_in_lesion": "mean predictive entropy (bits) inside the lesion mask",
        },
        "timings_s": {k: round(float(v), 4) for k, v in prediction.timings.items()},
        "versions": _versions(),
        "files": dict(OUTPUT_FILES),
    }


# ----------------------------------------------------------------------------------------
# The whole set
# ----------------------------------------------------------------------------------------
def check_outputs_free(out_dir: str | os.PathLike, overwrite: bool = False,
                       inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Check, before any work, that the outputs may be written into ``out_dir``.

    Raises:
        OutputExistsError: ``out_dir`` is a file or a dangling symbolic link; it holds an output
            and ``overwrite`` is False; ``overwrite`` is True but the folder was not written by
            StrokePredictor (no marker, no ``summary.json`` of ours) or an input lies inside it;
            or an input is one of the output files.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink() and not out_dir.exists():
        raise OutputExistsError(
            f"Output folder {out_dir} is a symbolic link to {os.readlink(out_dir)}, which does not exist; create "
            "the target folder or pass another --out."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"Output path {out_dir} exists and is not a folder.")
    if not out_dir.is_dir():
        return
    given = [Path(p) for p in inputs if p]
    for path in given:
        for name in (*OUTPUT_FILES.values(), *OPTIONAL_FILES.values()):
            target = out_dir / name
            if target.exists() and path.exists() and os.path.samefile(path, target):
                raise OutputExistsError(
                    f"Input {path} is the output file {target}; write the outputs to another --out folder."
                )
    if overwrite:
        inside = [str(p) for p in given if path_inside(p, out_dir)]
        if inside:
            raise OutputExistsError(
                f"--overwrite refused: input {inside[0]} lies inside the output folder {out_dir}; write the "
                "outputs to another --out folder so that no input can be replaced."
            )
    existing = [name for name in (*OUTPUT_FILES.values(), *OPTIONAL_FILES.values()) if (out_dir / name).exists()]
    if not existing:
        return
    if not overwrite:
        raise OutputExistsError(
            f"Output folder {out_dir} already holds {', '.join(existing[:3])}"
            f"{' ...' if len(existing) > 3 else ''}; pass --overwrite to replace them."
        )
    kind = recognised_kind(out_dir)
    if kind != "outputs":
        raise OutputExistsError(
            f"Output folder {out_dir} holds {', '.join(existing[:3])} but was not written by a StrokePredictor "
            f"prediction (no '{MARKER_FILE}' marker); --overwrite replaces only files StrokePredictor wrote, so "
            "nothing was replaced. Choose another --out."
        )


def write_outputs(
    prediction: Prediction,
    out_dir: str | os.PathLike,
    *,
    dwi: Volume,
    bundle: dict,
    inputs: dict | None = None,
    overwrite: bool = False,
    title: str = "",
    extra: dict[str, bytes | np.ndarray] | None = None,
) -> Path:
    """Write every output file into ``out_dir`` (see the module docstring). Returns the path of
    ``summary.json``.

    Args:
        prediction: the result.
        dwi: the input DWI (for the overview picture).
        bundle: ``{"name", "task", "version", "sha256"}`` of the model.
        inputs: input description for the summary (file paths...).
        overwrite: replace existing output files.
        title: heading of the overview picture (e.g. the case id).
        extra: optional outputs (names from :data:`OPTIONAL_FILES`) -> content (bytes, or an
            array ``[k, j, i]`` written as a volume on the prediction's grid), written and
            replaced together with the others; with ``overwrite``, optional outputs of an
            earlier run that are not in ``extra`` are removed (they would not match).

    Raises:
        OutputExistsError: an output exists and ``overwrite`` is False (checked before writing).
    """
    out_dir = Path(out_dir)
    check_outputs_free(out_dir, overwrite)
    geometry = prediction.geometry
    created = ensure_writable_dir(out_dir)
    remove_stale_partials(out_dir)
    staging = partial_dir(out_dir)
    done = False
    try:
        write_volume(prediction.probability.astype(np.float32), geometry, staging / OUTPUT_FILES["probability"])
        write_volume(prediction.entropy.astype(np.float32), geometry, staging / OUTPUT_FILES["uncertainty"])
        write_volume(prediction.std.astype(np.float32), geometry, staging / OUTPUT_FILES["uncertainty_std"])
        write_volume(prediction.mask.astype(np.uint8), geometry, staging / OUTPUT_FILES["lesion"])
        write_segmentation_nrrd(prediction.mask, geometry, staging / OUTPUT_FILES["segmentation"])
        write_volume(prediction.spatial_attention.astype(np.float32), geometry,
                     staging / OUTPUT_FILES["attention_spatial"])
        records = attention_records(prediction)
        measured = bool(prediction.feature_effects)
        offset = bool(prediction.offset_features)
        keys = (("name", "label", "value", "missing", "weight") + (("effect_ml",) if measured else ())
                + (("acts_through",) if offset else ()))
        (staging / OUTPUT_FILES["attention_json"]).write_text(json.dumps({
            "features": [{k: r[k] for k in keys} for r in records],
            "spatial_attention_file": OUTPUT_FILES["attention_spatial"],
            "description": "weight = attention of the imaging tokens to each clinical token, averaged over "
                           "heads and imaging tokens; the weights sum to 1",
            **({"effect_description": EFFECT_MEANING} if measured else {}),
            **({"acts_through_description": OFFSET_MEANING} if offset else {}),
        }, indent=2, allow_nan=False) + "\n")
        with (staging / OUTPUT_FILES["attention_tsv"]).open("w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            header = ["name", "label", "value", "unit", "missing", "weight"]
            writer.writerow(header + (["effect_ml"] if measured else []) + (["acts_through"] if offset else []))
            for r in records:
                effect = ([] if not measured else ["" if r["effect_ml"] is None else f"{r['effect_ml']:.3f}"])
                writer.writerow([r["name"], r["label"], "" if r["value"] is None else r["value"], r["unit"],
                                 str(r["missing"]).lower(), f"{r['weight']:.6f}", *effect,
                                 *([r["acts_through"]] if offset else [])])
        (staging / OUTPUT_FILES["overview"]).write_bytes(render_overview(prediction, dwi, title=title))
        summary = summary_dict(prediction, bundle=bundle, inputs=inputs or {})
        summary["files"].update({key: name for key, name in OPTIONAL_FILES.items() if name in (extra or {})})
        try:
            text = json.dumps(summary, indent=2, default=str, allow_nan=False)
        except ValueError:
            raise StrokePredictorError(
                "The prediction holds non-finite numbers (NaN or infinity), so no valid summary.json can be "
                "written; check the model bundle and the inputs."
            ) from None
        (staging / OUTPUT_FILES["summary"]).write_text(text + "\n")
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(OPTIONAL_FILES.values()))
        if unknown:
            raise ValueError(f"write_outputs: unknown optional output(s) {', '.join(unknown)}.")
        for name, content in extra.items():
            if isinstance(content, np.ndarray):
                write_volume(content, geometry, staging / name)
            else:
                (staging / name).write_bytes(content)
        check_outputs_free(out_dir, overwrite)
        write_folder_marker(out_dir, "outputs", "python -m StrokePredictorLib.predict")
        for name in OUTPUT_FILES.values():
            os.replace(staging / name, out_dir / name)
        for name in OPTIONAL_FILES.values():
            if name in extra:
                os.replace(staging / name, out_dir / name)
            elif (out_dir / name).is_file() and not (out_dir / name).is_symlink():
                (out_dir / name).unlink()  # from an earlier run (overwrite was checked): it would not match
        done = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:
            remove_created_dirs(created)
    logger.info("Wrote %d output files to %s.", len(OUTPUT_FILES), out_dir)
    return out_dir / OUTPUT_FILES["summary"]
