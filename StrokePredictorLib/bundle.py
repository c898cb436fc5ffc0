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

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from StrokePredictorLib import __version__
from StrokePredictorLib.clinical import FEATURE_NAMES, SCHEMA_VERSION
from StrokePredictorLib.errors import BundleError, OutputExistsError, StrokePredictorError
from StrokePredictorLib.network import NetworkConfig, StrokeNet, count_parameters
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
    """

    model: StrokeNet
    config: NetworkConfig
    metadata: dict
    grid: ModelGrid
    normalization: Normalization
    task: str
    directory: Path
    postprocessing: PostProcessing = DEFAULT_POSTPROCESSING

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
) -> Path:
    """Write ``weights.safetensors`` and ``model.json`` into ``directory`` atomically.

    The bundle is assembled in a temporary sibling folder and renamed into place, so a reader
    never sees half a bundle.

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

    Returns:
        The bundle folder.

    Raises:
        OutputExistsError: ``directory`` exists and ``overwrite`` is False.
        ValueError: unknown task or a grid the network cannot take.
    """
    from safetensors.torch import save

    directory = Path(directory)
    if task not in TASKS:
        raise ValueError(f"Unknown task '{task}'; expected one of {', '.join(TASKS)}.")
    bad = [s for s in grid.size if s % model.size_divisor]
    if bad:
        raise ValueError(f"Model grid {grid.size} is not divisible by the network's size divisor {model.size_divisor}.")
    if directory.exists() and not overwrite:
        raise OutputExistsError(f"Bundle folder {directory} exists already; pass overwrite=True to replace it.")
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
        "library_version": __version__,
        "torch_version": torch.__version__,
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(payload), "bytes": len(payload), "dtype": "float32"},
    }
    text = json.dumps(metadata, indent=2, default=str) + "\n"
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        (temporary / WEIGHTS_FILE).write_bytes(payload)
        (temporary / METADATA_FILE).write_text(text)
        if directory.exists():
            old = directory.with_name(f".{directory.name}-old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(temporary, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, directory)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    logger.info("Saved %s bundle %s (%d parameters).", task, directory, count_parameters(model))
    return directory


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
    try:
        metadata = json.loads(metadata_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"Model bundle {directory} has no {METADATA_FILE}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{metadata_path} is not valid JSON: {error}.") from None
    if not isinstance(metadata, dict) or metadata.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{metadata_path} is not a StrokePredictor bundle description (format '{BUNDLE_FORMAT}').")
    if int(metadata.get("format_version", 0)) > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{metadata_path} has bundle format version {metadata.get('format_version')}; this library "
            f"({__version__}) reads up to {BUNDLE_FORMAT_VERSION}. Update StrokePredictor."
        )
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
        raise BundleError(f"{metadata_path} is incomplete or invalid: {error!r}.") from None
    if task not in TASKS:
        raise BundleError(f"{metadata_path}: unknown task '{task}'; expected one of {', '.join(TASKS)}.")
    if Path(weights_name).name != weights_name or not weights_name.endswith(".safetensors"):
        raise BundleError(f"{metadata_path}: weights file '{weights_name}' is not a .safetensors file in the bundle.")
    schema_major = str(metadata.get("clinical_schema_version", "")).split(".")[0]
    if schema_major != SCHEMA_VERSION.split(".")[0]:
        raise BundleError(
            f"{metadata_path}: clinical schema version {metadata.get('clinical_schema_version')} is incompatible "
            f"with this library's {SCHEMA_VERSION}."
        )
    weights_path = directory / weights_name
    try:
        payload = weights_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"Model bundle {directory} has no weights file {weights_name}.") from None
    _check_safetensors(payload, weights_path)
    actual_sha = _sha256(payload)
    if actual_sha != expected_sha:
        raise BundleError(
            f"Weights {weights_path} fail their checksum (sha256 {actual_sha[:12]}..., model.json expects "
            f"{expected_sha[:12]}...): the file was modified or corrupted; re-export or re-download the bundle."
        )
    from safetensors.torch import load

    try:
        state = load(payload)
    except Exception as error:  # safetensors raises its own error types
        raise BundleError(f"Weights file {weights_path} could not be decoded as safetensors: {error}.") from None
    model = StrokeNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise BundleError(f"Weights {weights_path} do not fit the architecture in {metadata_path}: {first}") from None
    bad = [s for s in grid.size if s % model.size_divisor]
    if bad:
        raise BundleError(
            f"{metadata_path}: grid {grid.size} is not divisible by the size divisor {model.size_divisor}."
        )
    model.to(resolve_device(device)).eval()
    logger.info("Loaded %s bundle %s (sha256 %s).", task, directory, actual_sha[:12])
    return Bundle(model, config, metadata, grid, normalization, task, directory, postprocessing)


# Model grids the presets are meant for (i, j, k voxels and mm). LITE covers an adult brain at
# 2 mm (192 x 224 x 160 mm, room for head tilt) and is divisible by the lite size divisor 16.
LITE_GRID = ModelGrid((96, 112, 80), (2.0, 2.0, 2.0))
BASE_GRID = ModelGrid((128, 128, 128), (1.5, 1.5, 1.5))


def recommended_grid(config: NetworkConfig) -> ModelGrid:
    """:data:`LITE_GRID` for configurations with size divisor 16 or less, else :data:`BASE_GRID`."""
    return LITE_GRID if config.size_divisor <= 16 else BASE_GRID
