"""``python -m Training ablate``: imaging-only against clinical-imaging fusion on the same split.

For each task (acute, outcome) and each seed, the network is trained twice on the same cache
and split (:func:`Training.train.run` with ``imaging_only`` False and True, everything else
equal), each best checkpoint is exported as a bundle, and both bundles are evaluated end to end
on the same test cases of the raw data (:func:`Training.evaluate.run`). The effect of the
clinical features is the paired per-case difference fusion - imaging-only of each metric: mean
+- sd over the (case, seed) pairs, a bootstrap 95 % confidence interval (cases resampled with
replacement), and, with several seeds, the sd of the per-seed mean differences.

Outputs in ``--out``: ``runs/``, ``bundles/``, ``eval/`` (one folder per task, seed and arm),
``ablation.json``, ``ablation.md`` and ``ablate_config.json``. Training options common to every
run come from ``--train-config FILE`` (YAML/JSON of TrainConfig fields); the flags here win.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib.errors import OutputExistsError, StrokePredictorError
from StrokePredictorLib.io import write_json
from Training import config as config_mod

logger = logging.getLogger(__name__)

ARMS = (("fusion", False), ("imaging_only", True))
ABLATION_METRICS = (("dice", "Dice", True), ("lesion_f1", "Lesion F1", True),
                    ("abs_volume_diff_ml", "Abs. vol. diff. (mL)", False))


@dataclass(frozen=True)
class AblateConfig:
    """Options of ``python -m Training ablate``."""

    cache: Path | None = field(default=None, metadata={"help": "training cache with split.json (required)"})
    data: Path | None = field(default=None, metadata={"help": "the raw ISLES-layout folder the cache was built from"})
    out: Path | None = field(default=None, metadata={"help": "output folder (required)"})
    tasks: tuple[str, ...] = field(default=("acute", "outcome"), metadata={"help": "tasks to ablate"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "training seeds (each trains both arms)"})
    subset: str = field(default="test", metadata={"help": "split subset evaluated: val|test"})
    train_config: Path | None = field(default=None, metadata={"help": "YAML/JSON of TrainConfig fields for every run"})
    epochs: int = field(default=0, metadata={"help": "override TrainConfig.epochs (0: keep)"})
    max_steps: int = field(default=0, metadata={"help": "override TrainConfig.max_steps (0: keep)"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda (training and evaluation)"})
    mc_samples: int = field(default=10, metadata={"help": "Monte-Carlo samples of the evaluation"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples of the confidence interval"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier ablation in --out"})

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in ("acute", "outcome")]
        if bad or not self.tasks:
            raise ValueError(f"tasks must be acute and/or outcome, got {', '.join(self.tasks) or 'none'}")
        if not self.seeds:
            raise ValueError("give at least one seed")


def paired_statistics(differences: np.ndarray, groups: np.ndarray | None = None, *, n_bootstrap: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """Mean, sd and bootstrap 95 % CI of paired differences.

    Args:
        differences: (N,) per-pair differences (fusion - imaging-only).
        groups: (N,) case id of each pair; the bootstrap resamples whole cases (all seeds of a
            case together). None: every pair is its own case.
        n_bootstrap: resamples.
        seed: seed of the resampling.

    Returns:
        {"mean", "sd" (ddof 1; 0 for one pair), "ci_lo", "ci_hi", "n"}; NaN when empty.
    """
    differences = np.asarray(differences, dtype=np.float64)
    keep = np.isfinite(differences)
    differences = differences[keep]
    if differences.size == 0:
        return {"mean": math.nan, "sd": math.nan, "ci_lo": math.nan, "ci_hi": math.nan, "n": 0}
    groups_arr = np.arange(differences.size) if groups is None else np.asarray(groups)[keep]
    unique, inverse = np.unique(groups_arr, return_inverse=True)
    sums = np.bincount(inverse, weights=differences, minlength=unique.size)
    counts = np.bincount(inverse, minlength=unique.size).astype(np.float64)
    if unique.size < 2:  # no spread to resample: the interval is undefined
        return {"mean": float(differences.mean()), "sd": float(differences.std(ddof=1)) if differences.size > 1
                else 0.0, "ci_lo": math.nan, "ci_hi": math.nan, "n": int(differences.size)}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, unique.size, size=(n_bootstrap, unique.size))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    return {
        "mean": float(differences.mean()),
        "sd": float(differences.std(ddof=1)) if differences.size > 1 else 0.0,
        "ci_lo": float(np.percentile(means, 2.5)),
        "ci_hi": float(np.percentile(means, 97.5)),
        "n": int(differences.size),
    }


def _read_rows(path: Path) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["method"] != "model":
                continue
            rows[row["case_id"]] = {k: float(v) if v not in ("", None) else math.nan
                                    for k, v in row.items() if k not in ("dataset", "method", "case_id")}
    return rows


def compare(per_arm: dict[str, dict[int, dict[str, dict[str, float]]]], *, n_bootstrap: int) -> dict:
    """Statistics of one task from ``{arm: {seed: {case: metrics}}}``."""
    result: dict = {}
    for metric, _, _ in ABLATION_METRICS:
        diffs, groups, seed_means, arm_values = [], [], [], {arm: [] for arm, _ in ARMS}
        for seed in sorted(per_arm["fusion"]):
            fusion, imaging = per_arm["fusion"][seed], per_arm["imaging_only"][seed]
            cases = sorted(set(fusion) & set(imaging))
            seed_diffs = [fusion[c][metric] - imaging[c][metric] for c in cases]
            diffs += seed_diffs
            groups += cases
            seed_means.append(float(np.nanmean(seed_diffs)) if seed_diffs else math.nan)
            arm_values["fusion"] += [fusion[c][metric] for c in cases]
            arm_values["imaging_only"] += [imaging[c][metric] for c in cases]
        stats = paired_statistics(np.asarray(diffs), np.asarray(groups), n_bootstrap=n_bootstrap)
        stats["sd_over_seeds"] = float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else math.nan
        stats["fusion_mean"] = float(np.nanmean(arm_values["fusion"])) if diffs else math.nan
        stats["imaging_only_mean"] = float(np.nanmean(arm_values["imaging_only"])) if diffs else math.nan
        result[metric] = stats
    return result


def ablation_markdown(results: dict, seeds: tuple[int, ...]) -> str:
    lines = ["# Ablation: clinical-imaging fusion against imaging only", "",
             f"Same cache, split and training settings; seeds {', '.join(map(str, seeds))}. Difference = fusion "
             "- imaging only, paired per case (and seed); CI: bootstrap over cases, 95 %.", "",
             "| Task | Metric | Fusion | Imaging only | Difference mean ± sd | 95% CI | Pairs | SD over seeds "
             "| Better |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, per_metric in results.items():
        for metric, label, higher_better in ABLATION_METRICS:
            s = per_metric[metric]
            if math.isnan(s["ci_lo"]):
                better = "n/a (fewer than 2 cases)"
            elif s["ci_lo"] > 0 or s["ci_hi"] < 0:
                better = "fusion" if (s["ci_lo"] > 0) == higher_better else "imaging only"
            else:
                better = "no significant difference"
            seeds_sd = "n/a" if math.isnan(s["sd_over_seeds"]) else f"{s['sd_over_seeds']:.3f}"
            lines.append(f"| {task} | {label} | {s['fusion_mean']:.3f} | {s['imaging_only_mean']:.3f} | "
                         f"{s['mean']:+.3f} ± {s['sd']:.3f} | [{s['ci_lo']:+.3f}, {s['ci_hi']:+.3f}] | {s['n']} | "
                         f"{seeds_sd} | {better} |")
    return "\n".join(lines) + "\n"


def run(config: AblateConfig) -> dict:
    """Train, export and evaluate both arms per task and seed; returns the statistics."""
    from Training.evaluate import EvaluateConfig
    from Training.evaluate import run as evaluate_run
    from Training.export import ExportConfig, export
    from Training.train import TrainConfig
    from Training.train import run as train_run

    if config.cache is None or config.out is None or config.data is None:
        raise StrokePredictorError("--cache, --data and --out are required.")
    out = Path(config.out)
    if (out / "ablation.json").exists() and not config.overwrite:
        raise OutputExistsError(f"{out} holds an earlier ablation; pass --overwrite to replace it.")
    split = Path(config.cache) / "split.json"
    if not split.is_file():
        raise StrokePredictorError(f"Cache {config.cache} has no split.json (python -m Training preprocess).")
    base = config_mod.load_file(config.train_config) if config.train_config else {}
    results: dict = {}
    for task in config.tasks:
        per_arm: dict = {arm: {} for arm, _ in ARMS}
        for seed in config.seeds:
            for arm, imaging_only in ARMS:
                name = f"{task}_seed{seed}_{arm}"
                values = {**base, "cache": config.cache, "out": out / "runs" / name, "task": task,
                          "imaging_only": imaging_only, "seed": seed, "device": config.device,
                          "overwrite": config.overwrite}
                if config.epochs:
                    values["epochs"] = config.epochs
                if config.max_steps:
                    values["max_steps"] = config.max_steps
                train_config = config_mod.build(TrainConfig, values, source=f"ablation run {name}")
                logger.info("Training %s", name)
                trained = train_run(train_config)
                bundle = export(ExportConfig(run=trained.run_dir, out=out / "bundles" / name,
                                             overwrite=config.overwrite))
                evaluation = out / "eval" / name
                evaluate_run(EvaluateConfig(bundle=bundle, data=(Path(config.data),), label=(task,), split=split,
                                            subset=config.subset, out=evaluation, task=task,
                                            mc_samples=config.mc_samples, seed=seed, device=config.device,
                                            baseline=False, save_predictions=False, overwrite=config.overwrite,
                                            progress=False))
                per_arm[arm][seed] = _read_rows(evaluation / "per_case.csv")
        results[task] = compare(per_arm, n_bootstrap=config.bootstrap)
    out.mkdir(parents=True, exist_ok=True)
    write_json({"seeds": list(config.seeds), "subset": config.subset, "results": results}, out / "ablation.json",
               overwrite=True)
    markdown = out / "ablation.md"
    markdown.with_suffix(".md.tmp").write_text(ablation_markdown(results, config.seeds))
    markdown.with_suffix(".md.tmp").replace(markdown)
    config_mod.save(config, out / "ablate_config.json")
    return results


def main(argv: list[str]) -> int:
    config = config_mod.parse(AblateConfig, argv, __doc__.split("\n")[0], prog="python -m Training ablate")
    results = run(config)
    for task, per_metric in results.items():
        s = per_metric["dice"]
        logger.info("%s: Dice fusion - imaging only = %+.3f (95%% CI %+.3f to %+.3f, %d pairs)", task, s["mean"],
                    s["ci_lo"], s["ci_hi"], s["n"])
    return 0
