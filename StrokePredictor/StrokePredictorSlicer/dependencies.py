"""Python packages the prediction needs inside Slicer, installed on first Apply with consent.

Nothing here runs at import time. ``Resources/requirements.txt`` lists the packages; torch is
installed by the PyTorch extension (``PyTorchUtils``), which picks the CUDA/CPU build.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"


def requirements(path: Path = REQUIREMENTS) -> list[str]:
    """Requirement lines (comments and blanks dropped)."""
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def missing(path: Path = REQUIREMENTS) -> list[str]:
    """Requirements whose distribution is not installed, plus ``torch`` when it is missing."""
    absent = []
    for requirement in requirements(path):
        try:
            importlib.metadata.version(_name(requirement))
        except importlib.metadata.PackageNotFoundError:
            absent.append(requirement)
    try:
        importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        absent.append("torch")
    return absent


def install(packages: list[str]) -> None:
    """Install ``packages`` in Slicer's Python: torch through the PyTorch extension, the rest with
    ``slicer.packaging.pip_ensure`` (Slicer 5.12+) or ``slicer.util.pip_install``."""
    import slicer

    others = [p for p in packages if _name(p) != "torch"]
    if others:
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(others)
        else:
            slicer.util.pip_install(others)
    if any(_name(p) == "torch" for p in packages):
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(
                "PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager and restart Slicer."
            ) from None
        logic = PyTorchUtils.PyTorchUtilsLogic()
        if not logic.torchInstalled():
            logic.installTorch(askConfirmation=False)
