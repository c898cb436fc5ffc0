"""Template anatomy: the MNI152 2009c (symmetric) T1, grey- and white-matter maps from the nilearn wheel.

The templates ship inside the installed ``nilearn`` package
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``, 1 mm,
197x233x189); nothing is downloaded. :func:`load_template` reads them once per process and
spacing, block-averages them to the working spacing (2 mm by default, 4 mm for tiny fixtures),
crops them to the head plus a margin and derives:

* tissue fractions ``csf``, ``gm``, ``wm`` in [0, 1] (CSF = filled brain mask minus GM and WM);
* ``brain`` (fraction inside the brain), ``skull`` and ``scalp`` shells (fractions) outside it,
  used when the images are not skull-stripped;
* ``t1`` (normalised 0..1), which gives the anatomy its texture (deep grey nuclei, cortex);
* ``territory``: coarse arterial territories (see :data:`TERRITORIES`) built geometrically
  from MNI coordinates, used for procedural lesions and the outcome model.

All arrays are float32 ``[k, j, i]`` on :attr:`Template.geometry` (LPS world = MNI space).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from StrokePredictorLib.errors import StrokePredictorError
from StrokePredictorLib.io import Geometry

logger = logging.getLogger(__name__)

#: Territory labels of :attr:`Template.territory` (0 = outside the brain).
TERRITORIES: dict[int, str] = {
    1: "MCA left", 2: "MCA right", 3: "ACA left", 4: "ACA right", 5: "PCA left", 6: "PCA right",
    7: "posterior fossa left", 8: "posterior fossa right", 9: "deep (lenticulostriate/thalamic) left",
    10: "deep (lenticulostriate/thalamic) right",
}
#: Territory labels below the tentorium (cerebellum and brainstem).
POSTERIOR_FOSSA = (7, 8)


def posterior_fossa_weight(territory: np.ndarray) -> np.ndarray:
    """Float32 weight (0..1, edge softened by 1 voxel) of the posterior fossa on a ``territory`` grid."""
    return ndimage.gaussian_filter(np.isin(territory, POSTERIOR_FOSSA).astype(np.float32), 1.0)


_TEMPLATE_NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


class TemplateError(StrokePredictorError):
    """The MNI templates could not be found in the installed nilearn package."""


@dataclass(frozen=True)
class Template:
    """Template anatomy at one working spacing (arrays float32 ``[k, j, i]``, ``territory`` uint8)."""

    geometry: Geometry
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    skull: np.ndarray
    scalp: np.ndarray
    t1: np.ndarray
    territory: np.ndarray
    spacing_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    def world_ras(self) -> np.ndarray:
        """RAS coordinates (mm) of every voxel centre, float32 ``(3, K, J, I)`` (x, y, z)."""
        return _world_ras(self.geometry)


def template_dir() -> Path:
    """Folder of the MNI152 templates inside the installed nilearn package."""
    try:
        import nilearn
    except ImportError:  # pragma: no cover - nilearn is a training dependency
        raise TemplateError(
            "nilearn is not installed; it carries the MNI152 templates (pip install nilearn).") from None
    folder = Path(nilearn.__file__).resolve().parent / "datasets" / "data"
    missing = [n for n in ("t1", "gm", "wm") if not (folder / _TEMPLATE_NAME.format(n)).is_file()]
    if missing:
        raise TemplateError(f"nilearn {nilearn.__version__} in {folder} lacks the MNI152 template(s) {missing}.")
    return folder


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return array.astype(np.float32)
    shape = [s // factor * factor for s in array.shape]
    a = array[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    return a.reshape(shape[0] // factor, factor, shape[1] // factor, factor, shape[2] // factor, factor).mean(
        axis=(1, 3, 5)
    )


def _world_ras(geometry: Geometry) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in geometry.shape), indexing="ij")
    m = geometry.ijk_to_ras.astype(np.float32)
    return np.stack([m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3)])


def geometric_territories(ras: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Coarse arterial territories from MNI coordinates (a simplification of the vascular
    atlases: ACA medial frontal/parietal, PCA occipital and inferior temporal, posterior fossa
    below the tentorium, deep lenticulostriate/thalamic core, MCA the rest of the hemisphere).

    Args:
        ras: ``(3, K, J, I)`` RAS coordinates in mm.
        brain: ``(K, J, I)`` brain fraction.

    Returns:
        uint8 ``(K, J, I)`` labels of :data:`TERRITORIES`.
    """
    x, y, z = ras
    right = x > 0
    label = np.where(right, 2, 1).astype(np.uint8)  # MCA
    aca = (np.abs(x) < 18) & (y > -45) & (z > 5 + 0.1 * np.maximum(-y, 0))
    pca = (y < -62) & (z > -22) | ((y < -25) & (z < -2) & (z > -22) & (np.abs(x) < 45) & (y > -62) & (z < -8))
    fossa = (z < -22) & (y < -35)
    deep = (np.abs(x) < 30) & (np.abs(x) > 4) & (y > -35) & (y < 22) & (z > -8) & (z < 22)
    label[aca] = np.where(right[aca], 4, 3)
    label[pca] = np.where(right[pca], 6, 5)
    label[deep] = np.where(right[deep], 10, 9)
    label[fossa] = np.where(right[fossa], 8, 7)
    label[brain < 0.5] = 0
    return label


@functools.lru_cache(maxsize=4)
def load_template(spacing_mm: int = 2, margin_mm: float = 18.0) -> Template:
    """Load and derive the template anatomy at an integer working spacing (cached per process).

    Args:
        spacing_mm: working voxel size in mm (1, 2, 3 or 4): the 1 mm maps are block-averaged.
        margin_mm: margin kept around the brain (room for the skull and scalp shells).
    """
    import nibabel as nib

    factor = int(spacing_mm)
    if factor != spacing_mm or factor < 1:
        raise ValueError(f"Template spacing must be a whole number of mm, got {spacing_mm}.")
    folder = template_dir()
    images = {n: nib.load(str(folder / _TEMPLATE_NAME.format(n))) for n in ("t1", "gm", "wm")}
    affine = images["t1"].affine
    # nibabel arrays are [i, j, k]; ours are [k, j, i]
    data = {n: np.asarray(im.dataobj, dtype=np.float32).transpose(2, 1, 0) / 255.0 for n, im in images.items()}
    data = {n: _block_mean(a, factor) for n, a in data.items()}
    mask = data["t1"] > 0.02
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=max(1, 2 // factor)))
    tissue = np.clip(data["gm"] + data["wm"], 0, 1)
    brain = np.maximum(ndimage.gaussian_filter(mask.astype(np.float32), 0.4), tissue)
    csf = np.clip(brain - tissue, 0, 1)
    # shells outside the brain, by distance (mm) from its surface
    outside = ndimage.distance_transform_edt(~(brain > 0.5), sampling=float(factor))
    skull = ndimage.gaussian_filter(((outside > 2.5) & (outside <= 8.5)).astype(np.float32), 0.4)
    scalp = ndimage.gaussian_filter(((outside > 8.5) & (outside <= 14.0)).astype(np.float32), 0.4)
    maps = {"csf": csf, "gm": data["gm"], "wm": data["wm"], "brain": brain, "skull": skull,
            "scalp": scalp, "t1": data["t1"]}
    # voxel (0,0,0) of a block is the mean of 1 mm voxels 0..f-1: centre at (f-1)/2
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * factor
    new_affine[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + affine[:3, 3]
    # crop to head + margin
    head = (maps["brain"] + maps["skull"] + maps["scalp"]) > 0.05
    idx = np.argwhere(head)
    pad = int(np.ceil(4.0 / factor))
    lo = np.maximum(idx.min(axis=0) - pad, 0)
    hi = np.minimum(idx.max(axis=0) + pad + 1, np.asarray(head.shape))
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    maps = {n: np.ascontiguousarray(a[crop]) for n, a in maps.items()}
    new_affine[:3, 3] = new_affine[:3, :3] @ lo[::-1] + new_affine[:3, 3]  # lo is (k, j, i)
    shape = maps["brain"].shape
    geometry = Geometry.from_ijk_to_ras(new_affine, (shape[2], shape[1], shape[0]))
    ras = _world_ras(geometry)
    t1 = maps["t1"] / max(float(np.percentile(maps["t1"][maps["brain"] > 0.5], 99)), 1e-6)
    territory = geometric_territories(ras, maps["brain"])
    logger.debug("Template at %d mm: shape %s (cropped from margin %.0f mm).", factor, shape, margin_mm)
    return Template(geometry, maps["csf"], maps["gm"], maps["wm"], maps["brain"], maps["skull"], maps["scalp"],
                    np.clip(t1, 0, 1.2).astype(np.float32), territory, float(factor))


def brain_center_lps(template: Template) -> np.ndarray:
    """LPS centre of mass (mm) of the template brain."""
    com = np.asarray(ndimage.center_of_mass(template.brain))  # (k, j, i)
    return template.geometry.index_to_lps(com[::-1])
