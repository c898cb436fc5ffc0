"""``python -m Training campaign``: improve the shipped acute bundle run after run, on the CPU by default.

One command does one run of the campaign; every stage writes into ``--out`` and is skipped when its
result is already there, so an interrupted run continues where it stopped (training resumes from its
time-stamped checkpoint):

1. **train**: ``train-synth`` from the shipped bundle (or from ``--init``, e.g. an earlier run's candidate) on
   the CPU recipe: the pre-rendered, background-refreshed pool of domain-randomised volumes with real-scan mimics,
   embolic showers and small lesions (:mod:`Training.synthesis.pool`, :mod:`Training.synthesis.mimics`),
   lesion-centred 64^3 patches (``--patch``, ``--batch-size``; the model grid trains on whole volumes), bf16
   where the CPU has it natively (fp32 elsewhere), for ``--minutes`` of wall time;
2. **export** the best checkpoint (whole-volume Dice on synthetic held-out validation lesions);
3. **search** the post-processing of the candidate and of a copy of the shipped bundle with the same
   ``python -m Training postprocess`` on the same fixed validation sets (``--val``), each bundle
   getting its own best setting;
4. **decide** by the rule below and write ``decision.json``; with ``--ship`` a winning candidate
   replaces the shipped bundle's weights and ``model.json`` (its model card stays and gains the row);
5. **record** the run in the bundle's ``campaign.json`` ledger (every run, shipped or not, with its
   steps, wall time and the cumulative compute) and in the model card's campaign table.

Rule (fixed before the first run's results were seen; change it only between runs, in a commit):
the candidate ships when, on the fixed validation sets, with each bundle's own searched
post-processing,

a. its search score (:mod:`Training.evaluation.postprocess`, rule 3) is at least the shipped bundle's + 0.01;
b. its mean Dice over the sets is at least the shipped bundle's - 0.01 (no trading overlap for counts);
c. its lesion-wise F1 on lesions under 1 mL, pooled, is at least the shipped bundle's - 0.02, each measured at
   the bundle's best setting that keeps components under 0.5 mL (the search's rule-4 reference,
   ``keeps_small`` in ``postprocess.json``);
d. its chosen setting is plausible and not degenerate.

Check c was changed between runs cpu5 and cpu6 (2026-12-03). Until then it compared the F1 at each bundle's
own chosen setting. A true lesion counts as found when any predicted voxel touches it, so at a setting that
removes every component under 0.5 or 1 mL the small lesions that count as found are those covered by larger
components: the check then measured the search's size limit and how far a bundle over-segments, not how many
small lesions the network finds. At the rule-4 reference both bundles are held to settings that keep small
components, and the search's rule 4 already guarantees that a chosen setting with a larger limit finds at
least as many.

    python -m Training campaign --pack pack.npz --val data/val_a,data/val_b --minutes 120 \\
        --out runs/campaign/run2 --ship

Where a GPU is lent for minutes, ``--until export`` (with ``--device cuda``) trains and exports there without the
validation sets; the same ``--out`` folder, copied back, continues at the search with the command above. The
ledger takes the device and training settings from the run's saved configuration, not from the continuing command.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from StrokePredictorLib.errors import StrokePredictorError
from StrokePredictorLib.io import write_json
from Training import config as cfg

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parents[1] / "StrokePredictor" / "Resources" / "Models"
RULE = {"score_gain": 0.01, "dice_drop": 0.01, "small_f1_drop": 0.02}
CARD_BEGIN, CARD_END = "<!-- campaign:begin -->", "<!-- campaign:end -->"


@dataclass(frozen=True)
class CampaignConfig:
    pack: Path = field(default=Path("pack.npz"), metadata={"help": "synthesis pack (python -m Training synthpack)"})
    val: tuple[Path, ...] = field(default=(), metadata={
        "help": "fixed validation folders (ISLES layout, with ground truth); comma-separated or repeated"})
    out: Path = field(default=Path("runs/campaign/run"), metadata={"help": "this run's folder"})
    models: Path = field(default=SHIPPED, metadata={"help": "folder of the shipped bundles (acute/, ...)"})
    task: str = field(default="acute", metadata={"help": "the bundle the campaign improves"})
    minutes: float = field(default=120.0, metadata={"help": "training wall time of this run"})
    device: str = field(default="cpu", metadata={"help": "cpu|cuda (the GPU recipe uses --source gpu)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate of the fine-tune"})
    seed: int = field(default=0, metadata={"help": "seed of this run (use a new one per run)"})
    val_cache: tuple[Path, ...] = field(default=(), metadata={
        "help": "select the training checkpoint on these preprocessed fixed sets (train-synth --val-cache) instead "
                "of synthesised whole volumes"})
    val_cache_cases: int = field(default=0, metadata={"help": "with --val-cache: cases per cache (0: all)"})
    grid_noise: tuple[float, ...] = field(default=(0.0, 0.0), metadata={
        "help": "CPU/GPU recipe: train-synth --grid-noise LO,HI (the test-set generator's noise after the "
                "synthesis's acquisition blur; 0,0: off)"})
    pool_pause: float = field(default=6.0, metadata={
        "help": "CPU recipe: train-synth --pool-pause, seconds the background renderer waits after each volume "
                "(6: about one fresh volume every 7 steps; 0: unpaced, about one a step with a one-thread step on "
                "2 cores)"})
    mimic_fraction: float = field(default=0.0, metadata={
        "help": "CPU pool: share of the non-lesion patches centred on hard negatives (DWI bright, ADC normal)"})
    patch: str = field(default="64,64,64", metadata={
        "help": "CPU pool: training crop in k,j,i voxels (multiples of the network's size divisor); the model grid "
                "(80,112,96) trains on whole volumes, as the fixed sets are scored"})
    batch_size: int = field(default=2, metadata={"help": "CPU pool: crops per training step"})
    lesion_loss: float = field(default=0.0, metadata={
        "help": "weight of the per-lesion Dice term (train-synth --lesion-loss; 0.5 is Kofler et al.'s blob loss), "
                "so that small lesions weigh as much as large ones"})
    focus_fraction: float = field(default=0.0, metadata={
        "help": "CPU pool: share of steps on a focus pair (train-synth --focus-fraction: a 64^3 crop centred on a "
                "lesion under 1 mL and one centred on a hard negative); 0: off"})
    val_every: int = field(default=300, metadata={"help": "validate (and keep the best checkpoint) every N steps"})
    patience: int = field(default=0, metadata={
        "help": "end training after this many validations without a gain (0: use all --minutes); the best "
                "checkpoint is exported either way"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    mc_samples: int = field(default=20, metadata={"help": "Monte-Carlo samples of the post-processing search"})
    max_cases: int = field(default=0, metadata={"help": "at most this many cases per validation folder (0: all)"})
    flip_tta: str = field(default="", metadata={
        "help": "flip averaging values the searches try (e.g. true); empty: the search's default"})
    guard: Path | None = field(default=None, metadata={
        "help": "both searches: postprocess --guard (a reference block the choice must beat on false positives "
                "of --guard-sets and on F1 under 1 mL), e.g. Training/resources/postprocess_guard_issue_time.json"})
    guard_sets: str = field(default="", metadata={
        "help": "both searches: postprocess --guard-sets (labels of --val sets, e.g. val_mimics,val_mimic_only)"})
    shipped_search: Path | None = field(default=None, metadata={
        "help": "reuse this postprocess.json of the shipped bundle when it was searched on the same sets with "
                "the same --max-cases, --flip-tta, --mc-samples, --guard and search grid (checked)"})
    init: Path | None = field(default=None, metadata={
        "help": "start the fine-tune from this bundle of the task (e.g. an earlier run's candidate/) instead of the "
                "shipped one; the candidate is still judged against the shipped bundle"})
    ship: bool = field(default=False, metadata={"help": "replace the shipped bundle when the rule says so"})
    until: str = field(default="decide", metadata={
        "help": "train|export|decide: stop after this stage. 'export' trains and exports the candidate without the "
                "validation sets (e.g. on a lent GPU); the same command with the default later, on any machine, "
                "continues at the search"})
    workers: int = field(default=4, metadata={"help": "GPU recipe: label-sampling worker processes"})
    candidate: Path | None = field(default=None, metadata={
        "help": "judge this ready-made bundle of the task (e.g. a weight average from python -m Training "
                "interpolate) instead of training one: the search, the rule and the ledger as for a trained run"})
    val_samples: int = field(default=16, metadata={
        "help": "select the checkpoint on this many synthesised whole volumes of held-out lesions (no --val-cache)"})


def decide(candidate: dict, shipped: dict) -> dict:
    """The campaign rule (module docstring) on two ``postprocess.json`` results; returns the decision."""
    c, s = candidate["best"], shipped["best"]
    small_c, small_s = _small_lesion_f1(candidate, "candidate"), _small_lesion_f1(shipped, "shipped")
    checks = {
        "score": c["score"] >= s["score"] + RULE["score_gain"],
        "mean_dice": c["mean_dice"] >= s["mean_dice"] - RULE["dice_drop"],
        "small_lesion_f1": _at_least(small_c, small_s, RULE["small_f1_drop"]),
        "plausible": bool(c.get("plausible", False)) and not candidate.get("degenerate"),
    }

    def summary(best: dict, small: float | None) -> dict:
        return {**{k: best.get(k) for k in ("score", "mean_dice", "small_lesion_f1", "threshold")},
                "small_lesion_f1_keeping_small": small}
    return {"ship": all(checks.values()), "checks": checks, "rule": RULE,
            "candidate": summary(c, small_c), "shipped": summary(s, small_s)}


def _small_lesion_f1(result: dict, name: str) -> float | None:
    """Check c's value: the F1 under 1 mL at the search's rule-4 reference (``keeps_small``)."""
    if "keeps_small" not in result:
        raise cfg.ConfigError(f"The {name} bundle's post-processing search predates the small-lesion reference "
                              f"(no 'keeps_small' in its postprocess.json): search it again.")
    row = result["keeps_small"]
    return None if row is None else row.get("small_lesion_f1")


def _at_least(value: float | None, reference: float | None, slack: float) -> bool:
    if reference is None or reference != reference:  # no small lesions in the sets: nothing to keep
        return True
    return value is not None and value == value and value >= reference - slack


def _stage(name: str, done: Path) -> bool:
    if done.exists():
        logger.info("campaign: %s already done (%s)", name, done)
        return False
    logger.info("campaign: %s ...", name)
    return True


def _run_verb(module: str, argv: list[str]) -> None:
    import importlib

    code = int(importlib.import_module(module).main([str(a) for a in argv]) or 0)
    if code:
        raise StrokePredictorError(f"campaign: '{module} {' '.join(map(str, argv))}' ended with exit code {code}.")


def _ledger_path(config: CampaignConfig) -> Path:
    return Path(config.models) / config.task / "campaign.json"


def record(config: CampaignConfig, entry: dict) -> dict:
    """Append (or replace, by run name) the run in the ledger; returns the ledger."""
    path = _ledger_path(config)
    ledger = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    ledger["runs"] = [r for r in ledger["runs"] if r.get("run") != entry["run"]] + [entry]
    ledger["cumulative"] = {
        "cpu_training_s": round(sum(r.get("training_s", 0) for r in ledger["runs"] if r.get("device") == "cpu"), 1),
        "gpu_training_s": round(sum(r.get("training_s", 0) for r in ledger["runs"] if r.get("device") != "cpu"), 1),
        "steps": int(sum(r.get("steps", 0) for r in ledger["runs"])),
    }
    write_json(ledger, path, overwrite=True)
    _card_table(Path(config.models) / config.task / "README.md", ledger)
    return ledger


def _card_table(card: Path, ledger: dict) -> None:
    if not card.is_file():
        return
    lines = [CARD_BEGIN, "### Training campaign (every run, shipped or not)", "",
             "Written by `python -m Training campaign` from `campaign.json`; scores are the post-processing "
             "search's on the fixed validation sets, each bundle with its own searched setting.", "",
             "| run | date | device | steps | training time | candidate score | shipped score | decision |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ledger["runs"]:
        decision = r.get("decision", {})
        cand, ship = decision.get("candidate", {}), decision.get("shipped", {})
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {r['run']} | {r.get('date', '-')} | {r.get('device', '-')} | {r.get('steps', '-')} | "
                     f"{r.get('training_s', 0) / 60:.0f} min | {fmt(cand.get('score'))} | {fmt(ship.get('score'))} | "
                     f"{r.get('outcome', '-')} |")
    total = ledger["cumulative"]
    lines += ["", f"Cumulative compute: {total['cpu_training_s'] / 3600:.2f} h of CPU training, "
                  f"{total['gpu_training_s'] / 60:.0f} min of GPU training, {total['steps']:,} steps.", CARD_END]
    text = card.read_text()
    block = "\n".join(lines)
    if CARD_BEGIN in text and CARD_END in text:
        text = text[:text.index(CARD_BEGIN)] + block + text[text.index(CARD_END) + len(CARD_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    card.write_text(text)


def _check_same_search(config: CampaignConfig, path: Path) -> None:
    """Refuse a shipped-bundle search made on other sets or with other settings than this run's."""
    saved_config = path.with_name("postprocess_config.json")
    if not path.is_file() or not saved_config.is_file():
        raise cfg.ConfigError(f"--shipped-search: {path} and its postprocess_config.json must both exist.")
    saved = json.loads(saved_config.read_text())
    wanted = {"data": sorted(str(Path(v).resolve()) for v in config.val), "max_cases": config.max_cases,
              "mc_samples": config.mc_samples}
    found = {"data": sorted(str(Path(v).resolve()) for v in saved.get("data", [])),
             "max_cases": saved.get("max_cases"), "mc_samples": saved.get("mc_samples")}
    if config.flip_tta:
        wanted["flip_tta"] = [v.strip().lower() == "true" for v in config.flip_tta.split(",")]
        found["flip_tta"] = saved.get("flip_tta")
    wanted["guard"] = str(Path(config.guard).resolve()) if config.guard is not None else None
    found["guard"] = str(Path(saved["guard"]).resolve()) if saved.get("guard") else None
    wanted["guard_sets"] = _guard_sets(config)
    found["guard_sets"] = list(saved.get("guard_sets") or [])
    from Training.evaluation.postprocess import SEARCH_GRID_FIELDS, PostprocessConfig

    for key in SEARCH_GRID_FIELDS:  # the campaign searches the default grid
        wanted[key] = [float(v) for v in getattr(PostprocessConfig(), key)]
        found[key] = [float(v) for v in saved.get(key, [])]
    try:  # check c's value must be there, before hours of training
        _small_lesion_f1(json.loads(path.read_text()), "shipped")
    except cfg.ConfigError as error:
        raise cfg.ConfigError(f"--shipped-search: {path}: {error} Leave out --shipped-search.") from None
    differ = [key for key in wanted if wanted[key] != found[key]]
    if differ:
        raise cfg.ConfigError(f"--shipped-search: {path} was searched with other {', '.join(differ)} "
                              f"({', '.join(f'{k}={found[k]}' for k in differ)}) than this run.")


def _init_folder(config: CampaignConfig) -> Path:
    """The folder of bundles that train-synth starts from: the shipped ones, or ``OUT/init/<task>``
    holding a copy of ``--init`` (checked to be a bundle of the task)."""
    if config.init is None:
        return Path(config.models)
    _copy_bundle(config, Path(config.init), Path(config.out) / "init" / config.task, "--init")
    return Path(config.out) / "init"


def _copy_bundle(config: CampaignConfig, source: Path, folder: Path, flag: str) -> Path:
    """Copy the bundle ``source`` (checked to be a bundle of the task) to ``folder``; returns ``folder``."""
    from StrokePredictorLib.bundle import read_metadata

    if not (source / "weights.safetensors").is_file():
        raise cfg.ConfigError(f"{flag}: {source} is not a bundle (model.json and weights.safetensors expected).")
    try:
        task = read_metadata(source / "model.json").get("task")
    except StrokePredictorError as error:
        raise cfg.ConfigError(f"{flag}: {error}") from None
    if task != config.task:
        raise cfg.ConfigError(f"{flag}: {source} is a bundle of the task '{task}', not '{config.task}'.")
    folder.mkdir(parents=True, exist_ok=True)
    if source.resolve() != folder.resolve():
        for name in ("model.json", "weights.safetensors"):
            shutil.copy2(source / name, folder / name)
    return folder


STAGES = ("train", "export", "decide")


def run(config: CampaignConfig) -> dict:
    if config.until not in STAGES:
        raise cfg.ConfigError(f"--until must be one of {', '.join(STAGES)}, not '{config.until}'.")
    if config.until == "decide":
        _check_validation(config)
    shipped_bundle = Path(config.models) / config.task
    if not (shipped_bundle / "model.json").is_file():
        raise cfg.ConfigError(f"--models: {shipped_bundle} holds no bundle.")
    if config.shipped_search is not None and config.until == "decide":  # before hours of training, not after
        _check_same_search(config, Path(config.shipped_search))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if config.candidate is not None:  # a ready-made candidate: nothing to train or export
        if config.until != "decide":
            raise cfg.ConfigError("--candidate is judged, not trained: leave out --until.")
        candidate = _copy_bundle(config, Path(config.candidate), out / "candidate", "--candidate")
        return _decide_and_record(config, out, candidate, {"steps": 0, "seconds": 0.0}, started)
    init = _init_folder(config)
    train_dir = out / "train"
    summary = train_dir / "summary.json"
    if _stage("train", summary):
        _train(config, train_dir, init)
    trained = json.loads(summary.read_text())[config.task]
    candidate = out / "candidate"
    if config.until != "train" and _stage("export", candidate / "model.json"):
        _run_verb("Training.training.export", ["--run", train_dir / config.task, "--out", candidate,
                                      "--name", f"strokepredictor-{config.task}", "--checkpoint", "best"])
    if config.until != "decide":
        logger.info("campaign: stopped after %s (--until); run again without --until to continue", config.until)
        return {"stopped_after": config.until, "trained": trained}
    return _decide_and_record(config, out, candidate, trained, started)


def _guard_sets(config: CampaignConfig) -> list[str]:
    """The labels of ``--guard-sets``."""
    return [v.strip() for v in config.guard_sets.split(",") if v.strip()]


def _check_validation(config: CampaignConfig) -> None:
    if not config.val:
        raise cfg.ConfigError("--val: give the fixed validation folders (Training/recipes/make_eval_sets.sh).")
    for folder in config.val:
        if not Path(folder).is_dir():
            raise cfg.ConfigError(f"--val: {folder} is not a folder.")
    guard_sets = _guard_sets(config)
    if (config.guard is None) != (not guard_sets):
        raise cfg.ConfigError("--guard and --guard-sets go together.")
    if config.guard is not None:
        if not Path(config.guard).is_file():
            raise cfg.ConfigError(f"--guard: {config.guard} is not a file.")
        labels = [Path(folder).name for folder in config.val]  # the searches label the sets by folder name
        unknown = [label for label in guard_sets if label not in labels]
        if unknown:
            raise cfg.ConfigError(f"--guard-sets: {', '.join(unknown)} not among the --val sets ({', '.join(labels)}).")


def _train(config: CampaignConfig, train_dir: Path, init: Path) -> None:
    resume = (train_dir / config.task / "checkpoints" / "last.pt").is_file()
    argv = ["--pack", config.pack, "--out", train_dir, "--device", config.device, "--variants", config.task,
            "--time-limit", config.minutes * 60, "--lr", config.lr, "--seed", config.seed,
            "--threads", config.threads, "--val-samples", config.val_samples, "--val-every", config.val_every,
            "--checkpoint-minutes", 10, "--lesion-loss", config.lesion_loss, "--patience", config.patience,
            "--source", "pool" if config.device == "cpu" else "gpu",
            "--grid-noise", ",".join(str(v) for v in config.grid_noise)]
    if config.device == "cpu":  # the CPU recipe: a 48-volume pool; by default 2 lesion-centred 64^3 patches a step
        argv += ["--batch-size", config.batch_size, "--patch", config.patch, "--pool-size", 48,
                 "--pool-pause", config.pool_pause,
                 "--mimic-fraction", config.mimic_fraction, "--focus-fraction", config.focus_fraction]
    else:  # the GPU recipe: whole volumes synthesised on the device, 8 a step, label samples from CPU workers
        argv += ["--workers", config.workers]
    if config.val_cache:
        argv += ["--val-cache", ",".join(str(c) for c in config.val_cache),
                 "--val-max-cases", config.val_cache_cases]
    argv += ["--resume"] if resume else ["--init", init]
    _run_verb("Training.training.train_synth", argv)


def _trained_with(train_dir: Path, config: CampaignConfig) -> dict:
    """The training settings for the ledger, as the run saved them (the training may have run elsewhere, e.g. on
    a lent GPU with --until export, and the continuing command need not repeat its flags)."""
    settings = {"device": config.device, "lr": config.lr, "seed": config.seed, "mimic_fraction": config.mimic_fraction,
                "patch": config.patch, "batch_size": config.batch_size, "lesion_loss": config.lesion_loss,
                "focus_fraction": config.focus_fraction, "patience": config.patience,
                "grid_noise": list(config.grid_noise), "pool_pause": config.pool_pause}
    saved_path = train_dir / config.task / "train_synth_config.json"
    if not saved_path.is_file():
        return settings
    saved = json.loads(saved_path.read_text())
    settings.update({key: saved[key] for key in settings if key in saved})
    settings["device"] = "cpu" if settings["device"] == "cpu" else "cuda"
    if not isinstance(settings["patch"], str):
        settings["patch"] = ",".join(str(v) for v in settings["patch"]) or "whole volume"
    return settings


def _decide_and_record(config: CampaignConfig, out: Path, candidate: Path, trained: dict, started: float) -> dict:
    shipped_bundle = Path(config.models) / config.task
    shipped_copy = out / "shipped"  # searched as a copy, so that --write never touches the shipped bundle
    val = ",".join(str(v) for v in config.val)
    results = {}
    if config.shipped_search is not None:
        search = out / "search_shipped"
        search.mkdir(exist_ok=True)
        shutil.copy2(config.shipped_search, search / "postprocess.json")
    for name, bundle in (("candidate", candidate), ("shipped", shipped_copy)):
        search = out / f"search_{name}"
        if _stage(f"post-processing search ({name})", search / "postprocess.json"):
            if name == "shipped" and not (shipped_copy / "model.json").is_file():
                shutil.copytree(shipped_bundle, shipped_copy, dirs_exist_ok=True)
            argv = ["--bundle", bundle, "--data", val, "--out", search, "--write", "--mc-samples", config.mc_samples,
                    "--max-cases", config.max_cases, "--device", config.device, "--force"]
            flip = ["--flip-tta", config.flip_tta] if config.flip_tta else []
            guard = ["--guard", config.guard, "--guard-sets", config.guard_sets] if config.guard is not None else []
            _run_verb("Training.evaluation.postprocess", argv + flip + guard)
        results[name] = json.loads((search / "postprocess.json").read_text())
    decision = decide(results["candidate"], results["shipped"])
    shipped_now = False
    if decision["ship"] and config.ship:
        for name in ("weights.safetensors", "model.json"):
            shutil.copy2(candidate / name, shipped_bundle / name)
        shipped_now = True
    outcome = "shipped" if shipped_now else ("would ship (run without --ship)" if decision["ship"] else "kept")
    write_json({**decision, "outcome": outcome}, out / "decision.json", overwrite=True)
    trained_with = ({"candidate": str(config.candidate)} if config.candidate is not None
                    else _trained_with(out / "train", config))
    entry = {"run": out.name, "date": datetime.now(timezone.utc).date().isoformat(), **trained_with,
             "steps": int(trained["steps"]), "training_s": float(trained["seconds"]),
             "best_synthetic_val_dice": trained.get("best_val_dice"), "stopped": trained.get("stopped"),
             "init": str(config.init) if config.init else ("-" if config.candidate is not None else "shipped"),
             "checkpoint_validation": [Path(c).name for c in config.val_cache] or "synthesised",
             "validation_sets": [Path(v).name for v in config.val], "max_cases_per_set": config.max_cases,
             "mc_samples": config.mc_samples, "decision": decision, "outcome": outcome}
    ledger = record(config, entry)
    logger.info("campaign: %s (candidate %.3f, shipped %.3f); %.0f s", outcome, decision["candidate"]["score"],
                decision["shipped"]["score"], time.perf_counter() - started)
    return {"decision": decision, "outcome": outcome, "cumulative": ledger["cumulative"]}


def main(argv: list[str]) -> int:
    config = cfg.parse(CampaignConfig, argv, "Improve the shipped bundle: train, search, decide by a fixed rule, "
                       "record.", prog="python -m Training campaign")
    print(json.dumps(run(config), indent=2))
    return 0
