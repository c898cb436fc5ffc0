"""``python -m Training card``: write a bundle's model card (``README.md``) from measured results.

Every number in the card comes from files written by other verbs, never typed by hand:
``summary.json`` and ``per_case.csv`` of ``python -m Training evaluate`` (the bundle, and optionally
its imaging-only twin for the fusion ablation on the same cases), and the bundle's ``model.json``.

    python -m Training card --bundle B --eval EVAL [--ablation-eval EVAL_IMAGING_ONLY] \
        [--other-task-eval EVAL_OTHER --other-task-ablation-eval EVAL_OTHER_IMAGING] [--notes NOTES.md]
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from Training import config as cfg
from Training.evaluation.evaluate import postprocessing_text, size_table

METRICS = (("dice", "Dice"), ("iou", "IoU"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
           ("precision", "Precision"), ("lesion_f1", "Lesion F1"), ("lesion_precision", "Lesion precision"),
           ("abs_volume_diff_ml", "Abs. vol. diff. (mL)"),
           ("abs_lesion_count_diff", "Abs. count diff."), ("hd95_mm", "HD95 (mm)"))


@dataclass(frozen=True)
class CardConfig:
    bundle: Path = field(default=Path("bundle"), metadata={"help": "bundle folder (the card is written into it)"})
    eval: Path = field(default=Path("eval"), metadata={"help": "evaluate output of this bundle"})
    ablation_eval: Path | None = field(default=None, metadata={"help": "evaluate output of the imaging-only twin"})
    other_task_eval: Path | None = field(default=None, metadata={"help": "fusion evaluate output, other task"})
    other_task_ablation_eval: Path | None = field(default=None, metadata={
        "help": "imaging-only evaluate output, other task"})
    notes: Path | None = field(default=None, metadata={"help": "markdown with training data, limits and recipe"})


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _cell(stats: dict) -> str:
    return f"{_fmt(stats['mean'])} ± {_fmt(stats['sd'])} ({_fmt(stats['median'])})"


def metrics_table(summary: dict) -> str:
    """Markdown table: one row per data set and method, mean ± sd (median) per metric."""
    lines = ["| Data set | Method | N | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for name, data in summary["datasets"].items():
        for method, label in (("model", "model"), ("baseline", "classical rule")):
            if method not in data:
                continue
            result = data[method]
            cells = [_cell(result["metrics"][key]) if key in result["metrics"] else "n/a" for key, _ in METRICS]
            lines.append(f"| {name} | {label} | {result['n_cases']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def uncertainty_table(summary: dict) -> str:
    lines = ["| Data set | ECE (per case) | ECE (pooled) | Error-detection AUROC | 95% volume-interval coverage |",
             "|---|---|---|---|---|"]
    for name, data in summary["datasets"].items():
        model = data["model"]
        lines.append(f"| {name} | {_cell(model['metrics']['ece'])} | {_fmt(model['pooled_ece'], 4)} | "
                     f"{_cell(model['metrics']['error_auroc'])} | {_fmt(model['volume_interval_coverage'], 2)} |")
    return "\n".join(lines)


def _per_case(folder: Path, dataset: str) -> dict[str, float]:
    with (folder / "per_case.csv").open(newline="") as handle:
        return {row["case_id"]: float(row["dice"]) for row in csv.DictReader(handle)
                if row["dataset"] == dataset and row["method"] == "model"}


def ablation_row(task: str, fusion: Path, imaging: Path, dataset: str) -> str:
    """Paired per-case Dice difference (fusion - imaging-only) with a bootstrap 95% CI."""
    from Training.evaluation.ablate import paired_statistics

    a, b = _per_case(fusion, dataset), _per_case(imaging, dataset)
    cases = sorted(set(a) & set(b))
    differences = np.array([a[c] - b[c] for c in cases])
    stats = paired_statistics(differences)
    better = int((differences > 0).sum())
    return (f"| {task} | {dataset} | {len(cases)} | {_fmt(float(np.mean([a[c] for c in cases])))} | "
            f"{_fmt(float(np.mean([b[c] for c in cases])))} | {_fmt(stats['mean'])} ± {_fmt(stats['sd'])} | "
            f"[{_fmt(stats['ci_lo'])}, {_fmt(stats['ci_hi'])}] | {better}/{len(cases)} |")


def postprocessing_section(model: dict) -> list[str]:
    """The card's account of the bundle's post-processing (``model.json``, ``postprocessing``)."""
    from StrokePredictorLib.postprocess import PostProcessing

    post = PostProcessing.from_dict(model.get("postprocessing"))
    if "postprocessing" not in model:
        return ["## Post-processing", "", f"None stored in the bundle: {post.describe()}.", ""]
    lines = ["## Post-processing", "",
             f"Stored in `model.json` and applied by every prediction: {post.describe()}. "
             f"Chosen by {post.selected_on or 'an unrecorded procedure'}; never on the test split, the "
             "out-of-distribution set or the real case. The metrics below include it.", ""]
    if "growth_seed" in model:
        seed = PostProcessing.from_dict(model["growth_seed"])
        lines += [f"The growth seeds from the core the acute model reports (`growth_seed`): the core head's "
                  f"Monte-Carlo mean under {seed.describe()} ({seed.selected_on or 'origin unrecorded'})"
                  + ("; the outcome is the grown core alone (`growth_alone`: no Monte-Carlo spread of its own, "
                     "the volume interval is the conformal margin)"
                     if model.get("architecture", {}).get("config", {}).get("growth_alone") else "") + ".", ""]
    return lines


def build(config: CardConfig) -> str:
    model = json.loads((Path(config.bundle) / "model.json").read_text())
    summary = json.loads((Path(config.eval) / "summary.json").read_text())
    first_dataset = next(iter(summary["datasets"]))
    architecture = model["architecture"]
    kind = ("imaging only" if architecture["config"]["imaging_only"] else "multimodal: 3D ResNet-18 encoder, one "
            "token per clinical feature, bidirectional cross-attention, U-Net decoder")
    lines = [
        f"# Model card: `{model['name']}` ({model['task']} task)",
        "",
        f"- weights: `weights.safetensors`, sha256 `{model['weights']['sha256']}` "
        f"({model['weights']['bytes'] / 1e6:.1f} MB, {architecture['parameters'] / 1e6:.2f} M parameters)",
        f"- architecture: `{architecture['class']}` ({kind}), "
        f"model grid {' x '.join(map(str, model['grid']['size']))} voxels at "
        f"{model['grid']['spacing'][0]:g} mm, Monte-Carlo dropout p = {architecture['config']['mc_dropout']}",
        f"- inputs: {', '.join(model['inputs']['required'])} (required), {', '.join(model['inputs']['optional'])} "
        f"(optional), clinical schema {model['clinical_schema_version']} (every feature may be missing)",
        f"- library version {model['library_version']}, trained with torch {model['torch_version']}",
        "",
        "## Intended use",
        "",
        "Research on acute ischemic stroke lesion segmentation and clinical-imaging fusion. **Not a medical "
        "device and not for clinical decisions**; not validated on real patients.",
        "",
    ]
    if config.notes is not None:
        lines += [Path(config.notes).read_text().strip(), ""]
    lines += postprocessing_section(model)
    lines += [
        "## Test-split metrics",
        "",
        f"Measured with `python -m Training evaluate` ({summary['mc_samples']} MC samples, "
        f"{postprocessing_text(summary)}, device {summary['device']}): mean ± sd (median) over cases, end to end "
        "from the files (outputs on the DWI grid). Dice and lesion F1 are 1 when both masks are empty (ISLES 2022); "
        "HD95 is left out where exactly one mask is empty. The classical rule is ADC < 0.62 x 10^-3 mm^2/s and DWI "
        "robust z > 2 inside the brain.",
        "",
        metrics_table(summary),
        "",
        "Sanity flags (`python -m Training evaluate`: volumes over 10x the truth, lesion F1 far above Dice, volume "
        "intervals beyond a whole brain): " + ("; ".join(summary.get("sanity_flags", [])) or "none") + ".",
        "",
        "### By lesion size",
        "",
        "Dice of the cases grouped by their total lesion volume (cases without lesion left out); lesion-wise F1 "
        "and precision pooled over the cases per lesion-size bin (a true lesion in the bin of its own volume, an "
        "unmatched predicted component as a false positive in the bin of its own volume); the false-positive "
        "volume per case is the mL of predicted components that touch no true lesion.",
        "",
        size_table(summary),
        "",
        "### Uncertainty",
        "",
        uncertainty_table(summary),
        "",
        "## Fusion ablation",
        "",
        "The clinical-imaging fusion model against its imaging-only twin (same architecture without the clinical "
        "tokens), trained in lockstep on the same synthesised batches for the same steps, evaluated on the same "
        "cases. Paired per-case Dice differences (fusion - imaging-only), bootstrap 95% CI over cases.",
        "",
        "| Task | Data set | N | Dice fusion | Dice imaging-only | Difference (mean ± sd) | 95% CI "
        "| Cases where fusion is better |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if config.ablation_eval is not None:
        lines.append(ablation_row(model["task"], Path(config.eval), Path(config.ablation_eval), first_dataset))
    if config.other_task_eval is not None and config.other_task_ablation_eval is not None:
        other = json.loads((Path(config.other_task_eval) / "summary.json").read_text())
        lines.append(ablation_row(other["task"], Path(config.other_task_eval), Path(config.other_task_ablation_eval),
                                  next(iter(other["datasets"]))))
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from StrokePredictorLib.io import atomic_path

    config = cfg.parse(CardConfig, argv, "Write a bundle's model card from measured results.",
                       prog="python -m Training card")
    text = build(config)
    with atomic_path(Path(config.bundle) / "README.md", overwrite=True) as temporary:
        temporary.write_text(text)
    print(f"wrote {Path(config.bundle) / 'README.md'}")
    return 0
