"""Image input/output with exact physical geometry, and ISLES 2022 discovery.

Conventions (the same as Slicer's ``slicer.util.arrayFromVolume`` and SimpleITK):

* a volume is a numpy array indexed ``[k, j, i]`` (slice, row, column);
* :class:`Geometry` describes the grid in ITK/LPS terms: ``size`` and ``spacing`` in ``(i, j, k)``
  order, ``origin`` (mm, LPS) of voxel ``(0, 0, 0)`` and ``direction`` (3x3, columns are the unit
  vectors of the i, j, k axes in LPS);
* ``Geometry.ijk_to_ras`` is Slicer's ``IJKToRAS`` matrix, which is also the nibabel affine of the
  same file (voxel ``(i, j, k)`` to RAS+ millimetres).

NIfTI files whose qform and sform disagree are read with the **qform** when its code is set,
because that is what 3D Slicer does (Slicer's NIfTI reader prefers the qform); a NIfTI viewer that
prefers the sform would place such an image elsewhere, and we want the Slicer module and the
command line to agree. When only the sform is coded it is used. The choice made is logged.

All writers are atomic: the file is written under a temporary name in the destination folder and
renamed, so an interrupted run never leaves a half-written output.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from StrokePredictorLib._lazy import sitk
from StrokePredictorLib.errors import InputImageError, OutputExistsError

logger = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Physical grid of a 3-D volume (ITK conventions, LPS world coordinates).

    Attributes:
        size: number of voxels along i, j, k.
        spacing: voxel size along i, j, k in mm.
        origin: LPS position (mm) of the centre of voxel (0, 0, 0).
        direction: 3x3 matrix whose columns are the LPS unit vectors of the i, j, k axes.
            May be left-handed (determinant -1).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        object.__setattr__(self, "direction", tuple(direction.ravel().tolist()))
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("Geometry needs three sizes, spacings and origin coordinates.")
        if min(self.spacing) <= 0:
            raise ValueError(f"Voxel spacing must be positive, got {self.spacing}.")

    # -- derived quantities -------------------------------------------------------------
    @property
    def direction_matrix(self) -> np.ndarray:
        """3x3 direction cosines (columns = i, j, k axes in LPS)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Numpy shape of an array on this grid: ``(k, j, i)``."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel index (i, j, k, 1) to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping voxel index (i, j, k, 1) to RAS mm: Slicer's IJKToRAS and the
        nibabel affine."""
        matrix = self.ijk_to_lps
        matrix[:3, :] = _LPS_TO_RAS @ matrix[:3, :]
        return matrix

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray, size: tuple[int, int, int]) -> Geometry:
        """Build a geometry from a Slicer IJKToRAS matrix or a nibabel affine.

        Args:
            matrix: 4x4 voxel-to-RAS matrix (rotation and scaling, no shear).
            size: voxels along i, j, k.
        """
        matrix = np.asarray(matrix, dtype=float)
        lps = _LPS_TO_RAS @ matrix[:3, :]
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        if np.any(spacing <= 0):
            raise ValueError("The IJK-to-RAS matrix has a zero-length axis.")
        direction = lps[:3, :3] / spacing[None, :]
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError("The IJK-to-RAS matrix has shear; only rotations and scaling are supported.")
        return cls(tuple(size), tuple(spacing), tuple(lps[:3, 3]), tuple(direction.ravel()))

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    # -- operations -----------------------------------------------------------------------
    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry on a SimpleITK image (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map continuous voxel indices ``(..., 3)`` in (i, j, k) order to LPS mm."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ (self.direction_matrix * np.asarray(self.spacing)).T + np.asarray(self.origin)

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """Map LPS mm ``(..., 3)`` to continuous voxel indices (i, j, k)."""
        lps = np.asarray(lps, dtype=float) - np.asarray(self.origin)
        inverse = np.linalg.inv(self.direction_matrix * np.asarray(self.spacing))
        return lps @ inverse.T

    def corners_lps(self) -> np.ndarray:
        """The 8 corner voxel centres in LPS mm, shape (8, 3)."""
        size = np.asarray(self.size) - 1
        corners = np.array([[a, b, c] for a in (0, size[0]) for b in (0, size[1]) for c in (0, size[2])])
        return self.index_to_lps(corners)

    def bounds_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS bounding box (min, max) of the voxel volume, including half voxels."""
        half = np.abs(self.direction_matrix * np.asarray(self.spacing)).sum(axis=1) / 2.0
        corners = self.corners_lps()
        return corners.min(axis=0) - half, corners.max(axis=0) + half

    def same_grid(self, other: Geometry, tolerance_mm: float = 1e-3) -> bool:
        """True when both grids have the same size and every voxel centre coincides (within
        ``tolerance_mm``), compared in world coordinates."""
        if self.size != other.size:
            return False
        return bool(np.abs(self.corners_lps() - other.corners_lps()).max() <= tolerance_mm)

    def overlap_fraction(self, other: Geometry) -> float:
        """Fraction of this grid's bounding box (LPS) that ``other``'s bounding box covers."""
        lo1, hi1 = self.bounds_lps()
        lo2, hi2 = other.bounds_lps()
        inter = np.clip(np.minimum(hi1, hi2) - np.maximum(lo1, lo2), 0, None)
        return float(np.prod(inter) / max(np.prod(hi1 - lo1), 1e-12))

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(tuple(data["size"]), tuple(data["spacing"]), tuple(data["origin"]), tuple(data["direction"]))


@dataclass
class Volume:
    """A 3-D array indexed ``[k, j, i]`` with its physical geometry.

    ``warnings`` holds what the reader noticed and the user should know (e.g. a NIfTI header
    without a coded orientation); :func:`StrokePredictorLib.preprocess.preprocess` passes them on
    to the prediction's warnings.
    """

    array: np.ndarray
    geometry: Geometry
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != self.geometry.shape:
            raise ValueError(
                f"Array shape {self.array.shape} does not match geometry shape {self.geometry.shape} (k, j, i)."
            )

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory volume>"

    def to_sitk(self) -> sitk.Image:
        return self.geometry.apply_to(sitk.GetImageFromArray(self.array))


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_SUPPORTED = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _forms_differ(qform: np.ndarray, sform: np.ndarray, size: tuple[int, int, int]) -> bool:
    """True when the two forms place some voxel of the image a quarter voxel or more apart.

    The qform's quaternion is stored in float32, so a writer's qform and sform of one rotation
    close to 180 degrees (a flipped axis) can differ by about 1.6e-3 in the matrix: up to a tenth of a
    voxel at the image's corners (measured on generated cases), no real disagreement.
    """
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    shift = np.linalg.norm((corners @ (np.asarray(qform) - np.asarray(sform)).T)[:, :3], axis=1).max()
    spacing = float(np.linalg.norm(np.asarray(sform)[:3, :3], axis=0).min())
    return bool(shift >= 0.25 * max(spacing, 1e-6))


def _nifti_geometry(header: object, size: tuple[int, int, int], name: str) -> Geometry | None:
    """Geometry from a NIfTI header following Slicer's rule (qform first), or None if the
    header has neither form coded.

    Raises:
        InputImageError: only a sheared sform is coded (ITK, SimpleITK and 3D Slicer cannot
            represent shear, and dropping it would misplace the image).
    """
    qform, qcode = header.get_qform(coded=True)  # type: ignore[attr-defined]
    sform, scode = header.get_sform(coded=True)  # type: ignore[attr-defined]
    if qform is not None and int(qcode) > 0:
        if sform is not None and int(scode) > 0 and _forms_differ(qform, sform, size):
            logger.info("%s: qform and sform differ; using the qform, as 3D Slicer does.", name)
        return Geometry.from_ijk_to_ras(qform, size)
    if sform is not None and int(scode) > 0:
        try:
            return Geometry.from_ijk_to_ras(sform, size)
        except ValueError:
            raise InputImageError(
                f"{name}: the NIfTI sform has shear (its axes are not perpendicular) and the qform is not set "
                "(code 0); 3D Slicer and ITK cannot represent a sheared grid. Reslice the image onto an "
                "orthogonal grid (e.g. with nibabel's resample_from_to or FSL's flirt -applyxfm -usesqform), "
                "or set a qform, and try again."
            ) from None
    return None


def _check_dimensions(shape: tuple[int, ...], path: Path, role: str) -> None:
    if len(shape) == 4 and shape[3] > 1:
        raise InputImageError(
            f"{role} file {path} is 4-D ({shape[3]} volumes). Pass a single 3-D volume: for DWI the "
            "b=1000 (or b=800) trace image, for ADC the computed ADC map (extract it, e.g. with "
            "'fslroi' or Slicer's 'Multivolume' export)."
        )
    if len(shape) not in (3, 4):
        raise InputImageError(f"{role} file {path} is {len(shape)}-D; a 3-D volume is expected.")
    if min(shape[:3]) < 2:
        raise InputImageError(f"{role} file {path} has size {tuple(shape[:3])}; it is a 2-D slice, not a 3-D volume.")


def _read_nifti(path: Path, role: str, dtype: type) -> Volume:
    """NIfTI through nibabel: it keeps NaN voxels (so they can be refused), applies the scaling
    slope, and gives both header forms. A truncated file is refused: the gzip trailer stores the
    uncompressed size, which must match the header's."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as error:  # noqa: BLE001 - any header failure means an unreadable file
        raise InputImageError(f"{role} file {path} could not be read (not a valid NIfTI file): {error}") from None
    header = image.header
    if header.get_data_dtype().names is not None:
        raise InputImageError(f"{role} file {path} has vector voxels; a scalar 3-D image is expected.")
    expected = int(image.dataobj.offset) + int(np.prod(image.shape)) * header.get_data_dtype().itemsize
    if path.name.lower().endswith(".gz"):
        with path.open("rb") as handle:
            handle.seek(-4, os.SEEK_END)
            complete = int.from_bytes(handle.read(4), "little") == expected % 2**32
    else:
        complete = path.stat().st_size >= expected
    if not complete:
        raise InputImageError(f"{role} file {path} could not be read: the file is truncated (incomplete download?).")
    _check_dimensions(tuple(image.shape), path, role)
    try:
        data = np.asarray(image.dataobj, dtype=dtype)
    except Exception as error:  # noqa: BLE001 - zlib/EOF errors of a damaged file
        raise InputImageError(f"{role} file {path} could not be decoded (damaged file?): {error}") from None
    if data.ndim == 4:
        data = data[..., 0]
    size = tuple(int(n) for n in data.shape)
    try:
        geometry = _nifti_geometry(header, size, f"{role} file {path}")  # type: ignore[arg-type]
    except InputImageError:
        raise
    except ValueError as error:  # a zero-length axis
        raise InputImageError(f"{role} file {path} has an unusable orientation matrix: {error}") from None
    warnings: list[str] = []
    if geometry is None:  # no coded form: ITK's interpretation of the header (voxel sizes, no rotation)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
            geometry = Geometry(size, reader.GetSpacing()[:3], reader.GetOrigin()[:3],
                                np.asarray(reader.GetDirection()).reshape(reader.GetDimension(), -1)[:3, :3].ravel())
        except (RuntimeError, ValueError) as error:
            detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise InputImageError(
                f"{role} file {path} has neither a qform nor an sform and its header cannot be placed in space: "
                f"{detail}"
            ) from None
        warnings.append(
            f"{role} file {path.name} has neither a qform nor an sform code set, so its position and orientation "
            "are unknown; it was read with its voxel sizes on unrotated axes, and left and right may be swapped. "
            "Convert the scan again from DICOM (e.g. with dcm2niix) to get a coded orientation."
        )
        logger.warning(warnings[-1])
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), geometry, path, warnings)


def read_volume(path: str | os.PathLike, *, role: str = "image", dtype: type = np.float32) -> Volume:
    """Read a 3-D NIfTI/NRRD/MetaImage file into a :class:`Volume`.

    NIfTI files are read with nibabel (see the module docstring for qform/sform); NRRD and
    MetaImage with SimpleITK. Both give the same ``[k, j, i]`` array and LPS geometry.

    Args:
        path: file to read.
        role: what the file is for (``"DWI"``, ``"ADC"``...), used in error messages.
        dtype: array dtype of the result (float64 input is converted).

    Raises:
        InputImageError: the file is missing, unreadable, truncated or not a 3-D scalar image.
    """
    path = Path(path)
    if path.is_dir():
        raise InputImageError(f"{role} file {path} is a folder; pass the image file itself.")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise InputImageError(f"{role} file {path} {what}.")
    if not path.name.lower().endswith(_SUPPORTED):
        raise InputImageError(
            f"{role} file {path} has an unsupported extension; expected one of {', '.join(_SUPPORTED)}."
        )
    if _suffix(path) in _NIFTI_SUFFIXES:
        return _read_nifti(path, role, dtype)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise InputImageError(f"{role} file {path} could not be read (truncated or not an image): {detail}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(f"{role} file {path} has vector voxels; a scalar 3-D image is expected.")
    _check_dimensions(tuple(image.GetSize()), path, role)
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    array = sitk.GetArrayFromImage(image).astype(dtype, copy=False)
    return Volume(np.ascontiguousarray(array), Geometry.from_sitk(image), path)


def check_volume(volume: Volume, role: str) -> None:
    """Refuse volumes a network cannot use: non-finite voxels, an empty or constant image."""
    array = volume.array
    finite = np.isfinite(array)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputImageError(
            f"{role} {volume.name} has {bad} NaN or infinite voxel(s); fix or mask them before prediction."
        )
    if array.size == 0 or float(array.max()) == float(array.min()):
        raise InputImageError(f"{role} {volume.name} is empty or constant (every voxel {float(array.flat[0]):g}).")


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
@contextmanager
def atomic_path(destination: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``destination``; on success rename it into place.

    The temporary name keeps the destination's full suffix (``.nii.gz``, ``.seg.nrrd``), so
    writers that pick a format by extension work. On error the temporary file is removed and
    ``destination`` is untouched.

    Raises:
        OutputExistsError: ``destination`` exists and ``overwrite`` is False.
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise OutputExistsError(f"{destination} exists already; pass --overwrite to replace it.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(destination.suffixes) or ".tmp"
    fd, name = tempfile.mkstemp(prefix=f".{destination.name.split('.')[0]}-", suffix=suffix, dir=destination.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes the file private; give it normal rights
        os.replace(temporary, destination)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_volume(
    array: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    compress: bool = True,
) -> Path:
    """Write a ``[k, j, i]`` array on ``geometry`` to NIfTI/NRRD, atomically.

    NIfTI files get both qform and sform set to the same matrix (code 1, scanner), so every
    reader places them identically. Returns the written path.
    """
    path = Path(path)
    if tuple(array.shape) != geometry.shape:
        raise ValueError(f"Array shape {array.shape} does not match geometry shape {geometry.shape}.")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    with atomic_path(path, overwrite) as temporary:
        sitk.WriteImage(image, str(temporary), compress)
    return path


def write_json(data: dict, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write JSON atomically (sorted keys are not forced, indentation 2)."""
    path = Path(path)
    with atomic_path(path, overwrite) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot serialise {type(value).__name__} to JSON.")


# ----------------------------------------------------------------------------------------
# Folders a tool writes: markers, ordinary permissions, writability, stale partial folders
# ----------------------------------------------------------------------------------------
#: Name of the marker file every folder written by a StrokePredictor verb carries.
MARKER_FILE = ".strokepredictor-folder.json"
#: What a marked folder holds: a model bundle, a generated dataset, a training run, the outputs of
#: one prediction or the top folder of a batch prediction.
FOLDER_KINDS = ("bundle", "dataset", "run", "outputs", "batch")
#: Prefix of the temporary folder a verb assembles its files in, inside the output folder.
PARTIAL_PREFIX = ".strokepredictor-partial-"
_PARTIAL_PATTERN = re.compile(r"^\.strokepredictor-partial-(?P<host>[A-Za-z0-9_.-]*?)-(?P<pid>\d+)-[^/]*$")
_STALE_FOREIGN_S = 24 * 3600.0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_permissions(path: str | os.PathLike, *, directory: bool = True) -> None:
    """Give ``path`` the permissions a plain ``mkdir``/``open`` would (0777/0666 minus the umask):
    :func:`tempfile.mkdtemp` and :func:`tempfile.mkstemp` make private (0700/0600) entries."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def make_temporary_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new uniquely named folder in ``parent`` with ordinary permissions (not 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    ordinary_permissions(path)
    return path


def write_folder_marker(folder: str | os.PathLike, kind: str, writer: str) -> Path:
    """Write the marker that says ``folder`` was written by StrokePredictor (``kind``: one of
    :data:`FOLDER_KINDS`; ``writer``: the verb, e.g. ``python -m Training export``). The content is
    fixed for a given kind and writer, so a folder written twice stays byte-identical."""
    if kind not in FOLDER_KINDS:
        raise ValueError(f"Unknown folder kind '{kind}'; expected one of {', '.join(FOLDER_KINDS)}.")
    path = Path(folder) / MARKER_FILE
    data = {"written_by": "StrokePredictor", "kind": kind, "writer": writer,
            "note": "--overwrite replaces a folder only when it carries this marker"}
    with atomic_path(path, overwrite=True) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")
    return path


def folder_kind(folder: str | os.PathLike) -> str | None:
    """The kind recorded in ``folder``'s marker, or None when it has no (valid) marker."""
    path = Path(folder) / MARKER_FILE
    try:
        if not path.is_file() or path.stat().st_size > 65536:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and data.get("written_by") == "StrokePredictor" and data.get("kind") in FOLDER_KINDS:
        return str(data["kind"])
    return None


def _json_field(path: Path, key: str) -> object:
    try:
        if not path.is_file() or path.stat().st_size > 10_000_000:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def recognised_kind(folder: str | os.PathLike) -> str | None:
    """The kind of a folder StrokePredictor wrote: its marker's, or for folders written before
    markers existed, the one its own description file shows; None for any other folder."""
    folder = Path(folder)
    kind = folder_kind(folder)
    if kind is not None:
        return kind
    if _json_field(folder / "model.json", "format") == "strokepredictor-bundle":
        return "bundle"
    if _json_field(folder / "dataset.json", "generator") == "python -m Training generate":
        return "dataset"
    files = _json_field(folder / "summary.json", "files")
    if isinstance(files, dict) and files.get("summary") == "summary.json" and "probability" in files:
        return "outputs"
    if isinstance(_json_field(folder / "batch_summary.json", "n_cases"), int):
        return "batch"
    return None


def check_output_folder(folder: str | os.PathLike, kind: str, *, overwrite: bool, option: str = "--out",
                        allow_files: tuple[str, ...] = ()) -> None:
    """Refuse an output folder that a verb writing a ``kind`` folder must not touch.

    Accepted: a path that does not exist, an empty folder, a folder holding only ``allow_files``
    (names the verb would not replace), and, with ``overwrite``, a folder that carries this kind's
    marker (or, for folders written before markers, its own description file: ``model.json`` of a
    bundle, ``dataset.json`` of a generated dataset, ``summary.json`` of prediction outputs).

    Raises:
        OutputExistsError: the path is a dangling symbolic link or a file; the folder holds files
            and ``overwrite`` is off; or ``overwrite`` is on but the folder is not a ``kind`` folder
            written by StrokePredictor (then nothing is deleted).
    """
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise OutputExistsError(
            f"{option} {folder} is a symbolic link to {os.readlink(folder)}, which does not exist; "
            "create the target folder or pass another path."
        )
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputExistsError(f"{option} {folder} exists and is not a folder.")
    try:
        entries = [p.name for p in folder.iterdir()]
    except OSError as error:
        raise OutputExistsError(f"{option} {folder} cannot be listed: {error.strerror or error}.") from None
    entries = [n for n in entries if n not in allow_files and not _PARTIAL_PATTERN.match(n)]
    if not entries:
        return
    if not overwrite:
        raise OutputExistsError(
            f"{option} {folder} is not empty; pass --overwrite to replace a {kind} folder written by StrokePredictor."
        )
    found = recognised_kind(folder)
    if found != kind:
        what = f"a {found} folder" if found else "not a folder written by StrokePredictor"
        raise OutputExistsError(
            f"{option} {folder} is {what} (no '{MARKER_FILE}' marker of a {kind} folder); --overwrite replaces "
            f"only a {kind} folder that StrokePredictor wrote, so nothing was deleted. Choose another {option} "
            "or empty it yourself."
        )


def ensure_writable_dir(folder: str | os.PathLike, *, option: str = "--out") -> list[Path]:
    """Create ``folder`` (and its parents) with ordinary permissions if missing, and check that a
    file can be created in it, before any work is done. Returns the folders created here, deepest
    first (empty when ``folder`` existed), so that a failed run can take them back
    (:func:`remove_created_dirs`).

    Raises:
        OutputExistsError: the folder cannot be created or written (read-only file system,
            permissions, a file in the way, a dangling symbolic link).
    """
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise OutputExistsError(
            f"{option} {folder} is a symbolic link to {os.readlink(folder)}, which does not exist; "
            "create the target folder or pass another path."
        )
    created = []
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        created.append(candidate)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".strokepredictor-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputExistsError(
            f"{option} {folder} cannot be written ({reason}); choose a writable folder. Nothing was computed."
        ) from None
    return created


def remove_created_dirs(created: list[Path]) -> None:
    """Take back the folders :func:`ensure_writable_dir` created, deepest first, as long as they
    hold nothing (a folder's own marker counts as nothing)."""
    for folder in created:
        try:
            names = {p.name for p in folder.iterdir()}
            if names <= {MARKER_FILE}:
                (folder / MARKER_FILE).unlink(missing_ok=True)
                folder.rmdir()
        except OSError:
            return


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def partial_dir(folder: str | os.PathLike) -> Path:
    """A new temporary folder inside ``folder`` (so that moving its files into ``folder`` is a
    rename on one file system), named after this host and process so that a later run can
    recognise it as stale (:func:`remove_stale_partials`)."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", platform.node() or "host")[:40]
    return make_temporary_dir(folder, f"{PARTIAL_PREFIX}{host}-{os.getpid()}-")


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that a killed run (SIGKILL, power loss) left in ``folder``:
    those of a process of this host that no longer runs, and those of another host older than a
    day. Returns the removed paths."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    this_host = re.sub(r"[^A-Za-z0-9_.]", "_", platform.node() or "host")[:40]
    for entry in folder.iterdir():
        match = _PARTIAL_PATTERN.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group("pid"))
        if match.group("host") == this_host:
            stale = pid != os.getpid() and not _process_alive(pid)
        else:
            stale = time.time() - entry.stat().st_mtime > _STALE_FOREIGN_S
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            logger.warning("Removed %s, left by an interrupted run (process %d).", entry, pid)
    return removed


def path_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` (resolved, symbolic links followed) lies inside ``folder`` (resolved)."""
    try:
        resolved = Path(path).resolve()
        return resolved.is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError):
        return False


_CASE_FILE_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dwi", ("*dwi*.nii*", "*DWI*.nii*")),
    ("adc", ("*adc*.nii*", "*ADC*.nii*")),
    ("flair", ("*flair*.nii*", "*FLAIR*.nii*")),
    ("clinical", ("*clinical*.json",)),
)


def find_case_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The files of one case in a flat folder, by name: ``{"dwi", "adc", "flair", "clinical"}``
    (each key only when a file matches; the first match in sorted order wins)."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for role, patterns in _CASE_FILE_PATTERNS:
        for pattern in patterns:
            hits = sorted(folder.glob(pattern))
            if hits:
                found[role] = hits[0]
                break
    return found


# ----------------------------------------------------------------------------------------
# ISLES 2022 discovery
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseRecord:
    """Files of one ISLES 2022 case. ``flair`` and ``mask`` may be absent."""

    case_id: str
    dwi: Path
    adc: Path
    flair: Path | None = None
    mask: Path | None = None
    age: float | None = None
    sex: str | None = None
    sidecar: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "dwi": str(self.dwi),
            "adc": str(self.adc),
            "flair": None if self.flair is None else str(self.flair),
            "mask": None if self.mask is None else str(self.mask),
            "age": self.age,
            "sex": self.sex,
        }


_CASE_PATTERN = re.compile(r"^sub-(strokecase\d+|[A-Za-z0-9]+)$")


def _first(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def _sidecar_values(paths: list[Path]) -> tuple[float | None, str | None, dict]:
    """Age and sex from BIDS JSON sidecars (ISLES 2022 stores e.g. ``"PatientAge": "060Y"``
    and ``"PatientSex": "F"``)."""
    merged: dict = {}
    for path in paths:
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                merged.update(data if isinstance(data, dict) else {})
            except (OSError, ValueError):  # ValueError: invalid JSON or not UTF-8
                logger.warning("Sidecar %s is not valid UTF-8 JSON; ignored.", path)
    age = None
    for key in ("PatientAge", "age", "Age"):
        if key in merged and merged[key] not in (None, ""):
            match = re.search(r"\d+(\.\d+)?", str(merged[key]))
            if match:
                age = float(match.group(0))
                break
    sex = None
    for key in ("PatientSex", "sex", "Sex"):
        value = str(merged.get(key, "")).strip().upper()
        if value:
            sex = {"F": "F", "FEMALE": "F", "M": "M", "MALE": "M"}.get(value)
            break
    return age, sex, merged


def discover_isles(root: str | os.PathLike) -> list[CaseRecord]:
    """Find the cases of an ISLES 2022 folder, in either layout.

    Supported layouts:

    * Zenodo: ``ROOT/sub-strokecaseXXXX/ses-0001/{dwi,anat}/...`` and
      ``ROOT/derivatives/sub-strokecaseXXXX/ses-0001/*_msk.nii.gz``;
    * challenge repository: ``ROOT/rawdata/sub-.../ses-0001/...`` and ``ROOT/derivatives/...``.

    FLAIR may be named ``_FLAIR`` or ``_flair``; a missing FLAIR or mask is allowed. ``ROOT`` may
    also be the folder that contains ``ISLES-2022``.

    Raises:
        InputImageError: no case found, or a case lacks its DWI or ADC.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputImageError(f"ISLES folder {root} does not exist.")
    if (root / "ISLES-2022").is_dir() and not any(root.glob("sub-*")):
        root = root / "ISLES-2022"
    raw = root / "rawdata" if (root / "rawdata").is_dir() else root
    derivatives = root / "derivatives"
    records = []
    for subject in sorted(p for p in raw.iterdir() if p.is_dir() and _CASE_PATTERN.match(p.name)):
        sessions = sorted(p for p in subject.glob("ses-*") if p.is_dir()) or [subject]
        session = sessions[0]
        dwi = _first(session / "dwi", ("*_dwi.nii.gz", "*_dwi.nii"))
        adc = _first(session / "dwi", ("*_adc.nii.gz", "*_adc.nii"))
        if dwi is None or adc is None:
            missing = "DWI" if dwi is None else "ADC"
            raise InputImageError(f"Case {subject.name} in {root} has no {missing} file in {session / 'dwi'}.")
        flair = _first(session / "anat", ("*_FLAIR.nii.gz", "*_flair.nii.gz", "*_FLAIR.nii", "*_flair.nii"))
        mask = _first(derivatives / subject.name / session.name, ("*_msk.nii.gz", "*_msk.nii"))
        if mask is None:
            mask = _first(derivatives / subject.name, ("*_msk.nii.gz", "**/*_msk.nii.gz"))
        sidecars = [dwi.with_name(dwi.name.replace(".nii.gz", ".json").replace(".nii", ".json"))]
        sidecars.append(adc.with_name(adc.name.replace(".nii.gz", ".json").replace(".nii", ".json")))
        if flair is not None:
            sidecars.append(flair.with_name(flair.name.replace(".nii.gz", ".json").replace(".nii", ".json")))
        age, sex, sidecar = _sidecar_values(sidecars)
        records.append(CaseRecord(subject.name, dwi, adc, flair, mask, age, sex, sidecar))
    if not records:
        raise InputImageError(
            f"No ISLES 2022 case found in {root}: expected folders named sub-strokecaseXXXX "
            "(Zenodo layout) or rawdata/sub-strokecaseXXXX (challenge repository layout)."
        )
    return records
