"""``python -m Training select``: choose an outcome run's checkpoint on validation checks.

    python -m Training select --run RUN/outcome --data data/val_phys \\
        --effect-cases sub-strokecase0012,sub-strokecase0006 --postprocessing-from BUNDLE --out SEL

The validation Dice that ``train-synth`` keeps ``best.pt`` by does not see what an outcome model is
for: the predicted final infarct must grow with onset time and without treatment, and onset,
treatment and NIHSS must move it most. Training the growth head longer can trade one for the other
(outcome model card, runs g13-g15), so a run keeps its state every ``--snapshot-every`` steps and
this command scores each kept checkpoint (``checkpoints/step_*.pt`` and ``last.pt``) on a
*validation* folder written by ``python -m Training generate`` (never the test set), by the checks
of ``python -m Training behaviour``:

* **growth**: the cases whose simulated final infarct grows by ``--min-simulated-growth`` (1.5x)
  or more between thrombectomy at 1 h and no treatment at 20 h, and how many of them the
  checkpoint's predicted volume grows by less than ``--min-growth`` (1.3x); a case it does not
  segment in either scenario is one of those misses, also counted as ``undetected``;
* **effects**: ``effects_top3`` (``--points`` per numeric feature) on each ``--effect-cases`` case;
* **Dice**: mean Dice on the folder (``evaluate``, ``--mc-samples`` dropout samples, the
  post-processing block of ``--postprocessing-from``).

Rule, fixed before any score is seen: a checkpoint is eligible when at most ``--max-growth-misses``
growing cases miss ``--min-growth`` and ``effects_top3`` passes on every effect case; the candidate
is the eligible checkpoint with the largest Dice (ties: the later step). An imaging-only run (the
paired ablation's twin, ``outcome-imaging``) has no clinical input, so neither check applies to it:
every checkpoint is eligible, the candidate is the largest Dice, and ``--effect-cases`` is refused.
Each checkpoint is exported to ``OUT/bundles/<checkpoint>`` (the candidate is one of them);
``OUT/selection.json`` and ``OUT/selection.md`` hold every score. Exit status 0 with a candidate, 1
when no checkpoint is eligible, 2 on bad input.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib.errors import OutputExistsError, StrokePredictorError
from StrokePredictorLib.io import write_json
from Training import config as config_mod

logger = logging.getLogger(__name__)

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


@dataclass(frozen=True)
class SelectConfig:
    """Options of ``python -m Training select``."""

    run: Path | None = field(default=None, metadata={
        "help": "a variant's run folder of train-synth (checkpoints/step_*.pt and last.pt; required)"})
    data: Path | None = field(default=None, metadata={
        "help": "a VALIDATION folder written by python -m Training generate (required)"})
    effect_cases: tuple[str, ...] = field(default=(), metadata={
        "help": "case ids of --data on which effects_top3 must pass (required, except for an imaging-only run; "
                "choose them before the run)"})
    postprocessing_from: Path | None = field(default=None, metadata={
        "help": "bundle whose post-processing block every exported checkpoint gets (default: none, the "
                "network's own 0.5 threshold)"})
    out: Path | None = field(default=None, metadata={"help": "output folder (required)"})
    name: str = field(default="", metadata={"help": "bundle name of the exports (default: the run folder's name)"})
    max_growth_misses: int = field(default=1, metadata={
        "help": "eligible: at most this many growing cases below --min-growth"})
    min_growth: float = field(default=1.3, metadata={"help": "predicted none 20 h / thrombectomy 1 h, at least"})
    min_simulated_growth: float = field(default=1.5, metadata={
        "help": "a case counts as growing when its simulated infarct grows at least this much"})
    points: int = field(default=3, metadata={"help": "values per numeric feature in the effect sweeps"})
    mc_samples: int = field(default=20, metadata={"help": "Monte-Carlo dropout samples of the Dice evaluation"})
    include_last: bool = field(default=True, metadata={"help": "score last.pt too (unless a snapshot is its step)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier selection in --out"})

    def __post_init__(self) -> None:
        if self.max_growth_misses < 0 or self.min_growth <= 0 or self.min_simulated_growth <= 0:
            raise ValueError("max_growth_misses must be >= 0, min_growth and min_simulated_growth > 0")
        if not 2 <= self.points <= 50 or self.mc_samples < 1:
            raise ValueError("points must lie between 2 and 50 and mc_samples be >= 1")


def checkpoints_of(run: Path, include_last: bool = True) -> list[tuple[str, int, Path]]:
    """``(name, step, path)`` of a run's kept checkpoints in step order: every ``step_*.pt`` and,
    with ``include_last``, ``last.pt`` unless a snapshot holds the same step."""
    from Training.training.loop import load_checkpoint

    folder = Path(run) / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := STEP_FILE.match(p.name)))
    chosen = [(p.stem, step, p) for step, p in found]
    last = folder / "last.pt"
    if include_last and last.is_file():
        step = int(load_checkpoint(last)["step"])
        if step not in {s for _, s, _ in chosen}:
            chosen.append(("last", step, last))
    return chosen


def decide(rows: list[dict], max_growth_misses: int) -> dict | None:
    """The rule (module docstring): marks each row ``eligible`` and returns the candidate row, or None."""
    for row in rows:
        row["eligible"] = row.get("imaging_only", False) or (
            row["growth_misses"] <= max_growth_misses and all(row["effects_pass"].values()))
    eligible = [row for row in rows if row["eligible"]]
    return max(eligible, key=lambda row: (row["dice"], row["step"])) if eligible else None


def effect_inputs(folder: Path, case_ids: tuple[str, ...]) -> dict[str, tuple[dict[str, Path], object]]:
    """Image paths and clinical record of each effect case of ``folder`` (read once for every checkpoint).

    Raises:
        StrokePredictorError: a case that is not in ``folder``.
    """
    from StrokePredictorLib.clinical import ClinicalRecord, read_csv
    from Training.synthesis.generate import case_paths

    records = read_csv(folder / "clinical.csv")
    inputs = {}
    for case_id in case_ids:
        paths = case_paths(folder, case_id)
        if not paths["dwi"].is_file():
            raise StrokePredictorError(f"--effect-cases: {case_id} is not a case of {folder} ({paths['dwi']} "
                                       "missing).")
        inputs[case_id] = (paths, records.get(case_id, ClinicalRecord()))
    return inputs


def score(bundle: Path, config: SelectConfig, work: Path,
          effect_cases: dict[str, tuple[dict[str, Path], object]], imaging_only: bool = False) -> dict:
    """Growth misses, effect checks (on :func:`effect_inputs`) and Dice of one exported bundle on
    ``config.data``; for an ``imaging_only`` bundle the Dice alone (the checks need clinical input)."""
    from StrokePredictorLib.inference import Predictor
    from Training.evaluation import clinical_behaviour as behaviour

    if imaging_only:
        return {"imaging_only": True, "growing_cases": None, "growth_misses": None, "undetected": None,
                "growth_median": None,
                "growth_ratios": {}, "effects_pass": {}, "effects": {}, "dice": _dice(bundle, config, work)}
    cases, _, _, _ = behaviour.dataset_cases(bundle, config.data)
    growth = behaviour.check_simulated_growth(cases, "outcome", min_simulated_growth=config.min_simulated_growth,
                                              min_growth=config.min_growth)[0]
    ratios = [row["ratio"] for row in growth.volumes.values()]
    predictor = Predictor(bundle, device="cpu", mc_samples=1, deterministic=True)
    effects, effects_top = {}, {}
    for case_id, (paths, base) in effect_cases.items():
        volume, _, _ = behaviour.bundle_volume_function(
            predictor, paths["dwi"], paths["adc"], paths["flair"] if paths["flair"].is_file() else None, base)
        check = behaviour.effects_check(volume, base, config.points)
        effects[case_id] = bool(check.passed)
        effects_top[case_id] = check.detail
    return {"growing_cases": len(ratios), "growth_misses": sum(r < config.min_growth for r in ratios),
            "undetected": sum(bool(row.get("undetected")) for row in growth.volumes.values()),
            "growth_median": round(float(np.median(ratios)), 3) if ratios else None,
            "growth_ratios": growth.volumes,
            "effects_pass": effects, "effects": effects_top, "dice": _dice(bundle, config, work)}


def _dice(bundle: Path, config: SelectConfig, work: Path) -> float:
    """Mean Dice of ``bundle`` on ``config.data`` (``evaluate``, ``config.mc_samples`` dropout samples)."""
    from Training.evaluation.evaluate import EvaluateConfig
    from Training.evaluation.evaluate import run as evaluate

    summary = evaluate(EvaluateConfig(bundle=bundle, data=(Path(config.data),), label=("validation",), out=work,
                                      mc_samples=config.mc_samples, device="cpu", baseline=False,
                                      save_predictions=False, progress=False, overwrite=True))
    return round(float(summary["datasets"]["validation"]["model"]["metrics"]["dice"]["mean"]), 4)


def _markdown(rows: list[dict], chosen: dict | None, config: SelectConfig) -> str:
    imaging_only = any(row.get("imaging_only") for row in rows)
    rule = ("An imaging-only run: the growth and effect checks need clinical input and do not apply; "
            "candidate: the largest Dice." if imaging_only else
            f"Eligible: at most {config.max_growth_misses} growing case(s) below {config.min_growth}x and "
            f"effects_top3 on {', '.join(config.effect_cases)}; candidate: the largest Dice.")
    lines = [f"# Checkpoint selection: {config.run} on {config.data}", "", rule, "",
             "| checkpoint | step | growth misses | median growth | effects_top3 | Dice | eligible |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        effects = ", ".join("pass" if ok else "FAIL" for ok in row["effects_pass"].values()) or "n/a"
        eligible = "yes" if row["eligible"] else "no"
        undetected = f" ({row['undetected']} undetected)" if row.get("undetected") else ""
        growth = (f"{row['growth_misses']}/{row['growing_cases']}{undetected} | {row['growth_median']}x"
                  if row["growing_cases"] is not None else "n/a | n/a")
        lines.append(f"| {row['checkpoint']} | {row['step']} | {growth} | {effects} | {row['dice']:.3f} | "
                     f"{eligible} |")
    lines += ["", f"Candidate: {chosen['checkpoint']} (step {chosen['step']})." if chosen else
              "No checkpoint is eligible: no candidate."]
    return "\n".join(lines) + "\n"


def run(config: SelectConfig) -> dict:
    """Export and score every kept checkpoint, apply the rule; returns the report (also written)."""
    from StrokePredictorLib.bundle import read_metadata
    from Training.evaluation.postprocess import write_into_bundle
    from Training.training.export import ExportConfig, export
    from Training.training.loop import load_checkpoint

    if config.run is None or config.data is None or config.out is None:
        raise StrokePredictorError("--run, --data and --out are required.")
    if not (Path(config.data) / "dataset.json").is_file():
        raise StrokePredictorError(f"--data {config.data}: not a folder written by 'python -m Training generate'.")
    checkpoints = checkpoints_of(Path(config.run), config.include_last)
    if not checkpoints:
        raise StrokePredictorError(f"--run {config.run}: no checkpoints/step_*.pt or last.pt (train with "
                                   "--snapshot-every).")
    imaging_only = bool(load_checkpoint(checkpoints[0][2])["network"].get("imaging_only", False))
    if imaging_only and config.effect_cases:
        raise StrokePredictorError(f"--run {config.run} is an imaging-only run: it has no clinical input, so "
                                   "--effect-cases does not apply (its candidate is the largest Dice).")
    if not imaging_only and not config.effect_cases:
        raise StrokePredictorError("--effect-cases is required (case ids of --data; choose them before the run).")
    effect_cases = effect_inputs(Path(config.data), config.effect_cases)
    out = Path(config.out)
    if (out / "selection.json").exists() and not config.overwrite:
        raise OutputExistsError(f"{out / 'selection.json'} exists; pass --overwrite to select again.")
    post = None
    if config.postprocessing_from is not None:
        from StrokePredictorLib.postprocess import PostProcessing

        block = read_metadata(Path(config.postprocessing_from) / "model.json").get("postprocessing")
        post = PostProcessing.from_dict(block) if block else None
    rows = []
    for name, step, path in checkpoints:
        bundle = out / "bundles" / name
        if bundle.exists():
            shutil.rmtree(bundle)
        export(ExportConfig(run=Path(config.run), out=bundle, name=config.name or Path(config.run).name,
                            checkpoint=str(path.resolve())))
        if post is not None:
            write_into_bundle(bundle, post)
        row = {"checkpoint": name, "step": step, "bundle": str(bundle),
               **score(bundle, config, out / "evaluate" / name, effect_cases, imaging_only)}
        logger.info("%s (step %d): growth misses %s/%s, effects %s, Dice %.3f", name, step, row["growth_misses"],
                    row["growing_cases"], row["effects_pass"] or "n/a", row["dice"])
        rows.append(row)
    chosen = decide(rows, config.max_growth_misses)
    report = {"run": str(config.run), "data": str(config.data), "settings": config_mod.to_dict(config),
              "checkpoints": rows, "candidate": chosen["checkpoint"] if chosen else None,
              "candidate_bundle": chosen["bundle"] if chosen else None}
    write_json(report, out / "selection.json", overwrite=True)
    (out / "selection.md.tmp").write_text(_markdown(rows, chosen, config))
    (out / "selection.md.tmp").replace(out / "selection.md")
    return report


def main(argv: list[str]) -> int:
    config = config_mod.parse(SelectConfig, argv, __doc__.split("\n")[0], prog="python -m Training select")
    report = run(config)
    print((Path(config.out) / "selection.md").read_text())  # type: ignore[arg-type]
    print(json.dumps({"candidate": report["candidate"], "bundle": report["candidate_bundle"]}))
    return 0 if report["candidate"] else 1
