"""Fit the NIHSS-from-lesion model on the real SOOP pairs and write its coefficients as JSON.

Usage::

    python -m Training.clinical.fit_nihss [--soop ../shared/data/soop] [--out Training/resources/nihss_model.json]
                                 [--holdout 0.2] [--seed 0] [--workers 2] [--overwrite]

Reads ``participants.tsv`` (admission NIHSS) and the lesion masks ``lesions/bwsrsub-<ID>_lesion.nii.gz``
(MNI space, 1 mm), computes the features of :mod:`Training.clinical.nihss` (the brain reference is the
arterial territory atlas's non-zero region), caches them (``--cache``, default
``~/.cache/strokepredictor/soop_nihss_features.npz``) so a refit takes seconds, fits on a random
``1 - holdout`` of the rows and reports the Pearson R of expected vs observed NIHSS on the held-out
rows. The stored coefficients are the ones fitted on the training rows (those the R describes).
The SOOP data are never copied: only the coefficients are written.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from StrokePredictorLib.errors import StrokePredictorError
from StrokePredictorLib.io import write_json
from Training.clinical import nihss

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOOP = Path(os.environ.get("STROKEPREDICTOR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "soop"
DEFAULT_CACHE = Path.home() / ".cache" / "strokepredictor" / "soop_nihss_features.npz"

_BRAIN: tuple[np.ndarray, np.ndarray] | None = None


def _load_kji(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.dataobj).transpose(2, 1, 0), np.asarray(image.affine, dtype=float)


def _init_worker(atlas_path: str) -> None:
    global _BRAIN
    atlas, affine = _load_kji(Path(atlas_path))
    _BRAIN = nihss.brain_reference(atlas > 0, affine)


def _features_of(path: str) -> np.ndarray:
    assert _BRAIN is not None
    mask, affine = _load_kji(Path(path))
    return nihss.lesion_features(mask > 0, affine, *_BRAIN)


def read_pairs(soop: Path) -> tuple[list[str], np.ndarray, list[Path]]:
    """Participant ids with a lesion mask and an admission NIHSS: (ids, nihss (N,), mask paths)."""
    table = soop / "participants.tsv"
    if not table.is_file():
        raise StrokePredictorError(f"SOOP participants table {table} does not exist (give --soop DIR).")
    ids, scores, paths = [], [], []
    with table.open(newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            value = (row.get("nihss") or "n/a").strip()
            subject = row["participant_id"].strip()
            path = soop / "lesions" / f"bwsr{subject}_lesion.nii.gz"
            if value.lower() in ("n/a", "", "nan") or not path.is_file():
                continue
            ids.append(subject)
            scores.append(float(value))
            paths.append(path)
    if not ids:
        raise StrokePredictorError(f"No SOOP participant in {table} has both an NIHSS and a lesion mask.")
    return ids, np.asarray(scores), paths


def compute_features(soop: Path, paths: list[Path], ids: list[str], cache: Path | None, workers: int) -> np.ndarray:
    """Features (N, F) of every mask, from the cache when it holds exactly these ids."""
    if cache is not None and cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        if list(stored["ids"]) == ids and tuple(stored["feature_names"]) == nihss.FEATURE_NAMES:
            logger.info("Features read from cache %s.", cache)
            return stored["features"]
    from tqdm import tqdm

    atlas = soop / "ArterialAtlas136.nii.gz"
    with ProcessPoolExecutor(max_workers=max(workers, 1), initializer=_init_worker,
                             initargs=(str(atlas),)) as pool:
        rows = list(tqdm(pool.map(_features_of, [str(p) for p in paths], chunksize=16), total=len(paths),
                         desc="SOOP lesion features"))
    features = np.stack(rows)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(temporary, ids=np.asarray(ids), features=features, feature_names=np.asarray(nihss.FEATURE_NAMES))
        temporary.replace(cache)
    return features


def fit(features: np.ndarray, scores: np.ndarray, *, holdout: float, seed: int, ridge: float) -> nihss.NihssModel:
    """Fit on a random ``1 - holdout`` of the rows; the model's ``info`` holds the held-out R."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scores))
    n_test = int(round(holdout * len(scores)))
    test, train = order[:n_test], order[n_test:]
    mean, scale, coef, intercept = nihss.fit_poisson(features[train], scores[train], ridge=ridge)
    model = nihss.NihssModel(nihss.FEATURE_NAMES, mean, scale, coef, intercept, 0.0, {})
    dispersion = nihss.nb_dispersion(scores[train], model.expected(features[train]))
    predicted = model.expected(features[test])
    r_test = float(np.corrcoef(predicted, scores[test])[0, 1]) if n_test > 2 else math.nan
    r_train = float(np.corrcoef(model.expected(features[train]), scores[train])[0, 1])
    volume_only = nihss.fit_poisson(features[train][:, :1], scores[train], ridge=ridge)
    mu_volume = np.exp(volume_only[3] + ((features[test][:, :1] - volume_only[0]) / volume_only[1]) @ volume_only[2])
    r_volume = float(np.corrcoef(mu_volume, scores[test])[0, 1]) if n_test > 2 else math.nan
    info = {
        "data": "SOOP (Absher et al., Sci Data 2024), lesion masks in MNI space with admission NIHSS",
        "model": "Poisson regression, log link, ridge on standardised features; negative-binomial dispersion",
        "n_train": int(train.size), "n_test": int(n_test), "seed": seed, "ridge": ridge,
        "pearson_r_test": r_test, "pearson_r_train": r_train, "pearson_r_test_volume_only": r_volume,
        "nihss_mean_train": float(scores[train].mean()),
    }
    return nihss.NihssModel(nihss.FEATURE_NAMES, mean, scale, coef, intercept, dispersion, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m Training.clinical.fit_nihss", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--soop", type=Path, default=DEFAULT_SOOP, help="SOOP folder (participants.tsv, lesions/)")
    parser.add_argument("--out", type=Path, default=nihss.DEFAULT_MODEL_PATH, help="coefficients JSON to write")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="feature cache (.npz); 'none' disables")
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of rows held out for the R")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split")
    parser.add_argument("--ridge", type=float, default=1.0, help="L2 penalty on standardised coefficients")
    parser.add_argument("--workers", type=int, default=2, help="processes reading the masks")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ids, scores, paths = read_pairs(args.soop)
    cache = None if str(args.cache).lower() == "none" else args.cache
    features = compute_features(args.soop, paths, ids, cache, args.workers)
    model = fit(features, scores, holdout=args.holdout, seed=args.seed, ridge=args.ridge)
    write_json(model.to_dict(), args.out, overwrite=args.overwrite)
    info = model.info
    logger.info("Fitted on %d SOOP rows; held-out R = %.3f (n = %d; volume only %.3f); written to %s",
                info["n_train"], info["pearson_r_test"], info["n_test"], info["pearson_r_test_volume_only"], args.out)
    for name, coef in zip(model.feature_names, model.coef, strict=False):
        logger.info("  %-18s %+.3f", name, coef)
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except StrokePredictorError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
