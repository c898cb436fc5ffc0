"""``python -m Training generate``: a semi-synthetic stroke dataset in the ISLES 2022 Zenodo layout.

Writes, directly under ``--out``::

    sub-strokecaseXXXX/ses-0001/dwi/sub-strokecaseXXXX_ses-0001_dwi.nii.gz (+ .json sidecar)
    sub-strokecaseXXXX/ses-0001/dwi/sub-strokecaseXXXX_ses-0001_adc.nii.gz (+ .json)
    sub-strokecaseXXXX/ses-0001/anat/sub-strokecaseXXXX_ses-0001_FLAIR.nii.gz (+ .json)
    derivatives/sub-strokecaseXXXX/ses-0001/sub-strokecaseXXXX_ses-0001_msk.nii.gz      (acute lesion)
    derivatives/sub-strokecaseXXXX/ses-0001/sub-strokecaseXXXX_ses-0001_outcome.nii.gz  (follow-up infarct)
    clinical.csv      case_id + the ten clinical schema fields (empty = missing)
    dataset.json      seed, package versions, every parameter, and per case every drawn value

The images come from :func:`Training.synthesis.case.synthesize_case` (see there and
:mod:`Training.synthesis.physics` for the models). The output is byte-identical for the same seed
and parameters, whatever ``--workers`` is. The dataset is built in a temporary sibling folder and
renamed into place at the end, so an interrupted run leaves nothing half-written.

Example::

    python -m Training generate --out data/sim --cases 200 --seed 0 --lesions ../shared/data/soop --workers 4
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib import clinical
from StrokePredictorLib._lazy import sitk
from StrokePredictorLib.errors import OutputExistsError, StrokePredictorError
from StrokePredictorLib.io import Geometry, atomic_path, write_json
from Training import config as config_lib
from Training.synthesis.case import MODES, OPT_IN, SynthesisParams, SyntheticCase, synthesize_case

logger = logging.getLogger(__name__)

SESSION = "ses-0001"
#: gzip level of the written NIfTI files (1 = fast; the data are noisy floats and barely compress more).
COMPRESSION_LEVEL = 1


@dataclass(frozen=True)
class GenerateConfig:
    """Options of ``python -m Training generate``."""

    out: Path = field(default=Path("data/generated"), metadata={"help": "output folder (ISLES 2022 layout)"})
    cases: int = field(default=10, metadata={"help": "number of cases"})
    seed: int = field(default=0, metadata={"help": "random seed (same seed -> byte-identical files)"})
    mode: str = field(default="physical", metadata={"help": "physical (MR physics) or randomized (domain "
                                                             "randomisation for training)"})
    lesions: Path | None = field(default=None, metadata={"help": "SOOP lesion library (e.g. ../shared/data/soop); "
                                                                 "default: procedural lesions"})
    workers: int = field(default=1, metadata={"help": "worker processes"})
    ood: bool = field(default=False, metadata={"help": "out-of-distribution set: unseen resolutions, b-values, "
                                                       "contrasts and noise; not skull-stripped"})
    skull: bool = field(default=False, metadata={"help": "keep skull and scalp (not skull-stripped)"})
    tiny: bool = field(default=False, metadata={"help": "tiny grids and a 4 mm template (test fixtures)"})
    work_mm: int = field(default=2, metadata={"help": "template working spacing in mm"})
    empty_fraction: float = field(default=0.02, metadata={"help": "probability of a case without lesion"})
    wakeup_fraction: float = field(default=0.22, metadata={"help": "probability of an unknown (wake-up) onset"})
    lesion_kind: str | None = field(default=None, metadata={"help": "force a procedural lesion kind: "
                                                                    "territorial, embolic, small or empty"})
    regional_mimics: float = field(default=0.0, metadata={
        "help": "probability of a broad regional DWI hyperintensity with normal ADC per case (inferior "
                "brightening, large soft regions, as on real scans); 0 keeps earlier datasets byte-identical"})
    cerebellar_adc: float = field(default=0.0, metadata={
        "help": "probability per case of the cerebellar cortex's own ADC (0.60-0.85 x10^-3 mm^2/s, as in real "
                "scans; else the cerebral cortex's) and a FLAIR gain below the tentorium; own random stream, so 0 "
                "reproduces earlier datasets"})
    scan_mimics: float = field(default=0.0, metadata={
        "help": "probability per case of the real-scan mimics (Training/synthesis/mimics.py): susceptibility at "
                "air-bone interfaces, bright cortical ribbon, T2 shine-through, midline and choroid-plexus spots, "
                "chronic infarcts and lacunes, white-matter hyperintensities; own random stream, 0 reproduces "
                "earlier datasets"})
    showers: float = field(default=0.0, metadata={
        "help": "probability per non-empty case of a cardio-embolic shower (3-40 foci of 0.02-0.5 mL over 1-3 "
                "territories), which replaces the lesion in half of those cases; own random stream"})
    small_lesions: float = field(default=0.0, metadata={
        "help": "probability per non-empty case that the lesion is a single small one (0.02-1 mL) instead; "
                "same stream as --showers, and showers + small-lesions <= 1"})
    first_index: int = field(default=1, metadata={"help": "number of the first case (sub-strokecaseXXXX)"})
    montage: Path | None = field(default=None, metadata={"help": "also write a PNG montage of the first cases"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing generated dataset in --out"})

    def __post_init__(self) -> None:
        if self.cases < 1:
            raise ValueError(f"--cases must be at least 1, got {self.cases}.")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}.")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'.")
        if self.work_mm not in (1, 2, 3, 4):
            raise ValueError(f"--work-mm must be 1, 2, 3 or 4, got {self.work_mm}.")
        if not 0.0 <= self.regional_mimics <= 1.0:
            raise ValueError(f"--regional-mimics must lie between 0 and 1, got {self.regional_mimics}.")
        if not 0.0 <= self.cerebellar_adc <= 1.0:
            raise ValueError(f"--cerebellar-adc must lie between 0 and 1, got {self.cerebellar_adc}.")
        for name in ("scan_mimics", "showers", "small_lesions"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must lie between 0 and 1, got {getattr(self, name)}.")
        if self.showers + self.small_lesions > 1.0:
            raise ValueError("--showers and --small-lesions must not add up to more than 1.")
        if self.lesion_kind not in (None, "territorial", "embolic", "small", "empty"):
            raise ValueError(f"--lesion-kind must be territorial, embolic, small or empty, got '{self.lesion_kind}'.")

    def synthesis_params(self) -> SynthesisParams:
        return SynthesisParams(
            mode=self.mode, ood=self.ood, skull=self.skull, tiny=self.tiny, work_mm=self.work_mm,
            lesions=None if self.lesions is None else str(self.lesions), empty_fraction=self.empty_fraction,
            wakeup_fraction=self.wakeup_fraction, lesion_kind=self.lesion_kind, regional_mimics=self.regional_mimics,
            cerebellar_adc=self.cerebellar_adc, scan_mimics=self.scan_mimics, showers=self.showers,
            small_lesions=self.small_lesions,
        )


# ----------------------------------------------------------------------------------------
# Writing one case
# ----------------------------------------------------------------------------------------
def _write_nifti(array: np.ndarray, geometry: Geometry, path: Path, dtype: type) -> None:
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=dtype)))
    with atomic_path(path, overwrite=False) as temporary:
        sitk.WriteImage(image, str(temporary), True, COMPRESSION_LEVEL)


def _sidecar(case: SyntheticCase, kind: str) -> dict:
    meta = case.metadata
    data: dict = {"dataset": "StrokePredictor synthetic (ISLES 2022 layout)", "Modality": "MR",
                  "BodyPartExamined": "BRAIN",
                  "MagneticFieldStrength": meta["acquisition"].get("field_strength_t", 3.0)}
    age, sex = case.clinical["age"], case.clinical["sex"]
    if age is not None:
        data["PatientAge"] = f"{int(round(float(age))):03d}Y"
    if sex is not None:
        data["PatientSex"] = sex
    geometry = case.flair.geometry if kind == "FLAIR" else case.dwi.geometry
    data["SliceThickness"] = geometry.spacing[2]
    data["SpacingBetweenSlices"] = geometry.spacing[2]
    if kind == "dwi":
        data.update({"ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"], "DiffusionBValue": case.b_value,
                     "MRAcquisitionType": "2D"})
    elif kind == "adc":
        data.update({"ImageType": ["DERIVED", "PRIMARY", "ADC_UNSPECIFIED", "ADC"], "DiffusionBValue": 0.0,
                     "MRAcquisitionType": "2D"})
    else:
        data.update({"ImageType": ["ORIGINAL", "PRIMARY", "M_IR", "M", "IR"], "ScanningSequence": "IR",
                     "MRAcquisitionType": "3D" if meta["acquisition"]["flair_grid"].startswith("3D") else "2D"})
    return data


def case_paths(root: Path, case_id: str) -> dict[str, Path]:
    """Paths of one case in the ISLES 2022 Zenodo layout under ``root``."""
    base = root / case_id / SESSION
    prefix = f"{case_id}_{SESSION}"
    derivatives = root / "derivatives" / case_id / SESSION
    return {
        "dwi": base / "dwi" / f"{prefix}_dwi.nii.gz", "adc": base / "dwi" / f"{prefix}_adc.nii.gz",
        "flair": base / "anat" / f"{prefix}_FLAIR.nii.gz", "mask": derivatives / f"{prefix}_msk.nii.gz",
        "outcome": derivatives / f"{prefix}_outcome.nii.gz",
    }


def write_case(case: SyntheticCase, root: Path) -> dict[str, Path]:
    """Write one case's images, masks and sidecars under ``root`` (ISLES 2022 layout)."""
    paths = case_paths(root, case.case_id)
    _write_nifti(case.dwi.array, case.dwi.geometry, paths["dwi"], np.float64)
    _write_nifti(case.adc.array, case.adc.geometry, paths["adc"], np.float64)
    _write_nifti(case.flair.array, case.flair.geometry, paths["flair"], np.float32)
    _write_nifti(case.mask, case.dwi.geometry, paths["mask"], np.uint8)
    _write_nifti(case.outcome, case.dwi.geometry, paths["outcome"], np.uint8)
    for kind, key in (("dwi", "dwi"), ("adc", "adc"), ("FLAIR", "flair")):
        sidecar = paths[key].with_name(paths[key].name.replace(".nii.gz", ".json"))
        write_json(_sidecar(case, kind), sidecar)
    return paths


def _work(args: tuple[int, int, SynthesisParams, str]) -> tuple[str, dict, dict]:
    index, seed, params, root = args
    case = synthesize_case(index, seed, params)
    write_case(case, Path(root))
    return case.case_id, case.clinical.to_dict(), case.metadata


def _init_worker(template_mm: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    from Training.synthesis.anatomy import load_template

    load_template(template_mm)


# ----------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions of the packages that shape the generated data."""
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "SimpleITK", "nibabel", "nilearn", "strokepredictor"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an ``--out`` that is not empty unless ``overwrite`` is given and it
    is a dataset this verb wrote (its marker, or the ``dataset.json`` this verb writes; an nnU-Net
    or any other folder holding a ``dataset.json`` is refused), or whose parent is not writable."""
    from StrokePredictorLib.io import check_output_folder, ensure_writable_dir, remove_created_dirs

    check_output_folder(out, "dataset", overwrite=overwrite, option="--out")
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists() or p.is_symlink())
    remove_created_dirs(ensure_writable_dir(existing, option="--out"))


def generate(config: GenerateConfig, *, progress: bool = True) -> Path:
    """Generate the dataset described by ``config``; returns the output folder.

    Raises:
        OutputExistsError: ``config.out`` holds files and ``overwrite`` is not set (or it is not a
            generated dataset).
        StrokePredictorError: e.g. an unusable lesion library.
    """
    from tqdm import tqdm

    from Training.synthesis import outcome as outcome_model
    from Training.synthesis.anatomy import load_template
    from Training.synthesis.clinical_sim import MISSING_RATES
    from Training.synthesis.lesions import LESION_MIX, load_soop
    from Training.synthesis.mimics import KINDS, SHOWER_COUNT, SHOWER_FOCUS_ML, SMALL_LESION_ML
    from Training.synthesis.physics import PHYSICS, RANDOMIZED

    out = Path(config.out)
    _prepare_out(out, config.overwrite)
    params = config.synthesis_params()
    if params.lesions:
        library = load_soop(params.lesions)  # fail early with a clear message
        lesion_source = {"kind": "SOOP acute lesion masks (MNI, 1 mm)", "folder": Path(params.lesions).name,
                         "n_masks": len(library),
                         "citation": "Absher et al., Sci Data 2024 (SOOP); Liu et al., Sci Data 2023 (atlas)"}
    else:
        lesion_source = {"kind": "procedural lesions in arterial territories", "mix": LESION_MIX}
    load_template(params.template_mm())
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    started = time.perf_counter()
    try:
        indices = range(config.first_index, config.first_index + config.cases)
        jobs = [(i, config.seed, params, str(staging)) for i in indices]
        results: list[tuple[str, dict, dict]] = []
        bar = tqdm(total=len(jobs), desc="generate", unit="case", disable=not progress)
        if config.workers == 1:
            for job in jobs:
                results.append(_work(job))
                bar.update()
        else:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(config.workers, mp_context=context, initializer=_init_worker,
                                     initargs=(params.template_mm(),)) as pool:
                for result in pool.map(_work, jobs):
                    results.append(result)
                    bar.update()
        bar.close()
        records = {case_id: clinical.ClinicalRecord(values) for case_id, values, _ in results}
        clinical.write_csv(records, staging / "clinical.csv")
        description = {
            "name": out.name,
            "generator": "python -m Training generate",
            "layout": "ISLES 2022 Zenodo (sub-strokecaseXXXX/ses-0001/{dwi,anat}, derivatives/..._msk and _outcome)",
            "seed": config.seed,
            "config": _portable({k: v for k, v in config_lib.to_dict(config).items() if not (k in OPT_IN and not v)}),
            "synthesis_params": _portable(params.to_dict()),
            "versions": versions(),
            "lesion_source": lesion_source,
            "models": {
                "physics": PHYSICS, "randomized": RANDOMIZED if config.mode == "randomized" else None,
                "outcome": (outcome_model.__doc__ or "").strip(),
                "treatment_benefit": outcome_model.TREATMENT_BENEFIT,
                "treatment_tau_h": outcome_model.TREATMENT_TAU_H,
                "clinical_missing_rates": MISSING_RATES,
                **({"scan_mimics": [asdict(spec) for spec in KINDS]} if params.scan_mimics > 0 else {}),
                **({"showers": {"focus_ml": SHOWER_FOCUS_ML, "count": SHOWER_COUNT, "small_lesion_ml": SMALL_LESION_ML}}
                   if params.showers > 0 or params.small_lesions > 0 else {}),
            },
            "clinical_csv": "clinical.csv",
            "clinical_schema_version": clinical.SCHEMA_VERSION,
            "cases": [meta for _, _, meta in results],
        }
        write_json(description, staging / "dataset.json")
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - started
    logger.info("Generated %d case(s) in %s in %.1f s (%.2f cases/s, %d worker(s)).", config.cases, out, elapsed,
                config.cases / elapsed, config.workers)
    if config.montage is not None:
        montage(out, config.montage, overwrite=config.overwrite)
    return out


def _portable(values: dict) -> dict:
    """Paths reduced to their last component, so dataset.json holds no machine-specific path
    and the same parameters give the same bytes wherever the dataset is written."""
    return {k: (Path(v).name if k in ("out", "lesions", "montage") and v else v) for k, v in values.items()}


def _commit(staging: Path, out: Path) -> None:
    """Mark the finished staging folder as a dataset and move it into place, replacing an old
    generated dataset (checked by :func:`_prepare_out`). When ``out`` cannot be renamed (a mount
    point, another file system), its old entries are removed and the new ones moved in."""
    from StrokePredictorLib.io import ordinary_permissions, recognised_kind, write_folder_marker

    write_folder_marker(staging, "dataset", "python -m Training generate")
    ordinary_permissions(staging)  # mkdtemp made it private (0700)
    if out.exists() and any(out.iterdir()) and recognised_kind(out) != "dataset":
        raise OutputExistsError(f"--out {out} changed while the dataset was generated and is no longer a generated "
                                "dataset; the new dataset is left out, nothing was replaced.")
    try:
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except OSError:  # EBUSY / EXDEV: a mount point; replace its content instead of the folder
        out.mkdir(exist_ok=True)
        for entry in list(out.iterdir()):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for entry in list(staging.iterdir()):
            shutil.move(str(entry), str(out / entry.name))
        shutil.rmtree(staging, ignore_errors=True)


def write_tiny_dataset(out_dir: str | os.PathLike, n_cases: int = 3, seed: int = 0) -> Path:
    """Write a tiny dataset (seconds) for tests of other parts: physical mode, procedural
    territorial lesions (never empty), tiny grids (DWI 44x52x30 at 3.5x3.5x5 mm, FLAIR 64x64x24
    at 2.8x2.8x6 mm), the full ISLES layout plus clinical.csv and dataset.json.

    Args:
        out_dir: output folder (created; may exist if empty).
        n_cases: number of cases.
        seed: random seed.

    Returns:
        ``out_dir`` as a Path.
    """
    config = GenerateConfig(out=Path(out_dir), cases=n_cases, seed=seed, tiny=True, empty_fraction=0.0,
                            lesion_kind="territorial")
    return generate(config, progress=False)


# ----------------------------------------------------------------------------------------
# Montage
# ----------------------------------------------------------------------------------------
def montage(root: str | os.PathLike, png: str | os.PathLike, *, n_cases: int = 4, overwrite: bool = False) -> Path:
    """PNG montage of generated cases: one row per case (the axial DWI slice with the most lesion),
    columns DWI, ADC, FLAIR (resampled onto the DWI grid with the recorded rigid offset undone),
    DWI with the acute mask and DWI with the outcome mask.

    Returns:
        the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from StrokePredictorLib.io import discover_isles, read_volume
    from StrokePredictorLib.preprocess import resample
    from Training.synthesis.acquisition import euler_transform

    root = Path(root)
    cases = discover_isles(root)[:n_cases]
    meta = {c["case_id"]: c for c in json.loads((root / "dataset.json").read_text())["cases"]}
    fig, axes = plt.subplots(len(cases), 5, figsize=(13, 2.8 * len(cases)), squeeze=False)
    for row, record in enumerate(cases):
        dwi = read_volume(record.dwi, role="DWI")
        adc = read_volume(record.adc, role="ADC")
        mask = read_volume(record.mask, role="mask").array > 0.5 if record.mask else np.zeros(dwi.array.shape, bool)
        outcome_path = record.mask.with_name(record.mask.name.replace("_msk", "_outcome")) if record.mask else None
        outcome = read_volume(outcome_path).array > 0.5 if outcome_path and outcome_path.is_file() else mask
        flair_arr = np.zeros(dwi.array.shape, np.float32)
        info = meta.get(record.case_id, {})
        if record.flair is not None:
            flair = read_volume(record.flair, role="FLAIR")
            transform = None
            if "flair_transform" in info:
                ft = info["flair_transform"]
                transform = euler_transform(np.asarray(ft["matrix"]), np.asarray(ft["center_lps"]))
            flair_arr = resample(flair.array, flair.geometry, dwi.geometry, order=1, transform=transform)
        k = int(np.argmax(outcome.sum(axis=(1, 2)))) if outcome.any() else dwi.array.shape[0] // 2
        if mask.any():
            k = int(np.argmax(mask.sum(axis=(1, 2))))

        def show(ax, image, title, overlay=None, color="red", k=k):  # noqa: ANN001, ANN202
            sl = np.flipud(image[k])
            lo, hi = np.percentile(sl, [1, 99.5])
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            if overlay is not None and overlay[k].any():
                ax.contour(np.flipud(overlay[k]).astype(float), levels=[0.5], colors=color, linewidths=0.8)
            ax.set_title(title, fontsize=8)
            ax.axis("off")

        label = f"{record.case_id[-8:]}"
        lesion = info.get("lesion", {})
        show(axes[row, 0], dwi.array, f"{label} DWI b={info.get('acquisition', {}).get('b_value', '?')}")
        show(axes[row, 1], adc.array, f"ADC ({info.get('acquisition', {}).get('adc_unit', '?')})")
        show(axes[row, 2], flair_arr, "FLAIR (registered)")
        show(axes[row, 3], dwi.array, f"acute {lesion.get('volume_ml', 0):.1f} mL", mask)
        show(axes[row, 4], dwi.array, f"outcome {info.get('outcome', {}).get('volume_ml_dwi_grid', 0):.1f} mL",
             outcome, "yellow")
    fig.tight_layout()
    with atomic_path(png, overwrite=overwrite) as temporary:
        fig.savefig(temporary, dpi=90, format="png")
    plt.close(fig)
    return Path(png)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m Training generate --out DIR --cases N --seed S [...]``."""
    import sys

    config = config_lib.parse(GenerateConfig, list(sys.argv[1:] if argv is None else argv),
                              "Generate a semi-synthetic stroke dataset in the ISLES 2022 layout.",
                              prog="python -m Training generate")
    try:
        out = generate(config)
    except ValueError as error:  # parameter combinations refused by the synthesiser
        raise StrokePredictorError(str(error)) from None
    logger.info("Dataset written to %s", out)
    return 0
