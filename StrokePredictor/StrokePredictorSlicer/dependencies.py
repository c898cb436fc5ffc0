"""Python packages the prediction needs inside Slicer, installed on first Apply with consent.

Nothing here runs at import time. ``Resources/requirements.txt`` lists the packages with their
lowest versions; torch is installed by the PyTorch extension (``PyTorchUtils``), which picks the
CUDA/CPU build. The prediction itself needs at least :data:`ESSENTIAL` (the self-test skips
without them).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Callable
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
ESSENTIAL = ("torch", "nibabel", "safetensors")
REQUESTER = "Stroke Predictor"


def requirements(path: Path = REQUIREMENTS) -> list[str]:
    """Requirement lines (comments and blanks dropped)."""
    lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def _requirement_tools():
    """``(Requirement, Version)`` from ``packaging``, or pip's vendored copy (always in Slicer)."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pragma: no cover - depends on the Slicer build
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


def satisfied(requirement: str, version_of: Callable[[str], str] = importlib.metadata.version) -> bool:
    """True when ``requirement`` (e.g. ``nibabel>=5.0``) is installed in a matching version."""
    Requirement, Version = _requirement_tools()
    parsed = Requirement(requirement)
    if parsed.marker is not None and not parsed.marker.evaluate():
        return True  # not needed on this platform / Python
    try:
        installed = version_of(parsed.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    if not parsed.specifier:
        return True
    return parsed.specifier.contains(Version(installed), prereleases=True)


def missing(path: Path = REQUIREMENTS, version_of: Callable[[str], str] = importlib.metadata.version) -> list[str]:
    """Requirements that are not installed or installed in a version below the one required,
    plus ``torch`` when it is missing."""
    absent = [requirement for requirement in requirements(path) if not satisfied(requirement, version_of)]
    if not any(_name(requirement) == "torch" for requirement in requirements(path)) and not satisfied(
            "torch", version_of):
        absent.append("torch")
    return absent


def missing_essential(version_of: Callable[[str], str] = importlib.metadata.version) -> list[str]:
    """Those of :data:`ESSENTIAL` that are not installed (the prediction cannot run without them)."""
    return [name for name in ESSENTIAL if not satisfied(name, version_of)]


def install(packages: list[str]) -> None:
    """Install ``packages`` in Slicer's Python, after the user agreed (the caller asks once).

    torch through the PyTorch extension; the rest with ``slicer.packaging.pip_ensure`` on Slicer
    5.12+ (without a second prompt) or ``slicer.util.pip_install`` on older versions.

    Raises:
        RuntimeError: torch is needed and the PyTorch extension is not installed.
    """
    import slicer

    others = [p for p in packages if _name(p) != "torch"]
    if others:
        try:
            packaging = importlib.import_module("slicer.packaging")  # Slicer 5.12+
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(others, prompt_install=False, requester=REQUESTER)
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
