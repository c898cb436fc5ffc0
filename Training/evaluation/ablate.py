"""``python -m Training ablate``: imaging-only against clinical-imaging fusion on the same split.

For each task (acute, outcome) and each seed, the network is trained twice on the same cache
and split (:func:`Training.training.train.run` with ``imaging_only`` False and True, everything else
equal), each best checkpoint is exported as a bundle, and both bundles are evaluated end to end
on the same test cases of the raw data (:func:`Training.evaluation.evaluate.run`). The effect of the
clinical features is the paired per-case difference fusion - imaging-only of each metric: mean
+- sd over the (case, seed) pairs, a bootstrap 95 % confidence interval (cases resampled with
replacement), and, with several seeds, the sd of the per-seed mean differences. A difference
whose interval includes 0 (at the three decimals shown) is reported as "no difference"; every
figure stands beside the number of training steps per arm and of evaluated cases. Sanity flags
name what makes a comparison unreliable: too few steps or cases, neither arm learning, lesion F1
far above Dice (one blob touching every lesion), predicted volumes an order of magnitude above the
truth.

Before any training, every task is checked to have targets in the cache (training cases and
evaluated cases); ISLES 2022 has acute lesion masks only, so ``--tasks outcome`` is refused there
up front.

Already trained twins (``--bundles FUSION,IMAGING_ONLY``, e.g. the ``outcome`` and ``outcome-imaging``
variants that ``train-synth`` trains in lockstep on the same batches): no training; both bundles are
evaluated on every case of ``--data`` (a folder with ground truth, no split) and compared the same
way, with the steps each bundle's checkpoint was trained for.

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
# Sanity thresholds of the report (see :func:`sanity_flags`).
MIN_STEPS = 500  # optimiser steps per arm below which a difference mostly reflects the initialisation
MIN_CASES = 10  # evaluated cases below which a bootstrap interval over cases is not trustworthy
F1_ABOVE_DICE = 0.3  # mean lesion F1 - mean Dice above this: lesion-wise F1 is being gamed by blobs
VOLUME_RATIO = 10.0  # (mean predicted mL + 1) / (mean true mL + 1) above this is implausible
NOT_LEARNT_DICE = 0.05  # mean Dice of both arms below this: neither model has learnt the task
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
    bundles: tuple[Path, ...] = field(default=(), metadata={
        "help": "compare two trained bundles instead of training: FUSION,IMAGING_ONLY (same task); --data is then "
                "the evaluated folder (ground truth, no split)"})

    def __post_init__(self) -> None:
        if self.bundles and len(self.bundles) != 2:
            raise ValueError(f"--bundles takes two bundle folders (fusion, imaging only), got {len(self.bundles)}")
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


def verdict(stats: dict, higher_better: bool, digits: int = 3) -> str:
    """"fusion", "imaging only", "no difference" (the 95 % interval includes 0, at the ``digits``
    shown) or "n/a" (no interval: fewer than two cases)."""
    lo, hi = stats["ci_lo"], stats["ci_hi"]
    if math.isnan(lo) or math.isnan(hi):
        return "n/a (fewer than 2 cases)"
    lo, hi = round(lo, digits), round(hi, digits)
    if lo <= 0.0 <= hi:
        return "no difference"
    return "fusion" if (lo > 0) == higher_better else "imaging only"


def sanity_flags(task_result: dict) -> list[str]:
    """What makes one task's comparison unreliable, in words (empty: nothing found).

    Args:
        task_result: one task of :func:`compare` with ``steps`` ({arm: steps per seed}) and
            ``n_cases`` added by :func:`run`.
    """
    flags = []
    steps = [s for per_seed in task_result.get("steps", {}).values() for s in per_seed.values()]
    if steps and min(steps) < MIN_STEPS:
        started = {arm: origin for arm, origin in (task_result.get("initialised_from") or {}).items() if origin}
        if started:  # fine-tuned from trained weights: the steps count after those
            origins = "; ".join(f"{arm.replace('_', ' ')}: {o.get('bundle')} (sha256 {str(o.get('sha256'))[:12]}, "
                                f"step {o.get('step')})" for arm, o in started.items())
            flags.append(f"only {min(steps)} training steps per arm (fewer than {MIN_STEPS}) since the weights "
                         f"they started from ({origins}): the difference reflects those weights as much as "
                         "this training")
        else:
            flags.append(f"only {min(steps)} training steps per arm (fewer than {MIN_STEPS}): a difference mostly "
                         "reflects the initialisation, not the clinical features")
    n_cases = task_result.get("n_cases", 0)
    if n_cases < MIN_CASES:
        flags.append(f"only {n_cases} evaluated case(s) (fewer than {MIN_CASES}): the bootstrap interval over "
                     "cases is not trustworthy")
    dice, f1 = task_result["dice"], task_result["lesion_f1"]
    if max(dice["fusion_mean"], dice["imaging_only_mean"]) < NOT_LEARNT_DICE:
        flags.append(f"neither arm has learnt the task (mean Dice {dice['fusion_mean']:.3f} and "
                     f"{dice['imaging_only_mean']:.3f}): the comparison is between two failures")
    for arm, label in (("fusion", "fusion"), ("imaging_only", "imaging only")):
        gap = f1[f"{arm}_mean"] - dice[f"{arm}_mean"]
        if gap > F1_ABOVE_DICE:
            flags.append(f"{label}: lesion F1 {f1[f'{arm}_mean']:.3f} far above Dice {dice[f'{arm}_mean']:.3f} "
                         "(a few large components touching every lesion count as found)")
        volumes = task_result.get("volumes_ml", {}).get(arm)
        if volumes and (volumes["pred"] + 1.0) / (volumes["true"] + 1.0) > VOLUME_RATIO:
            flags.append(f"{label}: mean predicted volume {volumes['pred']:.1f} mL against {volumes['true']:.1f} mL "
                         "true, an order of magnitude too large (implausible)")
    return flags


def _steps_text(task_result: dict) -> str:
    steps = sorted({s for per_seed in task_result.get("steps", {}).values() for s in per_seed.values()})
    return "/".join(map(str, steps)) if steps else "n/a"


def ablation_markdown(results: dict, seeds: tuple[int, ...], source: str = "") -> str:
    source = source or f"Same cache, split and training settings; seeds {', '.join(map(str, seeds))}."
    lines = ["# Ablation: clinical-imaging fusion against imaging only", "",
             f"{source} Difference = fusion "
             "- imaging only, paired per case (and seed); CI: bootstrap over cases, 95 %. \"No difference\": the "
             "interval includes 0. Steps: optimiser steps per arm and seed; cases: evaluated cases per arm.", "",
             "| Task | Metric | Steps per arm | Cases | Fusion | Imaging only | Difference mean ± sd | 95% CI "
             "| Pairs | SD over seeds | Verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, per_metric in results.items():
        steps, cases = _steps_text(per_metric), per_metric.get("n_cases", "n/a")
        for metric, label, higher_better in ABLATION_METRICS:
            s = per_metric[metric]
            seeds_sd = "n/a" if math.isnan(s["sd_over_seeds"]) else f"{s['sd_over_seeds']:.3f}"
            lines.append(f"| {task} | {label} | {steps} | {cases} | {s['fusion_mean']:.3f} | "
                         f"{s['imaging_only_mean']:.3f} | {s['mean']:+.3f} ± {s['sd']:.3f} | "
                         f"[{s['ci_lo']:+.3f}, {s['ci_hi']:+.3f}] | {s['n']} | {seeds_sd} | "
                         f"{verdict(s, higher_better)} |")
    flagged = {task: per_metric.get("flags", []) for task, per_metric in results.items()}
    lines += ["", "## Sanity flags", ""]
    if any(flagged.values()):
        for task, flags in flagged.items():
            lines += [f"- **{task}**: {flag}." for flag in flags]
        lines += ["", "A flagged comparison says nothing about the clinical features either way."]
    else:
        lines.append("None: enough steps and cases, both arms learnt, plausible volumes, lesion F1 in line with Dice.")
    return "\n".join(lines) + "\n"


def check_targets(config: AblateConfig) -> dict[str, dict[str, int]]:
    """Before any training: every task has training cases and evaluated cases with its target.

    Returns:
        {task: {"train": n, "val": n, <subset>: n}} case counts with the task's target.

    Raises:
        StrokePredictorError: a task without targets (named, with the counts and a fix).
    """
    from Training.data.dataset import task_cases

    counts: dict[str, dict[str, int]] = {}
    missing = []
    for task in config.tasks:
        counts[task] = {split: len(task_cases(config.cache, split, task)) for split in ("train", "val", config.subset)}
        if not counts[task]["train"] or not counts[task][config.subset]:
            missing.append(task)
    if missing:
        having = [t for t in config.tasks if t not in missing]
        details = "; ".join(f"'{t}': {counts[t]['train']} training and {counts[t][config.subset]} {config.subset} "
                            f"case(s) with that target" for t in missing)
        hint = (f" Run with --tasks {','.join(having)}." if having else
                " Outcome targets are *_outcome.nii.gz masks beside *_msk.nii.gz; ISLES 2022 has acute masks only.")
        raise StrokePredictorError(f"Cannot ablate: the cache {config.cache} has no targets for {details} "
                                   f"(ISLES 2022 ships acute lesion masks only, no outcome masks).{hint}")
    return counts


def _volumes(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, float]:
    pred = [m.get("volume_pred_ml", math.nan) for cases in per_seed.values() for m in cases.values()]
    true = [m.get("volume_true_ml", math.nan) for cases in per_seed.values() for m in cases.values()]
    return {"pred": float(np.nanmean(pred)) if pred else math.nan,
            "true": float(np.nanmean(true)) if true else math.nan}


def run(config: AblateConfig) -> dict:
    """Train, export and evaluate both arms per task and seed; returns the statistics."""
    from Training.evaluation.evaluate import EvaluateConfig
    from Training.evaluation.evaluate import run as evaluate_run
    from Training.training.export import ExportConfig, export
    from Training.training.train import TrainConfig
    from Training.training.train import run as train_run

    if config.bundles:
        return run_bundles(config)
    if config.cache is None or config.out is None or config.data is None:
        raise StrokePredictorError("--cache, --data and --out are required.")
    out = Path(config.out)
    if (out / "ablation.json").exists() and not config.overwrite:
        raise OutputExistsError(f"{out} holds an earlier ablation; pass --overwrite to replace it.")
    split = Path(config.cache) / "split.json"
    if not split.is_file():
        raise StrokePredictorError(f"Cache {config.cache} has no split.json (python -m Training preprocess).")
    if not Path(config.data).is_dir():
        raise StrokePredictorError(f"--data {config.data} is not a folder (the raw ISLES-layout data of the cache).")
    counts = check_targets(config)
    base = config_mod.load_file(config.train_config) if config.train_config else {}
    results: dict = {}
    for task in config.tasks:
        logger.info("%s: %d training, %d validation and %d %s case(s) with targets.", task, counts[task]["train"],
                    counts[task]["val"], counts[task][config.subset], config.subset)
        per_arm: dict = {arm: {} for arm, _ in ARMS}
        steps: dict = {arm: {} for arm, _ in ARMS}
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
                steps[arm][seed] = int(trained.steps)
                bundle = export(ExportConfig(run=trained.run_dir, out=out / "bundles" / name,
                                             overwrite=config.overwrite))
                evaluation = out / "eval" / name
                evaluate_run(EvaluateConfig(bundle=bundle, data=(Path(config.data),), label=(task,), split=split,
                                            subset=config.subset, out=evaluation, task=task,
                                            mc_samples=config.mc_samples, seed=seed, device=config.device,
                                            baseline=False, save_predictions=False, overwrite=config.overwrite,
                                            progress=False))
                per_arm[arm][seed] = _read_rows(evaluation / "per_case.csv")
        results[task] = _task_result(per_arm, steps, config.bootstrap)
    return _write(config, out, results, config.seeds)


def _task_result(per_arm: dict, steps: dict, n_bootstrap: int, initialised_from: dict | None = None) -> dict:
    """One task's comparison, its sanity flags and verdicts; ``initialised_from`` ({arm: the weights a
    fine-tuned bundle started from, or None}) goes in before the flags, which name those weights."""
    result = compare(per_arm, n_bootstrap=n_bootstrap)
    result["steps"] = steps
    if initialised_from is not None:
        result["initialised_from"] = initialised_from
    result["n_cases"] = len(set.intersection(*(set(cases) for arm in per_arm.values() for cases in arm.values())))
    result["volumes_ml"] = {arm: _volumes(per_arm[arm]) for arm, _ in ARMS}
    result["flags"] = sanity_flags(result)
    for metric, _, higher_better in ABLATION_METRICS:
        result[metric]["verdict"] = verdict(result[metric], higher_better)
    return result


def _write(config: AblateConfig, out: Path, results: dict, seeds: tuple[int, ...]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    write_json({"seeds": list(seeds), "subset": config.subset if not config.bundles else "all of --data",
                "bundles": [str(b) for b in config.bundles], "results": results}, out / "ablation.json", overwrite=True)
    markdown = out / "ablation.md"
    source = (f"Trained bundles {config.bundles[0]} (fusion) and {config.bundles[1]} (imaging only), every case of "
              f"{config.data}." if config.bundles else "")
    markdown.with_suffix(".md.tmp").write_text(ablation_markdown(results, seeds, source))
    markdown.with_suffix(".md.tmp").replace(markdown)
    config_mod.save(config, out / "ablate_config.json")
    return results


def _bundle_facts(bundle: Path) -> tuple[str, bool, int, dict | None]:
    """A bundle's task, whether it is imaging-only (or clinically blind), the training steps of its checkpoint and the
    weights it started from (``data.initialised_from``, or None) (from its validated ``model.json``;
    the weights are read when the bundle is evaluated)."""
    from StrokePredictorLib.bundle import read_metadata

    metadata = read_metadata(Path(bundle) / "model.json")
    network = metadata.get("architecture", {}).get("config", {})
    # a clinically blind twin (the fusion network's weights with every clinical value missing) sees no clinical data
    imaging_only = bool(network.get("imaging_only", False) or network.get("clinical_blind", False))
    data = metadata.get("data", {})
    step = data.get("training", {}).get("step")
    return (str(metadata.get("task")), imaging_only, int(step) if isinstance(step, (int, float)) else 0,
            data.get("initialised_from"))


def run_bundles(config: AblateConfig) -> dict:
    """Evaluate two trained bundles (fusion, imaging only) on ``--data`` and compare them per case."""
    from Training.evaluation.evaluate import EvaluateConfig
    from Training.evaluation.evaluate import run as evaluate_run

    if config.out is None or config.data is None:
        raise StrokePredictorError("--bundles needs --data (the evaluated folder, with ground truth) and --out.")
    out = Path(config.out)
    if (out / "ablation.json").exists() and not config.overwrite:
        raise OutputExistsError(f"{out} holds an earlier ablation; pass --overwrite to replace it.")
    if not Path(config.data).is_dir():
        raise StrokePredictorError(f"--data {config.data} is not a folder.")
    facts = {arm: _bundle_facts(bundle) for (arm, _), bundle in zip(ARMS, config.bundles, strict=True)}
    tasks = {task for task, _, _, _ in facts.values()}
    if len(tasks) != 1:
        raise StrokePredictorError(f"--bundles: the two bundles have different tasks ({', '.join(sorted(tasks))}).")
    if facts["fusion"][1] or not facts["imaging_only"][1]:
        raise StrokePredictorError("--bundles: give the fusion bundle first and the imaging-only (or clinically "
                                   f"blind) bundle second (without clinical input: {facts['fusion'][1]}, "
                                   f"{facts['imaging_only'][1]}).")
    task = tasks.pop()
    per_arm: dict = {arm: {} for arm, _ in ARMS}
    steps: dict = {arm: {0: facts[arm][2]} for arm, _ in ARMS}
    for (arm, _), bundle in zip(ARMS, config.bundles, strict=True):
        evaluation = out / "eval" / f"{task}_{arm}"
        evaluate_run(EvaluateConfig(bundle=Path(bundle), data=(Path(config.data),), label=(task,), split=None,
                                    out=evaluation, task=task, mc_samples=config.mc_samples, seed=0,
                                    device=config.device, baseline=False, save_predictions=False,
                                    overwrite=config.overwrite, progress=False))
        per_arm[arm][0] = _read_rows(evaluation / "per_case.csv")
    result = _task_result(per_arm, steps, config.bootstrap,
                          initialised_from={arm: facts[arm][3] for arm, _ in ARMS})
    return _write(config, out, {task: result}, (0,))


def main(argv: list[str]) -> int:
    config = config_mod.parse(AblateConfig, argv, __doc__.split("\n")[0], prog="python -m Training ablate")
    results = run(config)
    for task, per_metric in results.items():
        s = per_metric["dice"]
        logger.info("%s: Dice fusion - imaging only = %+.3f (95%% CI %+.3f to %+.3f; %s; %d pairs, %s cases, "
                    "%s steps per arm)", task, s["mean"], s["ci_lo"], s["ci_hi"], verdict(s, True), s["n"],
                    per_metric["n_cases"], _steps_text(per_metric))
        for flag in per_metric["flags"]:
            logger.warning("%s: %s.", task, flag)
    return 0
