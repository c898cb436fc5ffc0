"""Model bundles: the only thing Training hands to the Slicer module and the prediction CLI.

A bundle is a folder with two files:

* ``weights.safetensors``: the network's parameters (float32). Pickle-based formats
  (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pkl``) are never loaded: a bundle that contains one,
  or whose weights file is not a safetensors file, is refused.
* ``model.json``: everything needed to rebuild and use the network: architecture arguments
  (:class:`~StrokePredictorLib.network.NetworkConfig`), input modalities, model grid and spacing,
  intensity normalisation, clinical schema version, task (``acute`` lesion or ``outcome`` tissue),
  training data description, validation metrics, library version and the sha256 of the weights
  (checked on load).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from StrokePredictorLib import __version__
from StrokePredictorLib.clinical import FEATURE_NAMES, SCHEMA_VERSION
from StrokePredictorLib.errors import BundleError, StrokePredictorError
from StrokePredictorLib.io import (
    check_output_folder,
    ensure_writable_dir,
    ordinary_permissions,
    partial_dir,
    remove_created_dirs,
    remove_stale_partials,
)
from StrokePredictorLib.network import GROWTH_VOLUME_SETTINGS, NetworkConfig, StrokeNet, count_parameters
from StrokePredictorLib.postprocess import DEFAULT as DEFAULT_POSTPROCESSING
from StrokePredictorLib.postprocess import PostProcessing
from StrokePredictorLib.preprocess import CHANNELS, ModelGrid, Normalization

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "model.json"
BUNDLE_FORMAT = "strokepredictor-bundle"
BUNDLE_FORMAT_VERSION = 1
TASKS = ("acute", "outcome")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
ENV_BUNDLE = "STROKEPREDICTOR_BUNDLE"


# ----------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a torch device.

    ``auto`` picks CUDA when present and otherwise falls back to the CPU with a warning.

    Raises:
        StrokePredictorError: unknown device name, or CUDA requested but not available.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.warning("No CUDA GPU is available; running on the CPU.")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise StrokePredictorError(
                f"Device '{device}' was requested but no CUDA GPU is available; use cpu or auto."
            )
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise StrokePredictorError(
                f"Device '{device}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
        return torch.device(name)
    raise StrokePredictorError(f"Unknown device '{device}'; expected auto, cpu or cuda.")


# ----------------------------------------------------------------------------------------
# The schema of model.json: every field checked before anything is allocated
# ----------------------------------------------------------------------------------------
#: Largest model.json read (the shipped ones are about 3 KB).
MAX_METADATA_BYTES = 1024 * 1024
#: Largest weights file loaded (the lite model has 15 MB, the base preset about 130 MB).
MAX_WEIGHTS_BYTES = 1024 * 1024 * 1024
#: Largest safetensors header (names, shapes and offsets of a few hundred tensors: tens of KB).
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Bounds of the architecture (the presets use widths up to 320 and 4 heads).
MAX_CHANNELS = 1024
MAX_STAGES = 6
MAX_BLOCKS = 8
MAX_HEADS = 64
#: Model grid: voxels per axis, total voxels and spacing (mm).
GRID_SIZE_RANGE = (8, 512)
MAX_GRID_VOXELS = 256**3
GRID_SPACING_RANGE = (0.1, 10.0)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Schema:
    """Collects every violation of ``model.json`` (field, value, what was expected)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def bad(self, field_: str, value: object, expected: str) -> None:
        shown = json.dumps(value)[:60] if not isinstance(value, str) or len(value) < 60 else f'"{value[:57]}..."'
        self.problems.append(f"{field_} is {shown}, expected {expected}")

    def integer(self, field_: str, value: object, low: int, high: int) -> None:
        if not (_is_int(value) and low <= value <= high):
            self.bad(field_, value, f"an integer from {low} to {high}")

    def number(self, field_: str, value: object, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False) -> None:
        ok = _is_number(value) and (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
        if not ok:
            self.bad(field_, value, f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}"
                                    f"{')' if high_open else ']'}")

    def int_list(self, field_: str, value: object, length: tuple[int, int], low: int, high: int) -> bool:
        if not (isinstance(value, list) and length[0] <= len(value) <= length[1]
                and all(_is_int(v) and low <= v <= high for v in value)):
            count = f"{length[0]}" if length[0] == length[1] else f"{length[0]} to {length[1]}"
            self.bad(field_, value, f"a list of {count} integers from {low} to {high}")
            return False
        return True

    def raise_if_any(self) -> None:
        if self.problems:
            listed = "; ".join(self.problems[:8]) + (f"; and {len(self.problems) - 8} more" if len(self.problems) > 8
                                                      else "")
            raise BundleError(f"{self.path} is not a valid bundle description: {listed}.")


def _check_network_config(schema: _Schema, config: object) -> None:
    where = "architecture.config"
    if not isinstance(config, dict):
        schema.bad(where, config, "an object of network settings")
        return
    known = {f.name for f in dataclasses.fields(NetworkConfig)}
    for key in sorted(set(config) - known):
        schema.bad(f"{where}.{key}", config[key], f"no such field (known: {', '.join(sorted(known))})")
    get = config.get
    defaults = NetworkConfig()
    if "in_channels" in config and get("in_channels") != len(CHANNELS):
        schema.bad(f"{where}.in_channels", get("in_channels"), f"{len(CHANNELS)} (DWI, ADC, FLAIR)")
    for key in ("stem_channels", "head_channels", "fusion_dim"):
        if key in config:
            schema.integer(f"{where}.{key}", get(key), 1, MAX_CHANNELS)
    if "full_res_channels" in config:
        schema.integer(f"{where}.full_res_channels", get("full_res_channels"), 0, MAX_CHANNELS)
    if "stem_kernel" in config:
        schema.integer(f"{where}.stem_kernel", get("stem_kernel"), 1, 7)
    if "stem_stride" in config:
        schema.integer(f"{where}.stem_stride", get("stem_stride"), 1, 4)
    if "decoder_convs" in config:
        schema.integer(f"{where}.decoder_convs", get("decoder_convs"), 1, 4)
    if "heads" in config:
        schema.integer(f"{where}.heads", get("heads"), 1, MAX_HEADS)
    if "ffn_mult" in config:
        schema.integer(f"{where}.ffn_mult", get("ffn_mult"), 1, 8)
    switches = [f.name for f in dataclasses.fields(NetworkConfig) if isinstance(f.default, bool)]
    for key in switches:  # stem_pool, imaging_only, film and any later on/off setting
        if key in config and not isinstance(get(key), bool):
            schema.bad(f"{where}.{key}", get(key), "true or false")
    for key in ("mc_dropout", "attention_dropout", "feature_dropout"):
        if key in config:
            schema.number(f"{where}.{key}", get(key), 0.0, 1.0, high_open=True)
    widths = get("widths", list(defaults.widths))
    ok = schema.int_list(f"{where}.widths", widths, (2, MAX_STAGES), 1, MAX_CHANNELS)
    blocks = get("blocks", list(defaults.blocks))
    if schema.int_list(f"{where}.blocks", blocks, (2, MAX_STAGES), 1, MAX_BLOCKS) and ok and len(blocks) != len(widths):
        schema.bad(f"{where}.blocks", blocks, f"one entry per stage of widths ({len(widths)})")
    schema.int_list(f"{where}.decoder_widths", get("decoder_widths", list(defaults.decoder_widths)),
                    (1, MAX_STAGES + 2), 1, MAX_CHANNELS)
    if get("film") is True and get("imaging_only") is True:
        schema.bad(f"{where}.film", True, "false when imaging_only is true (FiLM needs the clinical branch)")
    if get("growth_volume") is True and (get("growth") is not True or get("growth_reach", 0) != 0):
        schema.bad(f"{where}.growth_volume", True, "false unless growth is true and growth_reach is 0")
    ranges = {"growth_tissue_adc_max": (0.0, 1e6, False), "growth_seed_probability": (0.0, 1.0, True)}
    for key in GROWTH_VOLUME_SETTINGS:  # growth by volume alone: the default unless growth_volume
        if key in config:
            default = getattr(defaults, key)
            if key in ranges:  # the switches' type is checked above
                low, high, open_range = ranges[key]
                schema.number(f"{where}.{key}", get(key), low, high, low_open=open_range, high_open=open_range)
            if get(key) != default and get("growth_volume") is not True:
                shown = str(default).lower() if isinstance(default, bool) else f"{default:g}"
                schema.bad(f"{where}.{key}", get(key), f"{shown} unless growth_volume is true")
    if get("clinical_blind") is True and get("imaging_only") is True:
        schema.bad(f"{where}.clinical_blind", True, "false when imaging_only is true (it keeps the clinical branch)")
    fusion, heads = get("fusion_dim", defaults.fusion_dim), get("heads", defaults.heads)
    if _is_int(fusion) and _is_int(heads) and heads > 0 and fusion % heads:
        schema.bad(f"{where}.fusion_dim", fusion, f"a multiple of heads ({heads})")


def validate_metadata(metadata: object, path: Path) -> None:
    """Type- and range-check every field of a bundle's ``model.json`` (already parsed, with NaN and
    infinity refused by the parser).

    Raises:
        BundleError: listing each invalid field with its value and what was expected.
    """
    schema = _Schema(path)
    if not isinstance(metadata, dict):
        raise BundleError(f"{path} is not a StrokePredictor bundle description (a JSON object is expected).")
    if metadata.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a StrokePredictor bundle description (format '{BUNDLE_FORMAT}').")
    version = metadata.get("format_version")
    if _is_int(version) and version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format version {version}; this library ({__version__}) reads up to "
            f"{BUNDLE_FORMAT_VERSION}. Update StrokePredictor."
        )
    schema.integer("format_version", version, 1, BUNDLE_FORMAT_VERSION)
    if metadata.get("task") not in TASKS:
        schema.bad("task", metadata.get("task"), f"one of {', '.join(TASKS)}")
    for key in ("name", "version"):
        if key in metadata and not isinstance(metadata[key], str):
            schema.bad(key, metadata[key], "a string")
    architecture = metadata.get("architecture")
    if not isinstance(architecture, dict):
        schema.bad("architecture", architecture, "an object with the network's config")
    else:
        _check_network_config(schema, architecture.get("config"))
        if "parameters" in architecture:
            schema.integer("architecture.parameters", architecture["parameters"], 1, MAX_WEIGHTS_BYTES // 2)
    grid = metadata.get("grid")
    if not isinstance(grid, dict):
        schema.bad("grid", grid, "an object with size and spacing")
    else:
        if schema.int_list("grid.size", grid.get("size"), (3, 3), *GRID_SIZE_RANGE):
            if math.prod(grid["size"]) > MAX_GRID_VOXELS:
                schema.bad("grid.size", grid["size"], f"at most {MAX_GRID_VOXELS} voxels in all")
        spacing = grid.get("spacing")
        if not (isinstance(spacing, list) and len(spacing) == 3 and all(
                _is_number(v) and GRID_SPACING_RANGE[0] <= v <= GRID_SPACING_RANGE[1] for v in spacing)):
            schema.bad("grid.spacing", spacing, f"three finite spacings from {GRID_SPACING_RANGE[0]} to "
                                                f"{GRID_SPACING_RANGE[1]} mm")
    normalization = metadata.get("normalization", {})
    if not isinstance(normalization, dict):
        schema.bad("normalization", normalization, "an object")
    else:
        if "clip_relative" in normalization:
            schema.number("normalization.clip_relative", normalization["clip_relative"], 0.0, 1000.0, low_open=True)
        scale = normalization.get("adc_scale", 1000.0)
        schema.number("normalization.adc_scale", scale, 1.0, 1e7)
        clip = normalization.get("adc_clip", 4.0)
        schema.number("normalization.adc_clip", clip, 0.0, 1e6, low_open=True)
        if _is_number(scale) and _is_number(clip) and scale > 0 and clip / scale > 0.1:
            schema.bad("normalization.adc_clip", clip, f"at most 0.1 mm^2/s once divided by adc_scale ({scale:g})")
    if not isinstance(metadata.get("clinical_schema_version"), str):
        schema.bad("clinical_schema_version", metadata.get("clinical_schema_version"), f"a string such as "
                                                                                       f"'{SCHEMA_VERSION}'")
    weights = metadata.get("weights")
    if not isinstance(weights, dict):
        schema.bad("weights", weights, "an object with file, sha256 and bytes")
    else:
        name = weights.get("file", WEIGHTS_FILE)
        if not (isinstance(name, str) and Path(name).name == name and name.endswith(".safetensors")
                and not name.startswith(".")):
            schema.bad("weights.file", name, "the name of a .safetensors file in the bundle folder")
        if not (isinstance(weights.get("sha256"), str) and _SHA256.match(weights["sha256"])):
            schema.bad("weights.sha256", weights.get("sha256"), "64 lower-case hexadecimal digits")
        if "bytes" in weights:
            schema.integer("weights.bytes", weights["bytes"], 16, MAX_WEIGHTS_BYTES)
        if weights.get("dtype", "float32") != "float32":
            schema.bad("weights.dtype", weights.get("dtype"), '"float32"')
    for key in ("data", "metrics", "inputs"):
        if key in metadata and not isinstance(metadata[key], dict):
            schema.bad(key, metadata[key], "an object")
    if "postprocessing" in metadata and not isinstance(metadata["postprocessing"], (dict, type(None))):
        schema.bad("postprocessing", metadata["postprocessing"], "an object")
    if "growth_seed" in metadata:
        config = architecture.get("config") if isinstance(architecture, dict) else None
        if not isinstance(metadata["growth_seed"], dict):
            schema.bad("growth_seed", metadata["growth_seed"], "an object (a post-processing block)")
        elif not (isinstance(config, dict) and config.get("growth_volume") is True):
            schema.bad("growth_seed", "a block", "absent unless architecture.config.growth_volume is true")
    schema.raise_if_any()


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a valid number in a bundle description")


def read_metadata(path: Path) -> dict:
    """Read and validate ``model.json`` (a regular file of at most :data:`MAX_METADATA_BYTES`).

    Raises:
        BundleError: missing, not a regular file, too large, not UTF-8 JSON, NaN/Infinity anywhere,
            or any field out of its schema (:func:`validate_metadata`).
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise BundleError(f"Model bundle {path.parent} has no {path.name}.") from None
    except OSError as error:
        raise BundleError(f"{path} cannot be read: {error.strerror or error}.") from None
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"{path} is not a regular file.")
    if info.st_size > MAX_METADATA_BYTES:
        raise BundleError(f"{path} has {info.st_size} bytes; a bundle description has at most {MAX_METADATA_BYTES}.")
    try:
        metadata = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise BundleError(f"{path} is not valid JSON: {error}.") from None
    validate_metadata(metadata, path)
    return metadata


def _read_weights(path: Path, declared_bytes: int | None) -> bytes:
    """The bytes of a weights file, opened only if it is a regular file of a plausible size (never
    a FIFO, a device such as /dev/zero, or a folder)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise BundleError(f"Model bundle {path.parent} has no weights file {path.name}.") from None
    except OSError as error:
        raise BundleError(f"Weights {path} cannot be read: {error.strerror or error}.") from None
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"Weights {path} is not a regular file (a device, FIFO or folder); refusing to read it.")
    if declared_bytes is not None and info.st_size != declared_bytes:
        raise BundleError(
            f"Weights {path} has {info.st_size} bytes where model.json declares {declared_bytes}: the file was "
            "modified, truncated or replaced; re-export or re-download the bundle."
        )
    if info.st_size > MAX_WEIGHTS_BYTES:
        raise BundleError(
            f"Weights {path} has {info.st_size} bytes, more than the {MAX_WEIGHTS_BYTES} a bundle may hold."
        )
    with path.open("rb") as handle:
        data = handle.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise BundleError(f"Weights {path} changed size while being read.")
    return data


def _safetensors_shapes(data: bytes, path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, after checking that it is one (no pickle,
    a bounded JSON header, float32 tensors whose byte ranges lie inside the file)."""
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise BundleError(f"Weights file {path} is a pickled PyTorch file; only safetensors weights are loaded.")
    if len(data) < 10:
        raise BundleError(f"Weights file {path} is not a safetensors file (only {len(data)} bytes).")
    (header_length,) = struct.unpack("<Q", data[:8])
    if not 2 <= header_length <= min(MAX_HEADER_BYTES, len(data) - 8) or data[8:9] != b"{":
        raise BundleError(f"Weights file {path} is not a safetensors file (invalid header).")
    try:
        header = json.loads(data[8:8 + header_length].decode("utf-8"))
    except (ValueError, RecursionError):
        raise BundleError(f"Weights file {path} is not a safetensors file (unreadable header).") from None
    if not isinstance(header, dict):
        raise BundleError(f"Weights file {path} is not a safetensors file (invalid header).")
    shapes: dict[str, tuple[int, ...]] = {}
    payload = len(data) - 8 - header_length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            dtype = entry["dtype"]
            valid = (all(_is_int(n) and n >= 0 for n in shape) and _is_int(begin) and _is_int(end)
                     and 0 <= begin <= end <= payload)
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise BundleError(f"Weights file {path}: the header entry of tensor '{name}' is invalid.")
        size = {"F32": 4, "I64": 8, "F16": 2, "BF16": 2, "I32": 4, "F64": 8}.get(dtype)
        if size is None or (end - begin) != size * math.prod(shape):
            raise BundleError(f"Weights file {path}: tensor '{name}' ({dtype}, shape {list(shape)}) does not match "
                              "its byte range.")
        shapes[name] = shape
    return shapes


def _check_weights_fit(config: NetworkConfig, shapes: dict[str, tuple[int, ...]], weights_path: Path,
                       metadata_path: Path, declared_parameters: int | None) -> None:
    """Compare the network ``config`` describes (built on the meta device: no memory) with the
    tensors of the weights' header, before the real network is allocated."""
    with torch.device("meta"):
        skeleton = StrokeNet(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    parameters = count_parameters(skeleton)
    stored = sum(math.prod(shapes[k]) for k in expected if k in shapes)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            details.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}: {list(shapes[wrong[0]])} where the "
                           f"architecture needs {list(expected[wrong[0]])})")
        raise BundleError(
            f"Weights {weights_path} do not fit the architecture in {metadata_path} ({parameters} parameters "
            f"described, {stored} stored): {'; '.join(details)}."
        )
    if declared_parameters is not None and declared_parameters != parameters:
        raise BundleError(
            f"{metadata_path}: architecture.parameters is {declared_parameters}, but the architecture it describes has "
            f"{parameters} parameters."
        )


# ----------------------------------------------------------------------------------------
# The bundle
# ----------------------------------------------------------------------------------------
@dataclass
class Bundle:
    """A loaded model bundle.

    Attributes:
        model: the network, in eval mode, on the requested device.
        config: its architecture.
        metadata: the content of ``model.json``.
        grid: model grid (voxels along i, j, k and spacing in mm).
        normalization: intensity normalisation the network was trained with.
        task: ``acute`` or ``outcome``.
        directory: the bundle folder.
        postprocessing: threshold, flip averaging and smallest component, chosen on validation
            data (:mod:`StrokePredictorLib.postprocess`); the defaults when ``model.json`` has none.
        growth_seed: for an outcome network that grows by volume, the block that turns its core
            head's Monte-Carlo mean (flip-averaged when the block says so) into the core that grows:
            the acute bundle's own block, so that the outcome grows from the lesion the acute model
            reports (``model.json`` ``growth_seed``); None: the network's deterministic core.
    """

    model: StrokeNet
    config: NetworkConfig
    metadata: dict
    grid: ModelGrid
    normalization: Normalization
    task: str
    directory: Path
    postprocessing: PostProcessing = DEFAULT_POSTPROCESSING
    growth_seed: PostProcessing | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", self.directory.name))

    @property
    def sha256(self) -> str:
        return str(self.metadata["weights"]["sha256"])

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))

    def describe(self) -> dict:
        """Name, task, version and weights checksum (for summaries)."""
        return {"name": self.name, "task": self.task, "version": self.version, "sha256": self.sha256}


def default_bundle_dir(task: str = "acute") -> Path:
    """The bundle to use when none is given: ``$STROKEPREDICTOR_BUNDLE`` if set, else the bundled
    model ``<repo>/StrokePredictor/Resources/Models/<task>``."""
    override = os.environ.get(ENV_BUNDLE)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / "StrokePredictor" / "Resources" / "Models" / task


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state_dict_for_saving(model: StrokeNet) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.float()
        state[key] = tensor.contiguous().clone()
    return state


def save_bundle(
    directory: str | os.PathLike,
    model: StrokeNet,
    *,
    task: str,
    grid: ModelGrid,
    normalization: Normalization,
    data: dict,
    metrics: dict,
    overwrite: bool = False,
    name: str | None = None,
    version: str | None = None,
    postprocessing: PostProcessing | None = None,
    growth_seed: PostProcessing | None = None,
) -> Path:
    """Write ``weights.safetensors`` and ``model.json`` into ``directory`` atomically.

    A new bundle is assembled in a temporary sibling folder (ordinary permissions) and renamed into
    place, so a reader never sees half a bundle. ``overwrite`` replaces only a folder that holds a
    StrokePredictor bundle (its ``model.json`` is the bundle's marker), and in it only
    ``weights.safetensors`` and ``model.json``: other files (a model card, notes) are kept, and any
    other non-empty folder is refused.

    Args:
        directory: bundle folder to create.
        model: the trained network (its ``config`` is stored).
        task: ``"acute"`` (lesion on the acute DWI) or ``"outcome"`` (follow-up infarct).
        grid: model grid; every size must be divisible by ``model.size_divisor``.
        normalization: the intensity normalisation used in training.
        data: description of the training data (source, number of cases, split...).
        metrics: validation metrics (e.g. ``{"dice": 0.71}``).
        overwrite: replace an existing bundle.
        name: bundle name (default: the folder name).
        version: bundle version (default: the library version).
        postprocessing: stored under ``postprocessing`` when given (``python -m Training
            postprocess`` chooses it on validation data).
        growth_seed: stored under ``growth_seed`` when given (:attr:`Bundle.growth_seed`; growth by
            volume only).

    Returns:
        The bundle folder.

    Raises:
        OutputExistsError: ``directory`` is not empty and ``overwrite`` is False, or it is not a
            bundle folder, or it cannot be written.
        ValueError: unknown task or a grid the network cannot take.
    """
    from safetensors.torch import save

    directory = Path(directory)
    if task not in TASKS:
        raise ValueError(f"Unknown task '{task}'; expected one of {', '.join(TASKS)}.")
    bad = [s for s in grid.size if s % model.size_divisor]
    if bad:
        raise ValueError(f"Model grid {grid.size} is not divisible by the network's size divisor {model.size_divisor}.")
    check_bundle_destination(directory, overwrite)
    payload = save(_state_dict_for_saving(model), metadata={"format": "pt", "library": "strokepredictor"})
    metadata = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "name": name or directory.name,
        "version": version or __version__,
        "task": task,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": {
            "class": "StrokeNet",
            "config": model.config.to_dict(),
            "parameters": count_parameters(model),
            "size_divisor": model.size_divisor,
        },
        "inputs": {
            "modalities": list(CHANNELS),
            "required": ["dwi", "adc"],
            "optional": ["flair"],
            "clinical_features": list(FEATURE_NAMES),
        },
        "grid": {**grid.to_dict(), "axes": "i, j, k of the model grid; arrays are (K, J, I)"},
        "normalization": normalization.to_dict(),
        "clinical_schema_version": SCHEMA_VERSION,
        "data": data,
        "metrics": metrics,
        **({"postprocessing": postprocessing.to_dict()} if postprocessing is not None else {}),
        **({"growth_seed": growth_seed.to_dict()} if growth_seed is not None else {}),
        "library_version": __version__,
        "torch_version": torch.__version__,
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(payload), "bytes": len(payload), "dtype": "float32"},
    }
    try:
        text = json.dumps(metadata, indent=2, default=str, allow_nan=False) + "\n"
    except ValueError:
        raise BundleError("The bundle description holds NaN or infinity (in data, metrics or settings); refusing "
                          "to write invalid JSON.") from None
    validate_metadata(json.loads(text), directory / METADATA_FILE)
    _write_bundle_files(directory, {WEIGHTS_FILE: payload, METADATA_FILE: text.encode()})
    logger.info("Saved %s bundle %s (%d parameters).", task, directory, count_parameters(model))
    return directory


def check_bundle_destination(directory: str | os.PathLike, overwrite: bool) -> None:
    """Check, before any work, that a bundle may be written to ``directory``: it does not exist,
    is empty, or (with ``overwrite``) holds a bundle; and its nearest existing folder is writable.

    Raises:
        OutputExistsError: see :func:`StrokePredictorLib.io.check_output_folder`, or not writable.
    """
    directory = Path(directory)
    check_output_folder(directory, "bundle", overwrite=overwrite, option="Bundle folder")
    existing = next(p for p in (directory, *directory.parents) if p.exists() or p.is_symlink())
    remove_created_dirs(ensure_writable_dir(existing, option="Bundle folder"))


def _write_bundle_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` as a bundle at ``directory``: a new folder is renamed into place whole;
    in an existing (bundle or empty) folder the files are staged inside it and renamed one by one."""
    created = ensure_writable_dir(directory.parent, option="Bundle folder")
    try:
        if not directory.exists():
            remove_stale_partials(directory.parent)  # left by a killed export (recognised by name and process)
            staging = partial_dir(directory.parent)
            try:
                for name, data in files.items():
                    (staging / name).write_bytes(data)
                    ordinary_permissions(staging / name, directory=False)
                os.replace(staging, directory)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            remove_stale_partials(directory)
            staging = partial_dir(directory)
            try:
                for name, data in files.items():
                    (staging / name).write_bytes(data)
                    ordinary_permissions(staging / name, directory=False)
                for name in files:
                    os.replace(staging / name, directory / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        remove_created_dirs(created)
        raise BundleError(f"Bundle folder {directory} could not be written: {error.strerror or error}.") from None


def _check_safetensors(data: bytes, path: Path) -> None:
    """Refuse anything that is not a safetensors file (notably pickles and zip archives)."""
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise BundleError(f"Weights file {path} is a pickled PyTorch file; only safetensors weights are loaded.")
    if len(data) < 10:
        raise BundleError(f"Weights file {path} is not a safetensors file (only {len(data)} bytes).")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length <= 0 or 8 + header_length > len(data) or data[8:9] != b"{":
        raise BundleError(f"Weights file {path} is not a safetensors file (invalid header).")


def load_bundle(directory: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Bundle:
    """Load and verify a bundle.

    Args:
        directory: bundle folder (default: :func:`default_bundle_dir`).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

    Raises:
        BundleError: folder or files missing, pickled or non-safetensors weights, checksum
            mismatch, unreadable or incompatible ``model.json``, weights that do not fit the architecture.
        StrokePredictorError: unknown or unavailable device.
    """
    directory = Path(directory) if directory is not None else default_bundle_dir()
    if not directory.is_dir():
        raise BundleError(f"Model bundle {directory} does not exist (expected a folder with {METADATA_FILE} "
                          f"and {WEIGHTS_FILE}).")
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise BundleError(
            f"Model bundle {directory} contains pickled weights ({', '.join(pickles)}); pickles are never loaded. "
            f"Export the model with save_bundle to {WEIGHTS_FILE}."
        )
    metadata_path = directory / METADATA_FILE
    metadata = read_metadata(metadata_path)
    try:
        weights_info = metadata["weights"]
        expected_sha = str(weights_info["sha256"])
        weights_name = str(weights_info.get("file", WEIGHTS_FILE))
        config = NetworkConfig.from_dict(metadata["architecture"]["config"])
        grid = ModelGrid.from_dict(metadata["grid"])
        normalization = Normalization.from_dict(metadata.get("normalization", {}))
        task = str(metadata["task"])
        postprocessing = PostProcessing.from_dict(metadata.get("postprocessing"))
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{metadata_path} is incomplete or invalid: {error}.") from None
    try:
        growth_seed = PostProcessing.from_dict(metadata["growth_seed"]) if "growth_seed" in metadata else None
    except (TypeError, ValueError) as error:  # the block's messages name postprocessing.<field>
        raise BundleError(f"{metadata_path}: invalid growth_seed block ({error}).") from None
    schema_major = str(metadata.get("clinical_schema_version", "")).split(".")[0]
    if schema_major != SCHEMA_VERSION.split(".")[0]:
        raise BundleError(
            f"{metadata_path}: clinical schema version {metadata.get('clinical_schema_version')} is incompatible "
            f"with this library's {SCHEMA_VERSION}."
        )
    if any(s % config.size_divisor for s in grid.size):
        raise BundleError(
            f"{metadata_path}: grid {grid.size} is not divisible by the size divisor {config.size_divisor}."
        )
    weights_path = directory / weights_name
    payload = _read_weights(weights_path, weights_info.get("bytes"))
    shapes = _safetensors_shapes(payload, weights_path)
    actual_sha = _sha256(payload)
    if actual_sha != expected_sha:
        raise BundleError(
            f"Weights {weights_path} fail their checksum (sha256 {actual_sha[:12]}..., model.json expects "
            f"{expected_sha[:12]}...): the file was modified or corrupted; re-export or re-download the bundle."
        )
    _check_weights_fit(config, shapes, weights_path, metadata_path, metadata["architecture"].get("parameters"))
    from safetensors.torch import load

    try:
        state = load(payload)
    except Exception as error:  # safetensors raises its own error types
        raise BundleError(f"Weights file {weights_path} could not be decoded as safetensors: {error}.") from None
    bad_values = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad_values:
        raise BundleError(f"Weights {weights_path} hold NaN or infinite values (e.g. in {bad_values[0]}).")
    model = StrokeNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise BundleError(f"Weights {weights_path} do not fit the architecture in {metadata_path}: {first}") from None
    model.to(resolve_device(device)).eval()
    logger.info("Loaded %s bundle %s (sha256 %s).", task, directory, actual_sha[:12])
    return Bundle(model, config, metadata, grid, normalization, task, directory, postprocessing, growth_seed)


# Model grids the presets are meant for (i, j, k voxels and mm). LITE covers an adult brain at
# 2 mm (192 x 224 x 160 mm, room for head tilt) and is divisible by the lite size divisor 16.
LITE_GRID = ModelGrid((96, 112, 80), (2.0, 2.0, 2.0))
BASE_GRID = ModelGrid((128, 128, 128), (1.5, 1.5, 1.5))


def recommended_grid(config: NetworkConfig) -> ModelGrid:
    """:data:`LITE_GRID` for configurations with size divisor 16 or less, else :data:`BASE_GRID`."""
    return LITE_GRID if config.size_divisor <= 16 else BASE_GRID
