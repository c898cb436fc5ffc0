"""``python -m Training train-synth``: train on GPU-synthesised data, several variants in lockstep.

Every step draws label samples (CPU workers, :class:`Training.synthesis.gpu_synth.LabelSampler`) and
synthesises a domain-randomised image batch on the device (:class:`Training.synthesis.gpu_synth.GpuSynthesizer`);
the same batch trains every variant, so a fusion model and its imaging-only ablation see exactly
the same data and steps (a paired ablation at the cost of one data stream). A variant is
``<task>`` or ``<task>-imaging`` (``acute``, ``outcome``, ``acute-imaging``, ...).

Each variant gets a run folder ``OUT/<variant>/`` with ``checkpoints/best.pt`` (best validation
Dice on synthesised cases from held-out validation lesions) and ``last.pt`` in the format of
:mod:`Training.training.train`, so ``python -m Training export --run OUT/acute --out BUNDLE`` works, plus
``log.csv`` and the effective config. The learning-rate schedule (linear warm-up, cosine decay)
follows the elapsed fraction of ``--time-limit`` when one is given, so a run fits a fixed budget.

    python -m Training train-synth --pack pack.npz --out runs/synth --device cuda --time-limit 300

On the CPU (``--source pool``, the default there), synthesis per step would cost many times the
network's step, so volumes come from :class:`Training.synthesis.pool.SynthPool`: pre-rendered whole
volumes, refreshed by a background process, cut into lesion-centred patches (``--patch``) that
are re-augmented cheaply; bf16 autocast on the CPU (about 1.9x faster than fp32 there). Patches
carry their place in the model grid, so the fusion's position embedding means the same as at
inference; validation is on whole volumes. Checkpoints are written every ``--checkpoint-minutes``
as well as at validation, and ``--resume`` continues a run from its own saved config (flags given
again may only extend ``--time-limit``/``--max-steps``); elapsed time and steps add up across resumes.

    python -m Training train-synth --pack pack.npz --out runs/cpu --device cpu --source pool \
        --variants acute --init StrokePredictor/Resources/Models --time-limit 3600
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from Training import config as cfg

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthTrainConfig:
    pack: Path = field(default=Path("pack.npz"), metadata={"help": "synthesis pack (python -m Training synthpack)"})
    out: Path = field(default=Path("runs/synth"), metadata={"help": "folder of the variants' run folders"})
    variants: tuple[str, ...] = field(default=("acute", "acute-imaging", "outcome", "outcome-imaging"),
                                      metadata={"help": "comma-separated: acute, outcome, acute-imaging, ..."})
    preset: str = field(default="lite", metadata={"help": "network preset: lite|base"})
    grid_size: tuple[int, ...] = field(default=(), metadata={"help": "model grid i,j,k (default: the preset's)"})
    batch_size: int = field(default=8, metadata={"help": "images per step"})
    reuse: int = field(default=2, metadata={"help": "images synthesised from each label sample"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    warmup: float = field(default=0.05, metadata={"help": "warm-up as a fraction of the budget"})
    min_lr_ratio: float = field(default=0.03, metadata={"help": "final / peak learning rate"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: use --time-limit)"})
    time_limit: float = field(default=300.0, metadata={"help": "seconds of training (the schedule follows it)"})
    val_every: int = field(default=150, metadata={"help": "validate every N steps"})
    val_samples: int = field(default=48, metadata={"help": "synthesised validation cases (val lesions)"})
    val_subset: str = field(default="val", metadata={
        "help": "lesions of the validation cases: val (held out), or train for smoke tests on a tiny pack"})
    clinical_drop_p: float = field(default=0.25, metadata={"help": "per-feature clinical drop-out"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping"})
    workers: int = field(default=4, metadata={"help": "label-sampling worker processes"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    precision: str = field(default="bf16", metadata={"help": "bf16 (autocast on CUDA) or fp32"})
    channels_last: bool = field(default=True, metadata={
        "help": "channels-last 3-D memory layout (on CUDA, and on the CPU with bf16)"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing run folders"})
    init: Path | None = field(default=None, metadata={
        "help": "fine-tune: start each variant from INIT/<variant> (a model bundle folder)"})
    source: str = field(default="auto", metadata={
        "help": "auto (gpu on CUDA, pool on the CPU)|gpu (synthesise every step)|pool (pre-rendered volumes)"})
    patch: tuple[int, ...] = field(default=(), metadata={
        "help": "train on patches of k,j,i voxels (multiples of the size divisor; default: whole grid, "
                "64,64,64 with the pool)"})
    lesion_fraction: float = field(default=1 / 3, metadata={"help": "share of patches centred on a lesion component"})
    pool_size: int = field(default=48, metadata={"help": "pre-rendered volumes held by the pool"})
    pool_refresh: int = field(default=1, metadata={"help": "fresh volumes swapped into the pool per step, at most"})
    pool_pause: float = field(default=6.0, metadata={
        "help": "seconds the pool's background renderer waits after each volume (0: render without pause)"})
    batch_dice: bool = field(default=True, metadata={
        "help": "Dice over the whole batch (nnU-Net's batch Dice; a patch cut through a lesion or holding none "
                "does not dominate the loss) instead of per image"})
    checkpoint_minutes: float = field(default=10.0, metadata={"help": "write last.pt at least this often"})
    resume: bool = field(default=False, metadata={"help": "continue OUT/<variant>/checkpoints/last.pt"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    film: bool = field(default=False, metadata={
        "help": "FiLM-condition the decoder of the fusion variants on the clinical context; from --init "
                "weights without FiLM the FiLM layers start at zero, so training starts from the same output"})


def _variant(name: str) -> tuple[str, bool]:
    task, _, suffix = name.partition("-")
    if task not in ("acute", "outcome") or suffix not in ("", "imaging"):
        raise cfg.ConfigError(f"Unknown variant '{name}': use acute, outcome, acute-imaging or outcome-imaging.")
    return task, suffix == "imaging"


def _initialise(model: torch.nn.Module, init: Path, name: str) -> Path:
    """Load the starting weights of variant ``name`` into ``model`` from ``init/<name>``.

    A FiLM network takes the weights of the same architecture without FiLM (FiLM layers stay at
    zero: :func:`StrokePredictorLib.network.load_weights`). An imaging-only variant without a bundle
    of its own (``init/<task>-imaging`` absent) starts from ``init/<task>``'s imaging weights
    (encoder, decoder, head; the clinical branch is dropped), so that the paired ablation starts
    from the same imaging network. Returns the bundle folder used.
    """
    from StrokePredictorLib.bundle import load_bundle
    from StrokePredictorLib.network import load_weights

    ours = model.config  # type: ignore[attr-defined]
    folder = Path(init) / name
    task, imaging_only = _variant(name)
    fallback = imaging_only and not folder.exists()
    if fallback:
        folder = Path(init) / task
        logger.warning("%s: no bundle %s; starting from the imaging weights of %s.", name, Path(init) / name, folder)
    start_from = load_bundle(folder)
    theirs = start_from.config
    ignored = {"film"} | ({"imaging_only"} if fallback else set())
    same = {k: v for k, v in ours.to_dict().items() if k not in ignored} == \
        {k: v for k, v in theirs.to_dict().items() if k not in ignored}
    if not same or (theirs.film and not ours.film) or (fallback and theirs.imaging_only):
        raise cfg.ConfigError(f"Bundle {start_from.directory} has another architecture than variant '{name}' "
                              f"(imaging_only={ours.imaging_only}, film={ours.film}).")
    state = start_from.model.state_dict()
    if fallback:
        state = {k: v for k, v in state.items() if k in model.state_dict()}
    load_weights(model, state)  # type: ignore[arg-type]
    return Path(start_from.directory)


def _dice_per_case(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prediction = logits > 0
    truth = target > 0.5
    inter = (prediction & truth).flatten(1).sum(1).float()
    total = prediction.flatten(1).sum(1).float() + truth.flatten(1).sum(1).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


RESUMABLE = ("time_limit", "max_steps", "val_every", "checkpoint_minutes", "threads", "workers")


def _recent_mean(values: list[float], count: int) -> float:
    """Mean of the last ``count`` values; NaN when there are none (every step skipped)."""
    return float(np.mean(values[-count:])) if values else float("nan")


def _resolved_source(config: SynthTrainConfig, device: torch.device) -> str:
    source = config.source if config.source != "auto" else ("gpu" if device.type == "cuda" else "pool")
    if source not in ("gpu", "pool"):
        raise cfg.ConfigError(f"--source must be auto, gpu or pool, not '{config.source}'.")
    return source


def _resume_config(config: SynthTrainConfig) -> SynthTrainConfig:
    """The run's own saved config, with only the budget-like fields taken from the command line."""
    first = Path(config.out) / config.variants[0] / "train_synth_config.json"
    if not first.is_file():
        raise cfg.ConfigError(f"Cannot resume: {first} does not exist (start without --resume).")
    saved = cfg.build(SynthTrainConfig, json.loads(first.read_text()), source=str(first))
    default = SynthTrainConfig()
    typed = [f.name for f in dataclasses.fields(SynthTrainConfig)
             if f.name not in (*RESUMABLE, "resume", "out", "overwrite")
             and getattr(config, f.name) not in (getattr(saved, f.name), getattr(default, f.name))]
    if typed:
        raise cfg.ConfigError(f"--resume continues {first.parent} with its own saved config; "
                              f"{', '.join('--' + n.replace('_', '-') for n in typed)} cannot change "
                              f"(only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} can).")
    changes = {name: getattr(config, name) for name in RESUMABLE if getattr(config, name) != getattr(saved, name)}
    if any(getattr(config, name) < getattr(saved, name) for name in ("time_limit", "max_steps") if name in changes):
        raise cfg.ConfigError("--resume may extend --time-limit/--max-steps, not shorten them.")
    for name, value in changes.items():
        logger.info("resume: %s %s -> %s", name, getattr(saved, name), value)
    return dataclasses.replace(saved, resume=True, **changes)


def run(config: SynthTrainConfig) -> dict[str, dict]:
    """Train every variant; returns {variant: {"run_dir", "best_val_dice", "steps", "seconds"}}."""
    from monai.losses import DiceCELoss

    from StrokePredictorLib.bundle import recommended_grid, resolve_device
    from StrokePredictorLib.io import write_json
    from StrokePredictorLib.network import NetworkConfig, StrokeNet
    from StrokePredictorLib.preprocess import ModelGrid, Normalization
    from Training.synthesis.gpu_synth import GpuSynthesizer, LabelSampler, Pack
    from Training.training.train import load_checkpoint, lr_factor, save_checkpoint

    if config.resume:
        config = _resume_config(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    variants = {name: _variant(name) for name in config.variants}
    device = resolve_device(config.device)
    source = _resolved_source(config, device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    pack = Pack.load(config.pack)
    preset = NetworkConfig.lite() if config.preset == "lite" else NetworkConfig.base()
    grid = ModelGrid(tuple(config.grid_size), (2.0, 2.0, 2.0)) if config.grid_size else recommended_grid(preset)
    if grid.spacing != (2.0, 2.0, 2.0):
        raise cfg.ConfigError(f"The synthesis pack is at 2 mm; preset '{config.preset}' needs {grid.spacing} mm.")
    grid_kji = tuple(grid.size[::-1])
    patch = tuple(config.patch) or ((64, 64, 64) if source == "pool" else grid_kji)
    divisor = preset.size_divisor
    if len(patch) != 3 or any(p % divisor or p > g or p <= 0 for p, g in zip(patch, grid_kji, strict=False)):
        raise cfg.ConfigError(f"--patch {','.join(map(str, patch))} must be three sizes k,j,i, multiples of "
                              f"{divisor}, within the grid {','.join(map(str, grid_kji))}.")
    synth = GpuSynthesizer(pack, grid.size, device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    loss_fn = DiceCELoss(sigmoid=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=config.batch_dice)
    cuda = device.type == "cuda"
    if config.precision not in ("bf16", "fp32"):
        raise cfg.ConfigError(f"--precision must be bf16 or fp32, not '{config.precision}'.")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16"
                else torch.autocast(device.type, enabled=False))
    # channels-last: faster on CUDA, and with bf16 on a CPU with AVX-512 BF16 (0.46 against 0.71 s per step
    # of 2 x 64^3 here; Testing/benchmarks/bench_cpu_train.py)
    channels_last = config.channels_last and (cuda or config.precision == "bf16")

    runs: dict[str, dict] = {}
    for name, (_task, imaging_only) in variants.items():
        net_config = NetworkConfig.from_dict({**preset.to_dict(), "imaging_only": imaging_only,
                                              "film": config.film and not imaging_only})
        model = StrokeNet(net_config)
        run_dir = Path(config.out) / name
        last = run_dir / "checkpoints" / "last.pt"
        if config.init is not None and not config.resume:
            _initialise(model, config.init, name)
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        state: dict = {"best": -1.0, "step": 0, "elapsed": 0.0}
        if config.resume:
            saved = load_checkpoint(last)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state.update(best=float(saved["best_val_dice"]), step=int(saved["step"]),
                         elapsed=float(saved["elapsed_s"]))
        elif (run_dir / "checkpoints" / "best.pt").exists() and not config.overwrite:
            raise cfg.ConfigError(f"Run folder {run_dir} holds a trained run; pass --resume to continue it or "
                                  "--overwrite to replace it.")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        cfg.save(config, run_dir / "train_synth_config.json")
        log_path = run_dir / "log.csv"
        new_log = not (config.resume and log_path.is_file())
        log = log_path.open("w" if new_log else "a", newline="")
        writer = csv.writer(log)
        if new_log:
            writer.writerow(["step", "seconds", "lr", "train_loss", "val_dice"])
        runs[name] = {"model": model, "optimizer": optimizer, "config": net_config, "run_dir": run_dir,
                      "log": log, "writer": writer, "losses": [], **state}
    first = next(iter(runs.values()))
    step, elapsed_before = first["step"], first["elapsed"]

    # fixed validation cases from held-out validation lesions (never trained on), whole volumes
    if config.val_subset not in ("val", "train") or not len(pack.indices(config.val_subset)):
        raise cfg.ConfigError(f"--val-subset {config.val_subset}: the pack {config.pack} has no such lesions.")
    val_labels = LabelSampler(pack, subset=config.val_subset, seed=config.seed + 10_000, length=config.val_samples)
    val_batches = []
    val_generator = torch.Generator(device=device).manual_seed(config.seed + 20_000)
    val_batch = config.batch_size if cuda else 1
    for start in range(0, config.val_samples, val_batch):
        items = [val_labels[i] for i in range(start, min(start + val_batch, config.val_samples))]
        val_batches.append(synth(torch.utils.data.default_collate(items), val_generator))

    pool = None
    loader_iter = None
    if source == "pool":
        from Training.synthesis.pool import SynthPool

        logger.info("rendering %d pool volumes ...", config.pool_size)
        pool = SynthPool(config.pack, grid.size, size=config.pool_size, seed=config.seed + 1_000_003 * step,
                         divisor=divisor, pause=config.pool_pause)
    else:
        sampler = LabelSampler(pack, subset="train", seed=config.seed + 1_000_003 * step, length=10_000_000)
        per_step = max(1, config.batch_size // max(config.reuse, 1))
        loader = torch.utils.data.DataLoader(
            sampler, batch_size=per_step, shuffle=False, num_workers=config.workers, pin_memory=cuda,
            persistent_workers=config.workers > 0, prefetch_factor=4 if config.workers > 0 else None,
        )
        loader_iter = iter(loader)

    def next_batch() -> dict[str, torch.Tensor]:
        if pool is not None:
            pool.refresh(config.pool_refresh)
            task = next(iter(variants.values()))[0]
            batch = pool.batch(config.batch_size, patch, task=task, lesion_fraction=config.lesion_fraction)
            return {k: v.to(device) for k, v in batch.items()}
        labels = next(loader_iter)
        labels = {k: v.repeat_interleave(config.reuse, dim=0) if torch.is_tensor(v) else v for k, v in labels.items()}
        batch = synth(labels, generator)
        if patch != grid_kji:
            raise cfg.ConfigError("--patch needs --source pool.")
        return batch

    def validate() -> dict[str, float]:
        scores: dict[str, list[torch.Tensor]] = {name: [] for name in runs}
        for state in runs.values():
            state["model"].eval()
        with torch.no_grad(), autocast:
            for batch in val_batches:
                for name, (task, _) in variants.items():
                    out = runs[name]["model"](batch["image"], batch["clinical_values"], batch["clinical_missing"],
                                              batch["flair_present"])
                    scores[name].append(_dice_per_case(out["logits"].float(), batch[task]))
        for state in runs.values():
            state["model"].train()
        return {name: float(torch.cat(values).mean()) for name, values in scores.items()}

    def checkpoint(name: str, val_dice: float, file: str) -> None:
        state = runs[name]
        task, imaging_only = variants[name]
        save_checkpoint({
            "model": {k: v.detach().cpu() for k, v in state["model"].state_dict().items()},
            "optimizer": state["optimizer"].state_dict() if file == "last.pt" else None,
            "network": state["config"].to_dict(), "task": task, "grid": grid.to_dict(),
            "normalization": Normalization().to_dict(),
            "data": {
                "source": "domain-randomised synthesis (Training.synthesis.gpu_synth) from MNI152 2009 anatomy and "
                          "real SOOP acute lesion masks with their participants' clinical values"
                          + (", pre-rendered pool of whole volumes cut into lesion-centred patches"
                             if source == "pool" else ""),
                "pack": Path(config.pack).name, "n_cases": {"train": int(len(pack.indices("train"))),
                                                           "val": config.val_samples},
                "lesions": {s: int(len(pack.indices(s))) for s in ("train", "val", "test")},
            },
            "config": {**cfg.to_dict(config), "imaging_only": imaging_only, "val_threshold": 0.5,
                       "augment": "gpu_synth" + ("+pool" if source == "pool" else "")},
            "val_dice": val_dice, "val_loss": None, "best_val_dice": state["best"],
            "epoch": 0, "step": step, "elapsed_s": elapsed_before + (time.perf_counter() - start),
            "world_size": 1, "torch_version": torch.__version__,
        }, state["run_dir"] / "checkpoints" / file)

    start = time.perf_counter()
    last_checkpoint = last_progress = start
    net_seconds = 0.0
    done = (config.max_steps and step >= config.max_steps) or (
        not config.max_steps and elapsed_before >= config.time_limit)
    try:
        while not done:
            batch = next_batch()
            tic = time.perf_counter()
            drop = torch.rand(batch["clinical_missing"].shape, generator=generator, device=device)
            missing = batch["clinical_missing"] | (drop < config.clinical_drop_p)
            values = batch["clinical_values"] * ~missing
            image = batch["image"].contiguous(memory_format=torch.channels_last_3d) if channels_last else batch["image"]
            window = batch.get("window")
            elapsed = elapsed_before + time.perf_counter() - start
            progress = step / config.max_steps if config.max_steps else elapsed / max(config.time_limit, 1e-9)
            # the shared schedule on a 10,000-tick clock, so that it can follow elapsed time
            factor = lr_factor(int(progress * 10_000), max(int(config.warmup * 10_000), 1), 10_000,
                               config.min_lr_ratio)
            for name, (task, _) in variants.items():
                state = runs[name]
                for group in state["optimizer"].param_groups:
                    group["lr"] = config.lr * factor
                target = batch["target"] if pool is not None else batch[task]
                with autocast:
                    out = state["model"](image, values, missing, batch["flair_present"], window)
                loss = loss_fn(out["logits"].float(), target)
                state["optimizer"].zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(state["model"].parameters(),
                                                      config.grad_clip if config.grad_clip else float("inf"))
                if not (torch.isfinite(loss) and torch.isfinite(norm)):  # never let a NaN reach the weights
                    state["optimizer"].zero_grad(set_to_none=True)
                    state["skipped"] = state.get("skipped", 0) + 1
                    logger.warning("%s step %d: non-finite loss or gradient, step skipped (%d so far)", name, step,
                                   state["skipped"])
                    if step >= 10 and state["skipped"] > 0.2 * (step + 1 - first["step"]):
                        raise cfg.ConfigError(f"{name}: more than a fifth of the steps had non-finite gradients; "
                                              "lower --lr or use --precision fp32.")
                    continue
                state["optimizer"].step()
                state["losses"].append(float(loss.detach()))
            net_seconds += time.perf_counter() - tic
            step += 1
            now = time.perf_counter()
            elapsed = elapsed_before + now - start
            limit_reached = step >= config.max_steps if config.max_steps else elapsed >= config.time_limit
            done = bool(limit_reached)
            if now - last_progress >= 30 or done:
                last_progress = now
                logger.info("step %d, %.0f s, %.2f s/step, network %.0f%% of the time, loss %s%s", step, elapsed,
                            (now - start) / max(step - first["step"], 1), 100 * net_seconds / max(now - start, 1e-9),
                            ", ".join(f"{n} {_recent_mean(s['losses'], 20):.3f}" for n, s in runs.items()),
                            f", pool refreshed {pool.refreshed}" if pool is not None else "")
            if step % config.val_every == 0 or done:
                dice = validate()
                for name, state in runs.items():
                    mean_loss = _recent_mean(state["losses"], config.val_every)
                    state["writer"].writerow([step, round(elapsed, 1), config.lr * factor, mean_loss, dice[name]])
                    state["log"].flush()
                    if dice[name] > state["best"]:
                        state["best"] = dice[name]
                        checkpoint(name, dice[name], "best.pt")
                    checkpoint(name, dice[name], "last.pt")
                last_checkpoint = time.perf_counter()
                logger.info("step %d (%.0f s): %s", step, elapsed,
                            ", ".join(f"{n} val Dice {d:.3f}" for n, d in dice.items()))
            elif now - last_checkpoint >= 60 * config.checkpoint_minutes:
                for name in runs:
                    checkpoint(name, float("nan"), "last.pt")
                last_checkpoint = time.perf_counter()
    finally:
        if pool is not None:
            pool.close()
    results = {}
    for name, state in runs.items():
        state["log"].close()
        results[name] = {"run_dir": str(state["run_dir"]), "best_val_dice": state["best"], "steps": step,
                         "seconds": round(elapsed_before + time.perf_counter() - start, 1),
                         "network_share": round(net_seconds / max(time.perf_counter() - start, 1e-9), 3),
                         "skipped_steps": int(state.get("skipped", 0))}
    write_json(results, Path(config.out) / "summary.json", overwrite=True)
    return results


def main(argv: list[str]) -> int:
    config = cfg.parse(SynthTrainConfig, argv, "Train on GPU-synthesised data (several variants in lockstep).",
                       prog="python -m Training train-synth")
    print(json.dumps(run(config), indent=2))
    return 0
