"""``python -m Training preprocess``: preprocess an ISLES-layout folder once into a training cache.

Every case goes through :func:`StrokePredictorLib.preprocess.preprocess` (the same code as
inference) and is stored as network-ready arrays that the data loader memory-maps::

    CACHE/index.json                 grid, normalisation, preset, source, dataset.json, one entry per case
    CACHE/split.json                 train / val / test case ids (70/15/15 by a hash of the case id)
    CACHE/preprocess_config.json     the effective config of this command
    CACHE/cases/<case_id>/image.npy  float16 (3, D, H, W): DWI, ADC, FLAIR (zeros when absent)
    CACHE/cases/<case_id>/brain.npy  bool (D, H, W) brain mask on the model grid
    CACHE/cases/<case_id>/acute.npy  uint8 (D, H, W) acute lesion (derivatives/*_msk), if present
    CACHE/cases/<case_id>/outcome.npy uint8 (D, H, W) follow-up infarct (derivatives/*_outcome), if present
    CACHE/cases/<case_id>/meta.json  clinical values + missing flags, flair_present, volumes, timings

``D, H, W`` are ``K, J, I`` of the model grid. A case folder is written under a temporary name
and renamed when complete, so an interrupted run leaves no half-written case; running the
command again reuses the finished cases and the existing split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from StrokePredictorLib import clinical
from StrokePredictorLib.errors import InputImageError, OutputExistsError
from StrokePredictorLib.io import CaseRecord, discover_isles, read_volume, write_json
from StrokePredictorLib.preprocess import ModelGrid, Normalization, preprocess, resample
from Training import config as configlib

logger = logging.getLogger(__name__)

CACHE_FORMAT = "strokepredictor-training-cache"
CACHE_VERSION = 1
TASKS = ("acute", "outcome")
SPLITS = ("train", "val", "test")

# Model grid of each network preset (i, j, k voxels; mm). NetworkConfig.lite() is "meant for the
# 96 x 112 x 80 voxel grid at 2 mm"; base() takes a 128^3 input.
PRESET_GRIDS: dict[str, ModelGrid] = {
    "lite": ModelGrid((96, 112, 80), (2.0, 2.0, 2.0)),
    "base": ModelGrid((128, 128, 128), (1.5, 1.5, 1.5)),
}


def preset_grid(preset: str) -> ModelGrid:
    """The model grid recommended for a network preset (``lite`` or ``base``).

    Uses :func:`StrokePredictorLib.bundle.recommended_grid` of the preset's ``NetworkConfig``
    (falls back to :data:`PRESET_GRIDS`).
    """
    if preset not in PRESET_GRIDS:
        raise configlib.ConfigError(f"Unknown network preset '{preset}'; expected one of {', '.join(PRESET_GRIDS)}.")
    try:
        from StrokePredictorLib.bundle import recommended_grid
        from StrokePredictorLib.network import NetworkConfig

        return recommended_grid(getattr(NetworkConfig, preset)())
    except ImportError:  # pragma: no cover - older library without bundle.recommended_grid
        pass
    return PRESET_GRIDS[preset]


@dataclass(frozen=True)
class CacheConfig:
    """Configuration of ``python -m Training preprocess``."""

    data: Path = field(default=Path("data"), metadata={"help": "ISLES-layout folder (sub-*/ses-*/dwi, derivatives/)"})
    out: Path = field(default=Path("cache"), metadata={"help": "cache folder to write"})
    workers: int = field(default=1, metadata={"help": "parallel processes"})
    preset: str = field(default="lite", metadata={"help": "network preset whose model grid is used: lite|base"})
    grid_size: tuple[int, ...] | None = field(default=None, metadata={"help": "override the grid: i,j,k voxels"})
    grid_spacing: tuple[float, ...] | None = field(default=None, metadata={"help": "override the grid: i,j,k mm"})
    clinical_csv: Path | None = field(default=None, metadata={"help": "clinical CSV (default DATA/clinical.csv)"})
    split_seed: int = field(default=0, metadata={"help": "seed of the hash-based 70/15/15 split"})
    split_file: Path | None = field(default=None, metadata={"help": "reuse this split.json instead of making one"})
    val_fraction: float = field(default=0.15, metadata={"help": "fraction of cases for validation"})
    test_fraction: float = field(default=0.15, metadata={"help": "fraction of cases for the test split"})
    register_flair: bool = field(default=True, metadata={"help": "register FLAIR rigidly onto the DWI"})
    overwrite: bool = field(default=False, metadata={"help": "recompute cases already in the cache"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def grid(self) -> ModelGrid:
        base = preset_grid(self.preset)
        size = tuple(int(v) for v in self.grid_size) if self.grid_size else base.size
        spacing = tuple(float(v) for v in self.grid_spacing) if self.grid_spacing else base.spacing
        if len(size) != 3 or len(spacing) != 3:
            raise configlib.ConfigError("grid_size and grid_spacing need three values (i,j,k).")
        return ModelGrid(size, spacing)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------
def _hash_key(case_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{case_id}".encode()).hexdigest()


def make_split(case_ids: list[str], seed: int = 0, val_fraction: float = 0.15,
               test_fraction: float = 0.15) -> dict[str, list[str]]:
    """Deterministic split by case id: cases sorted by ``sha256(seed:case_id)``, then cut.

    The result depends only on the set of ids and the seed (not on their order). With three or
    more cases, validation and test get at least one case each.
    """
    ordered = sorted(set(case_ids), key=lambda c: _hash_key(c, seed))
    n = len(ordered)
    n_val = int(round(val_fraction * n))
    n_test = int(round(test_fraction * n))
    if n >= 3:
        n_val, n_test = max(n_val, 1 if val_fraction > 0 else 0), max(n_test, 1 if test_fraction > 0 else 0)
    n_train = max(n - n_val - n_test, 0)
    return {
        "train": sorted(ordered[:n_train]),
        "val": sorted(ordered[n_train:n_train + n_val]),
        "test": sorted(ordered[n_train + n_val:]),
    }


def extend_split(split: dict[str, list[str]], case_ids: list[str], seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.15) -> dict[str, list[str]]:
    """Add cases that an existing split does not know, by the hash fraction of their id."""
    known = {c for name in SPLITS for c in split.get(name, [])}
    result = {name: list(split.get(name, [])) for name in SPLITS}
    for case_id in sorted(set(case_ids) - known):
        fraction = int(_hash_key(case_id, seed)[:12], 16) / 16**12
        name = "test" if fraction < test_fraction else "val" if fraction < test_fraction + val_fraction else "train"
        result[name].append(case_id)
    return {name: sorted(ids) for name, ids in result.items()}


def read_split(path: Path) -> dict[str, list[str]]:
    """Read a split.json (``{"train": [...], "val": [...], "test": [...]}``)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise configlib.ConfigError(f"Split file {path} does not exist.") from None
    except json.JSONDecodeError as error:
        raise configlib.ConfigError(f"Split file {path} is not valid JSON: {error}.") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(name, []), list) for name in SPLITS):
        raise configlib.ConfigError(f"Split file {path} must hold lists 'train', 'val' and 'test' of case ids.")
    return {name: [str(c) for c in data.get(name, [])] for name in SPLITS}


# ----------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------
def outcome_path(record: CaseRecord, data_root: Path) -> Path | None:
    """The follow-up infarct mask ``derivatives/<case>/ses-*/..._outcome.nii.gz`` of a case, if any."""
    folders = [record.mask.parent] if record.mask is not None else []
    folders.append(data_root / "derivatives" / record.case_id)
    for folder in folders:
        hits = sorted(folder.glob("*_outcome.nii.gz")) + sorted(folder.glob("**/*_outcome.nii.gz"))
        if hits:
            return hits[0]
    return None


def _target_on_model(path: Path, dwi_geometry: Any, mapping: Any, order: int) -> np.ndarray:
    mask = read_volume(path, role="lesion mask")
    array = (mask.array > 0.5).astype(np.float32)
    if not mask.geometry.same_grid(dwi_geometry, tolerance_mm=0.05):
        if dwi_geometry.overlap_fraction(mask.geometry) < 0.5:
            raise InputImageError(f"Mask {path} does not lie on the DWI's grid nor overlap it physically.")
        array = resample(array, mask.geometry, dwi_geometry, order=1)
    if order == 0:
        return mapping.to_model(array, order=0) > 0.5
    return mapping.to_model(array, order=1) > 0.5


def _clinical_for(record: CaseRecord,
                  csv_records: dict[str, clinical.ClinicalRecord] | None) -> clinical.ClinicalRecord:
    values: dict[str, Any] = {}
    if csv_records is not None and record.case_id in csv_records:
        values.update({k: v for k, v in csv_records[record.case_id].values.items() if v is not None})
    elif csv_records is not None:
        logger.warning("Case %s is not in the clinical CSV; only sidecar age/sex are used.", record.case_id)
    sidecar: dict[str, Any] = {}
    if record.age is not None:
        sidecar["age"] = record.age
    if record.sex is not None:
        sidecar["sex"] = record.sex
    try:
        checked = clinical.validate(sidecar).values if sidecar else {}
    except clinical.ClinicalValueError as error:
        logger.warning("Case %s: sidecar value ignored (%s).", record.case_id, error)
        checked = {}
    for key, value in checked.items():
        if value is not None and values.get(key) is None:
            values[key] = value
    return clinical.ClinicalRecord(values)


def process_case(record: CaseRecord, data_root: Path, cases_dir: Path, grid: ModelGrid,
                 normalization: Normalization, record_clinical: clinical.ClinicalRecord,
                 register_flair: bool = True) -> dict:
    """Preprocess one case and write its folder ``cases_dir/<case_id>`` atomically.

    Returns:
        The case's metadata (also written as ``meta.json``).
    """
    dwi = read_volume(record.dwi, role="DWI")
    adc = read_volume(record.adc, role="ADC")
    flair = read_volume(record.flair, role="FLAIR") if record.flair is not None else None
    case = preprocess(dwi, adc, flair, grid=grid, normalization=normalization, register_flair=register_flair)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    arrays: dict[str, np.ndarray] = {
        "image": case.image.astype(np.float16),
        "brain": case.brain.astype(bool),
    }
    targets: dict[str, dict] = {}
    for task, path in (("acute", record.mask), ("outcome", outcome_path(record, data_root))):
        if path is None:
            continue
        target = _target_on_model(Path(path), dwi.geometry, case.mapping, order=1)
        arrays[task] = target.astype(np.uint8)
        targets[task] = {"file": str(path), "volume_ml": float(target.sum()) * voxel_ml}
    values, missing = clinical.encode(record_clinical)
    meta = {
        "case_id": record.case_id,
        "flair_present": bool(case.flair_present),
        "adc_unit": case.adc_unit,
        "targets": targets,
        "clinical": record_clinical.to_dict(),
        "clinical_values": values.tolist(),
        "clinical_missing": missing.tolist(),
        "sources": record.to_dict(),
        "mapping": case.mapping.to_dict(),
        "timings_s": case.timings,
        "shape": list(case.image.shape),
    }
    final = cases_dir / record.case_id
    temporary = Path(tempfile.mkdtemp(prefix=f".{record.case_id}-", dir=cases_dir))
    try:
        for name, array in arrays.items():
            np.save(temporary / f"{name}.npy", array)
        write_json(meta, temporary / "meta.json", overwrite=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return meta


def _worker(args: tuple) -> dict:
    return process_case(*args)


def _complete(folder: Path) -> dict | None:
    meta_path = folder / "meta.json"
    if not (meta_path.is_file() and (folder / "image.npy").is_file() and (folder / "brain.npy").is_file()):
        return None
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None


# ----------------------------------------------------------------------------------------
# The whole cache
# ----------------------------------------------------------------------------------------
def build_cache(config: CacheConfig) -> Path:
    """Preprocess ``config.data`` into ``config.out``; returns the path of ``index.json``.

    On an error, what this call created is removed again unless a case was finished (finished
    cases are kept for the next run): no empty cache folder is left behind.

    Raises:
        InputImageError: the data folder has no usable case (or a case is broken).
        OutputExistsError: the cache was made with another grid and ``overwrite`` is off.
    """
    data_root = Path(config.data)
    out = Path(config.out)
    records = discover_isles(data_root)
    if (data_root / "ISLES-2022").is_dir() and not any(data_root.glob("sub-*")):
        data_root = data_root / "ISLES-2022"
    grid = config.grid()
    normalization = Normalization()
    index_path = out / "index.json"
    if index_path.is_file():
        previous = json.loads(index_path.read_text())
        if previous.get("grid") != grid.to_dict() and not config.overwrite:
            raise OutputExistsError(
                f"Cache {out} was made for grid {previous.get('grid')}, not {grid.to_dict()}; "
                "pass --overwrite to rebuild it or choose another --out."
            )
    csv_path = Path(config.clinical_csv) if config.clinical_csv else data_root / "clinical.csv"
    if config.clinical_csv and not csv_path.is_file():
        raise clinical.ClinicalValueError(f"Clinical CSV {csv_path} does not exist.")
    csv_records = clinical.read_csv(csv_path) if csv_path.is_file() else None
    if csv_records is None:
        logger.info("No clinical CSV at %s: clinical features are missing except sidecar age/sex.", csv_path)

    cases_dir = out / "cases"
    config_path = out / "preprocess_config.json"
    # what this call creates, removed again on an error that leaves no finished case
    top = out
    while not top.parent.exists() and top.parent != top:  # e.g. cache/ of cache/isles22
        top = top.parent
    created = [p for p in (top, out, cases_dir, config_path) if not p.exists()]
    try:
        cases_dir.mkdir(parents=True, exist_ok=True)
        configlib.save(config, config_path)
        return _build(config, records, data_root, out, grid, normalization, csv_path, csv_records)
    except BaseException:
        finished = [p for p in cases_dir.iterdir() if _complete(p)] if cases_dir.is_dir() else []
        if finished:
            logger.info("Kept %d finished case(s) in %s for the next run.", len(finished), cases_dir)
        else:
            for path in reversed(created):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def _build(config: CacheConfig, records: list[CaseRecord], data_root: Path, out: Path, grid: ModelGrid,
           normalization: Normalization, csv_path: Path,
           csv_records: dict[str, clinical.ClinicalRecord] | None) -> Path:
    from tqdm import tqdm

    cases_dir = out / "cases"

    metas: dict[str, dict] = {}
    todo = []
    for record in records:
        done = None if config.overwrite else _complete(cases_dir / record.case_id)
        if done is not None and done.get("shape", [None])[1:] == list(grid.size[::-1]):
            metas[record.case_id] = done
        else:
            todo.append((record, data_root, cases_dir, grid, normalization, _clinical_for(record, csv_records),
                         config.register_flair))
    if metas:
        logger.info("Reusing %d cached case(s); preprocessing %d.", len(metas), len(todo))
    bar = tqdm(total=len(todo), desc="preprocess", unit="case", disable=not config.progress)
    try:
        if config.workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=config.workers) as pool:
                futures = {pool.submit(_worker, args): args[0].case_id for args in todo}
                for future in as_completed(futures):
                    metas[futures[future]] = future.result()
                    bar.update()
        else:
            for args in todo:
                metas[args[0].case_id] = process_case(*args)
                bar.update()
    finally:
        bar.close()

    case_ids = [r.case_id for r in records]
    split_path = out / "split.json"
    split_source = config.split_file or (split_path if split_path.is_file() else None)
    if split_source is not None:
        split = extend_split(read_split(Path(split_source)), case_ids, config.split_seed, config.val_fraction,
                             config.test_fraction)
        method = f"reused {split_source} (new cases by sha256 fraction)"
    else:
        split = make_split(case_ids, config.split_seed, config.val_fraction, config.test_fraction)
        method = "cases sorted by sha256(seed:case_id), cut at the fractions"
    write_json({**split, "seed": config.split_seed, "method": method,
                "fractions": {"train": 1 - config.val_fraction - config.test_fraction, "val": config.val_fraction,
                              "test": config.test_fraction}}, split_path, overwrite=True)

    dataset_json = data_root / "dataset.json"
    dataset = None
    if dataset_json.is_file():
        try:
            dataset = json.loads(dataset_json.read_text())
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; not stored in the cache index.", dataset_json)
    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "preset": config.preset,
        "grid": grid.to_dict(),
        "normalization": normalization.to_dict(),
        "channels": ["dwi", "adc", "flair"],
        "array_layout": "image float16 (3, K, J, I); masks (K, J, I)",
        "source": str(data_root.resolve()),
        "clinical_csv": str(csv_path.resolve()) if csv_records is not None else None,
        "clinical_schema_version": clinical.SCHEMA_VERSION,
        "clinical_features": list(clinical.FEATURE_NAMES),
        "dataset": dataset,
        "n_cases": len(case_ids),
        "tasks": {task: sum(task in metas[c]["targets"] for c in case_ids) for task in TASKS},
        "cases": [metas[c] for c in case_ids],
    }
    index_path = write_json(index, out / "index.json", overwrite=True)
    logger.info("Cache %s: %d cases (train %d, val %d, test %d).", out, len(case_ids), len(split["train"]),
                len(split["val"]), len(split["test"]))
    return index_path


def main(argv: list[str]) -> int:
    config = configlib.parse(CacheConfig, argv, "Preprocess an ISLES-layout folder into a training cache.",
                             prog="python -m Training preprocess")
    path = build_cache(config)
    index = json.loads(path.read_text())
    logger.info("Wrote %s (%d cases; acute targets %d, outcome targets %d).", path, index["n_cases"],
                index["tasks"]["acute"], index["tasks"]["outcome"])
    return 0


__all__ = ["CacheConfig", "PRESET_GRIDS", "build_cache", "extend_split", "make_split", "preset_grid",
           "process_case", "read_split"]
