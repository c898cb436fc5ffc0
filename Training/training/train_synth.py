"""``python -m Training train-synth``: train on synthesised data, several variants in lockstep.

The front end of the shared training loop (:mod:`Training.training.loop`) for synthetic data.
The same batch trains every variant, so a fusion model and its imaging-only ablation see exactly
the same data and steps (a paired ablation at the cost of one data stream). A variant is
``<task>`` or ``<task>-imaging`` (``acute``, ``outcome``, ``acute-imaging``, ...).

Two data sources (:mod:`Training.training.sources`):

* ``--source gpu`` (the default on CUDA): every step draws label samples (CPU workers,
  :class:`Training.synthesis.gpu_synth.LabelSampler`) and synthesises a domain-randomised image
  batch on the device (:class:`Training.synthesis.gpu_synth.GpuSynthesizer`);
* ``--source pool`` (the default on the CPU, where synthesis per step would cost many times the
  network's step): volumes come from :class:`Training.synthesis.pool.SynthPool`, pre-rendered
  whole volumes refreshed by a background process, cut into lesion-centred patches (``--patch``)
  that are re-augmented cheaply; bf16 autocast on a CPU that has it natively (about 1.9x faster than
  fp32 there), fp32 on one that would emulate it (about 20x slower than fp32).
  Patches carry their place in the model grid, so the fusion's position embedding means the
  same as at inference.

Each variant gets a run folder ``OUT/<variant>/`` in the format of ``train``: ``checkpoints/``
``best.pt`` (best validation Dice on whole volumes synthesised from held-out validation lesions)
and ``last.pt``, so ``python -m Training export --run OUT/acute --out BUNDLE`` works, plus
``log.csv``, ``result.json`` and the effective config; ``OUT/summary.json`` sums the variants
up. An epoch is ``--val-every`` steps. The learning-rate schedule (linear warm-up, cosine decay)
follows the elapsed fraction of ``--time-limit`` (or the steps of ``--max-steps``, which replaces
the time limit), so a run fits a fixed budget. Checkpoints are written every
``--checkpoint-minutes`` as well as at validation, and ``--resume`` continues a run from its own
saved config (flags given again may only extend ``--time-limit``/``--max-steps``); elapsed time
and steps add up across resumes.

    python -m Training train-synth --pack pack.npz --out runs/synth --device cuda --time-limit 300
    python -m Training train-synth --pack pack.npz --out runs/cpu --device cpu --source pool \
        --variants acute --init StrokePredictor/Resources/Models --time-limit 3600
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from Training import config as cfg
from Training.training import loop

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
    val_cache: tuple[Path, ...] = field(default=(), metadata={
        "help": "validate on these preprocessed fixed sets instead (python -m Training preprocess --data "
                "data/val_mimics --out CACHE; comma-separated): every case, or the first --val-max-cases of each"})
    val_max_cases: int = field(default=0, metadata={"help": "with --val-cache: cases per cache (0: all)"})
    val_subset: str = field(default="val", metadata={
        "help": "lesions of the validation cases: val (held out), or train for smoke tests on a tiny pack"})
    clinical_drop_p: float = field(default=0.25, metadata={"help": "per-feature clinical drop-out"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping"})
    workers: int = field(default=4, metadata={"help": "label-sampling worker processes"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 autocast where the device computes it natively: CUDA, CPUs with AVX-512 or AMX; else "
                "fp32)|bf16|fp32"})
    channels_last: bool = field(default=True, metadata={"help": "channels-last 3-D memory layout"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing run folders"})
    init: Path | None = field(default=None, metadata={
        "help": "fine-tune: start each variant from INIT/<variant> (a model bundle folder)"})
    source: str = field(default="auto", metadata={
        "help": "auto (gpu on CUDA, pool on the CPU)|gpu (synthesise every step)|pool (pre-rendered volumes)"})
    patch: tuple[int, ...] = field(default=(), metadata={
        "help": "train on patches of k,j,i voxels (multiples of the size divisor; default: whole grid, "
                "64,64,64 with the pool)"})
    lesion_fraction: float = field(default=1 / 3, metadata={"help": "share of patches centred on a lesion component"})
    core_weight: float = field(default=0.0, metadata={
        "help": "with --growth: also train the core head on the acute lesion, this weight times the same loss "
                "(so that the core is the core and the growth offset has the growth to explain)"})
    growth_lr_scale: float = field(default=1.0, metadata={
        "help": "with --growth: the growth head's learning rate over the schedule's (its clinical scalars start "
                "near neutral and must move much further than a fine-tune moves the rest)"})
    growth_l2: float = field(default=0.0, metadata={
        "help": "with --growth: ridge penalty, this weight times the mean square of each clinical feature's additive "
                "share of the growth offset (logits), so that features the data do not tie to growth stay near 0"})
    scenarios: int = field(default=0, metadata={
        "help": "pool: counterfactual onset/treatment scenarios rendered with each volume (their outcome and "
                "clinical values); a patch takes one of a volume's scenarios+1 at random (outcome task)"})
    mimic_fraction: float = field(default=0.0, metadata={
        "help": "pool: share of the other patches centred on a hard negative (DWI bright, ADC normal, away from "
                "lesions: what real-scan mimics look like)"})
    focus_fraction: float = field(default=0.0, metadata={
        "help": "pool: share of steps that train on a focus pair instead (a --focus-patch crop centred on a lesion "
                "under --focus-ml and one centred on a hard negative), so that whole-volume training still sees "
                "small foci and their mimics up close; 0: off"})
    focus_patch: tuple[int, ...] = field(default=(64, 64, 64), metadata={
        "help": "pool: the focus pair's crop in k,j,i voxels (multiples of the size divisor)"})
    focus_ml: float = field(default=1.0, metadata={"help": "pool: lesions under this volume (mL) are focus lesions"})
    grid_noise: tuple[float, ...] = field(default=(0.0, 0.0), metadata={
        "help": "LO,HI: also add the test-set generator's noise after the synthesis's acquisition blur: Rician, "
                "sigma U(LO, HI) x the white-matter b-image signal, spatially correlated, unit variance "
                "(0.05,0.11 is the generator's b0 SNR 18-40); 0,0: off"})
    pool_size: int = field(default=48, metadata={"help": "pre-rendered volumes held by the pool"})
    pool_refresh: int = field(default=1, metadata={"help": "fresh volumes swapped into the pool per step, at most"})
    pool_pause: float = field(default=6.0, metadata={
        "help": "seconds the pool's background renderer waits after each volume (0: render without pause)"})
    batch_dice: bool = field(default=True, metadata={
        "help": "Dice over the whole batch (nnU-Net's batch Dice; a patch cut through a lesion or holding none "
                "does not dominate the loss) instead of per image"})
    lesion_loss: float = field(default=0.0, metadata={
        "help": "add this weight times a per-lesion soft Dice (each ground-truth lesion scored with the others "
                "masked out; Kofler et al.'s blob loss, whose weighting is 0.5), so small lesions weigh as much "
                "as large ones; 0: the plain Dice + cross-entropy"})
    checkpoint_minutes: float = field(default=10.0, metadata={"help": "write last.pt at least this often"})
    patience: int = field(default=0, metadata={
        "help": "stop after this many validations (every --val-every steps) without a val Dice gain; best.pt keeps "
                "the best (0: train for the whole budget)"})
    snapshot_every: int = field(default=0, metadata={
        "help": "also keep checkpoints/step_NNNNNN.pt every this many steps, for python -m Training select "
                "(0: only last.pt and best.pt)"})
    resume: bool = field(default=False, metadata={"help": "continue OUT/<variant>/checkpoints/last.pt"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    film: bool = field(default=False, metadata={
        "help": "FiLM-condition the decoder of the fusion variants on the clinical context; from --init "
                "weights without FiLM the FiLM layers start at zero, so training starts from the same output"})
    growth: bool = field(default=False, metadata={
        "help": "growth head (outcome): a tissue-at-risk map shifted by a per-case offset from the clinical values, "
                "monotone in onset time and treatment; from --init weights without it the risk map starts as the "
                "old head's logits minus 2 (the imaging-only twin gets the same head with a constant offset)"})
    train_only: str = field(default="", metadata={
        "help": "'growth': train only the growth head (growth.*: the clinical shares, the onset and treatment "
                "curves, the bias), every other weight frozen at --init's, so the imaging network's overlap "
                "stays while the clinical behaviour is refitted; 'growth,risk': the growth head and the "
                "tissue-at-risk map's 1x1x1 head (risk.*) together, so the ranking of the tissue around the core "
                "can follow the refitted growth (needs --growth and --init)"})
    growth_reach: int = field(default=0, metadata={
        "help": "with --growth: hold growth back away from the predicted core, gated by the mean core probability "
                "in a cube of 2R+1 voxels (R voxels of the model grid; 0: no gate); from --init weights without "
                "the gate it starts almost open"})


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
    ignored = {"film", "growth", "growth_reach"} | ({"imaging_only"} if fallback else set())
    same = {k: v for k, v in ours.to_dict().items() if k not in ignored} == \
        {k: v for k, v in theirs.to_dict().items() if k not in ignored}
    if not same or (theirs.film and not ours.film) or (theirs.growth and not ours.growth) \
            or (theirs.growth_reach and theirs.growth_reach != ours.growth_reach) \
            or (fallback and theirs.imaging_only):
        raise cfg.ConfigError(f"Bundle {start_from.directory} has another architecture than variant '{name}' "
                              f"(imaging_only={ours.imaging_only}, film={ours.film}).")
    state = start_from.model.state_dict()
    if fallback:
        state = {k: v for k, v in state.items() if k in model.state_dict()}
    load_weights(model, state)  # type: ignore[arg-type]
    return Path(start_from.directory)


def initial_weights(folder: Path) -> dict:
    """Where a run's weights started (``data.initialised_from`` of its checkpoints and exported
    bundles): the ``--init`` bundle's name, version, weights sha256 and the training step of its own
    checkpoint, so that a fine-tuned bundle's steps are read as steps after that one's."""
    from StrokePredictorLib.bundle import read_metadata

    metadata = read_metadata(Path(folder) / "model.json")
    step = metadata.get("data", {}).get("training", {}).get("step")
    return {"bundle": metadata.get("name"), "version": metadata.get("version"),
            "sha256": metadata.get("weights", {}).get("sha256"), "step": step}


#: ``--train-only`` values and the parameter-name prefixes that stay trainable (every other weight is frozen).
TRAIN_ONLY = {"growth": ("growth.",), "growth,risk": ("growth.", "risk.")}


def train_only_prefixes(value: str) -> tuple[str, ...] | None:
    """The trainable prefixes of a ``--train-only`` value: ``()`` for none (train everything), ``None`` if unknown."""
    if not value:
        return ()
    return TRAIN_ONLY.get(",".join(part.strip() for part in value.split(",")))


def resolve_precision(name: str, device: torch.device, channels_last: bool = True) -> loop.Precision:
    """``--precision``: as :meth:`loop.Precision.resolve`, except that ``auto`` also takes bf16 on a CPU
    that computes it natively (the CPU recipe, about 1.9x faster than fp32 there; emulated it is about
    20x slower, so fp32 elsewhere)."""
    if name == "auto" and device.type == "cpu" and loop.native_bf16(device):
        name = "bf16"
    return loop.Precision.resolve(name, device, channels_last)


RESUMABLE = ("time_limit", "max_steps", "val_every", "checkpoint_minutes", "snapshot_every", "threads", "workers")


def _fits(crop: tuple[int, ...], divisor: int, grid_kji: tuple[int, ...]) -> bool:
    """A training crop is three sizes k, j, i, each a positive multiple of ``divisor`` within the grid."""
    return len(crop) == 3 and all(p > 0 and not p % divisor and p <= g for p, g in zip(crop, grid_kji, strict=False))


def _resolved_source(config: SynthTrainConfig, device: torch.device) -> str:
    source = config.source if config.source != "auto" else ("gpu" if device.type == "cuda" else "pool")
    if source not in ("gpu", "pool"):
        raise cfg.ConfigError(f"--source must be auto, gpu or pool, not '{config.source}'.")
    return source


def _resume_config(config: SynthTrainConfig, given: frozenset[str] | None = None) -> SynthTrainConfig:
    """The run's own saved config, with only the budget-like fields taken from the command line.

    ``given`` names the fields the user typed (``python -m Training train-synth`` passes them): only
    those are compared with the saved run, so a flag typed with its default value (``--workers 4``
    where the run saved 1) is a change, and a flag not typed keeps the saved value. None (a call
    from Python) cannot tell a default from a typed value: a field at its default keeps the saved value.
    """
    first = Path(config.out) / config.variants[0] / "train_synth_config.json"
    if not first.is_file() and (given is None or "variants" not in given) \
            and config.variants == SynthTrainConfig().variants:  # no --variants: the run's own
        first = next(iter(sorted(Path(config.out).glob("*/train_synth_config.json"))), first)
    if not first.is_file():
        raise cfg.ConfigError(f"Cannot resume: {first} does not exist (start without --resume).")
    saved = cfg.build(SynthTrainConfig, json.loads(first.read_text()), source=str(first))
    default = SynthTrainConfig()

    def typed_change(name: str) -> bool:
        if getattr(config, name) == getattr(saved, name):
            return False
        return name in given if given is not None else getattr(config, name) != getattr(default, name)

    typed = [f.name for f in dataclasses.fields(SynthTrainConfig)
             if f.name not in (*RESUMABLE, "resume", "out", "overwrite") and typed_change(f.name)]
    if typed:
        raise cfg.ConfigError(f"--resume continues {first.parent} with its own saved config; "
                              f"{', '.join('--' + n.replace('_', '-') for n in typed)} cannot change "
                              f"(only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} can).")
    # a budget-like field not typed keeps the run's own value (a --resume with only --time-limit must not reset
    # --workers, --threads or --val-every)
    changes = {name: getattr(config, name) for name in RESUMABLE if typed_change(name)}
    if any(getattr(config, name) < getattr(saved, name) for name in ("time_limit", "max_steps") if name in changes):
        raise cfg.ConfigError("--resume may extend --time-limit/--max-steps, not shorten them.")
    for name, value in changes.items():
        logger.info("resume: %s %s -> %s", name, getattr(saved, name), value)
    # the folder given now, not the saved one: a copied run folder continues in the copy
    return dataclasses.replace(saved, resume=True, out=config.out, **changes)


def run(config: SynthTrainConfig, given: frozenset[str] | None = None) -> dict[str, dict]:
    """Train every variant; returns {variant: {"run_dir", "best_val_dice", "steps", "seconds",
    "network_share", "skipped_steps"}} (also written to ``OUT/summary.json``). ``given`` names the
    fields the user typed (for ``--resume``; None: compare with the defaults)."""
    from monai.losses import DiceCELoss

    from StrokePredictorLib.bundle import recommended_grid, resolve_device
    from StrokePredictorLib.io import write_json
    from StrokePredictorLib.network import NetworkConfig, StrokeNet
    from StrokePredictorLib.preprocess import ModelGrid, Normalization
    from Training.synthesis.gpu_synth import GpuSynthesizer, Pack, SynthConfig
    from Training.training.losses import with_lesion_term
    from Training.training.sources import GpuSynthSource, PoolSource, cached_validation, synthetic_validation

    if config.resume:
        config = _resume_config(config, given)
    if config.threads:
        torch.set_num_threads(config.threads)
    variants = {name: _variant(name) for name in config.variants}
    device = resolve_device(config.device)
    source = _resolved_source(config, device)
    if config.precision not in ("auto", "bf16", "fp32"):
        raise cfg.ConfigError(f"--precision must be auto, bf16 or fp32, not '{config.precision}'.")
    if not config.max_steps and config.time_limit <= 0:
        raise cfg.ConfigError("Give the run a budget: --max-steps or --time-limit.")
    if train_only_prefixes(config.train_only) is None:
        raise cfg.ConfigError(f"--train-only must be one of {', '.join(repr(v) for v in TRAIN_ONLY)} (or empty), "
                              f"not '{config.train_only}'.")
    if config.train_only and not (config.growth and config.init is not None):
        raise cfg.ConfigError(f"--train-only {config.train_only} needs --growth and --init (the frozen weights come "
                              f"from --init).")
    if config.lesion_loss < 0:
        raise cfg.ConfigError(f"--lesion-loss must be >= 0, not {config.lesion_loss}.")
    try:
        synth_config = SynthConfig.with_grid_noise(config.grid_noise)
    except ValueError as error:
        raise cfg.ConfigError(f"--grid-noise {error}.") from None
    if config.snapshot_every < 0:
        raise cfg.ConfigError(f"--snapshot-every must be >= 0 (0: off), not {config.snapshot_every}.")
    if config.patience < 0:
        raise cfg.ConfigError(f"--patience must be >= 0 (0: off), not {config.patience}.")
    if not 0 <= config.focus_fraction <= 1 or config.focus_ml <= 0:
        raise cfg.ConfigError(f"--focus-fraction must lie in [0, 1] and --focus-ml be > 0, got "
                              f"{config.focus_fraction} and {config.focus_ml}.")
    if config.growth_l2 < 0 or (config.growth_l2 and not config.growth):
        raise cfg.ConfigError(f"--growth-l2 must be >= 0 and needs --growth, got {config.growth_l2}.")
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
    if not _fits(patch, divisor, grid_kji):
        raise cfg.ConfigError(f"--patch {','.join(map(str, patch))} must be three sizes k,j,i, multiples of "
                              f"{divisor}, within the grid {','.join(map(str, grid_kji))}.")
    focus_patch = tuple(config.focus_patch)
    if config.focus_fraction and (source != "pool" or not _fits(focus_patch, divisor, grid_kji)):
        raise cfg.ConfigError(f"--focus-fraction needs --source pool and a --focus-patch of three multiples of "
                              f"{divisor} within the grid {','.join(map(str, grid_kji))}, not "
                              f"{','.join(map(str, focus_patch))}.")
    if source == "gpu" and patch != grid_kji:
        raise cfg.ConfigError("--patch needs --source pool.")
    if config.val_subset not in ("val", "train") or not len(pack.indices(config.val_subset)):
        raise cfg.ConfigError(f"--val-subset {config.val_subset}: the pack {config.pack} has no such lesions.")
    synth = GpuSynthesizer(pack, grid.size, device, synth_config)
    cuda = device.type == "cuda"
    precision = resolve_precision(config.precision, device, config.channels_last)

    # fixed validation cases (never trained on): from held-out validation lesions, or the fixed sets' caches
    if config.val_cache:
        val_batches = cached_validation(config.val_cache, grid.size, {task for task, _ in variants.values()},
                                        max_cases=config.val_max_cases, device=device)
    else:
        val_batches = synthetic_validation(pack, synth, subset=config.val_subset, seed=config.seed,
                                           count=config.val_samples, batch_size=config.batch_size if cuda else 1,
                                           device=device)
    val_cases = sum(int(b["image"].shape[0]) for b in val_batches)
    data = {
        "source": "domain-randomised synthesis (Training.synthesis.gpu_synth) from MNI152 2009 anatomy and "
                  "real SOOP acute lesion masks with their participants' clinical values"
                  + (", pre-rendered pool of whole volumes cut into lesion-centred patches"
                     if source == "pool" else ""),
        "pack": Path(config.pack).name,
        "n_cases": {"train": int(len(pack.indices("train"))), "val": val_cases},
        "validation": ("fixed sets " + ", ".join(Path(c).name for c in config.val_cache) if config.val_cache
                       else "synthesised from held-out validation lesions"),
        "lesions": {s: int(len(pack.indices(s))) for s in ("train", "val", "test")},
    }
    members = []
    for name, (task, imaging_only) in variants.items():
        growth = config.growth and task == "outcome"
        net_config = NetworkConfig.from_dict({**preset.to_dict(), "imaging_only": imaging_only,
                                              "film": config.film and not imaging_only, "growth": growth,
                                              "growth_reach": config.growth_reach if growth else 0})
        model = StrokeNet(net_config)
        run_dir = Path(config.out) / name
        member_data = data
        if config.init is not None and not config.resume:
            member_data = {**data, "initialised_from": initial_weights(_initialise(model, config.init, name))}
        prefixes = train_only_prefixes(config.train_only)
        if prefixes:
            for parameter_name, parameter in model.named_parameters():
                parameter.requires_grad_(parameter_name.startswith(prefixes))
        checkpoint = None
        if config.resume:
            checkpoint = loop.load_checkpoint(run_dir / "checkpoints" / "last.pt")
            if "initialised_from" in checkpoint.get("data", {}):  # the run's starting weights, kept
                member_data = {**data, "initialised_from": checkpoint["data"]["initialised_from"]}
        elif (run_dir / "checkpoints" / "best.pt").exists() and not config.overwrite:
            raise cfg.ConfigError(f"Run folder {run_dir} holds a trained run; pass --resume to continue it or "
                                  "--overwrite to replace it.")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        cfg.save(config, run_dir / "train_synth_config.json")
        meta = {"network": net_config.to_dict(), "task": task, "grid": grid.to_dict(),
                "normalization": Normalization().to_dict(), "data": member_data,
                "config": {**cfg.to_dict(config), "imaging_only": imaging_only, "val_threshold": 0.5,
                           "augment": "gpu_synth" + ("+pool" if source == "pool" else "")}}
        members.append(loop.Member(name, task, model, run_dir, meta, checkpoint=checkpoint))

    shared = {"val_batches": val_batches,
              "generator": torch.Generator(device=device).manual_seed(config.seed),
              "clinical_drop_p": config.clinical_drop_p, "device": device}
    if source == "pool":
        data_source: loop.DataSource = PoolSource(
            config.pack, grid.size, patch=patch, task=members[0].task, batch_size=config.batch_size,
            lesion_fraction=config.lesion_fraction, mimic_fraction=config.mimic_fraction, scenarios=config.scenarios,
            size=config.pool_size, refresh=config.pool_refresh, pause=config.pool_pause, seed=config.seed,
            divisor=divisor, focus_fraction=config.focus_fraction, focus_patch=focus_patch,  # type: ignore[arg-type]
            focus_voxels=round(config.focus_ml * 1000 / math.prod(grid.spacing)), synth=synth_config, **shared)
    else:
        data_source = GpuSynthSource(pack, synth, batch_size=config.batch_size, reuse=config.reuse,
                                     workers=config.workers, seed=config.seed, **shared)
    options = loop.LoopOptions(
        schedule=loop.Schedule(config.lr, config.min_lr_ratio, config.warmup, steps=config.max_steps,
                               seconds=0.0 if config.max_steps else config.time_limit),
        epoch_steps=config.val_every, batch_size=config.batch_size, weight_decay=config.weight_decay,
        fused=cuda, grad_clip=config.grad_clip, checkpoint_minutes=config.checkpoint_minutes,
        snapshot_every=config.snapshot_every, core_weight=config.core_weight, growth_lr_scale=config.growth_lr_scale,
        growth_l2=config.growth_l2, patience=config.patience)
    loss_fn = with_lesion_term(
        DiceCELoss(sigmoid=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=config.batch_dice),
        config.lesion_loss)
    trained = loop.run_loop(members, data_source, loss_fn, precision, options, log=logger)
    results = {name: {"run_dir": r["run_dir"], "best_val_dice": r["best_val_dice"], "steps": r["steps"],
                      "seconds": round(r["seconds"], 1), "network_share": round(r["network_share"], 3),
                      "skipped_steps": r["skipped_steps"], "stopped": r["stopped"]}
               for name, r in trained.items()}
    write_json(results, Path(config.out) / "summary.json", overwrite=True)
    return results


def main(argv: list[str]) -> int:
    config, given = cfg.parse_given(SynthTrainConfig, argv,
                                    "Train on GPU-synthesised data (several variants in lockstep).",
                                    prog="python -m Training train-synth")
    print(json.dumps(run(config, given), indent=2))
    return 0
