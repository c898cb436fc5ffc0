"""The extension's CMake files ship every Python file, and the Lib stays free of Slicer/Qt/VTK."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "PythonQt"}


def _cmake_sets(path: Path) -> dict[str, list[str]]:
    """``set(NAME item item ...)`` blocks of a CMake file (comments removed)."""
    text = re.sub(r"(?m)(^|\s)#[^\n]*", r"\1", path.read_text())
    sets = {}
    for name, body in re.findall(r"\bset\(\s*([A-Za-z_${}]+)\s+(.*?)\)", text, flags=re.S):
        sets[name] = [token.strip('"') for token in body.split()]
    return sets


def test_module_lists_every_python_file():
    cmake = REPO / "StrokePredictor" / "CMakeLists.txt"
    listed = _cmake_sets(cmake)["MODULE_PYTHON_SCRIPTS"]
    listed = {item.replace("${MODULE_NAME}", "StrokePredictor") for item in listed}
    present = {p.relative_to(cmake.parent).as_posix() for p in cmake.parent.rglob("*.py")}
    assert present, "no Python file found"
    assert present - listed == set(), f"not packaged: {sorted(present - listed)}"
    assert listed - present == set(), f"listed but missing: {sorted(listed - present)}"
    assert "slicerMacroBuildScriptedModule" in cmake.read_text()


def test_module_lists_its_resources():
    cmake = REPO / "StrokePredictor" / "CMakeLists.txt"
    resources = [r.replace("${MODULE_NAME}", "StrokePredictor") for r in _cmake_sets(cmake)["MODULE_PYTHON_RESOURCES"]]
    explicit = [r for r in resources if not r.startswith("${")]
    assert {"Resources/UI/StrokePredictor.ui", "Resources/Icons/StrokePredictor.png",
            "Resources/requirements.txt"} <= set(explicit)
    for item in explicit:
        assert (cmake.parent / item).is_file(), item
    text = cmake.read_text()
    assert "Resources/Models/*.safetensors" in text and "Resources/SampleData/*.nii.gz" in text


def test_extension_packages_the_lib_explicitly():
    cmake = REPO / "CMakeLists.txt"
    text = cmake.read_text()
    listed = set(_cmake_sets(cmake)["StrokePredictorLib_PYTHON_SCRIPTS"])
    present = {p.relative_to(REPO).as_posix() for p in (REPO / "StrokePredictorLib").rglob("*.py")}
    assert present - listed == set(), f"not packaged: {sorted(present - listed)}"
    assert listed - present == set(), f"listed but missing: {sorted(listed - present)}"
    assert not any("*" in item for item in listed)
    assert "ctkMacroCompilePythonScript" in text and "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in text


def test_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    sets = _cmake_sets(REPO / "CMakeLists.txt")
    assert re.search(r"project\(StrokePredictor\)", text)
    assert sets["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert sets["EXTENSION_DEPENDS"] == ["PyTorch"]
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):
        assert sets.get(key), key
    assert "find_package(Slicer REQUIRED)" in text and "add_subdirectory(StrokePredictor)" in text
    assert "${Slicer_EXTENSION_CPACK}" in text


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value).split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((REPO / "StrokePredictorLib").rglob("*.py")), ids=lambda p: p.name)
def test_lib_imports_no_gui_or_slicer(path):
    assert _imports(path) & FORBIDDEN == set()


def test_import_checker_detects_forbidden_imports(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text(
        "def f():\n    import vtk\n    from qt import QTimer\n    importlib.import_module('slicer.util')\n")
    assert _imports(sample) & FORBIDDEN == {"vtk", "qt", "slicer"}
