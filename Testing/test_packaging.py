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


# ----------------------------------------------------------------------------------------
# Slicer 5.8 runs Python 3.9: everything that runs inside Slicer (the module and the Lib, which
# PythonSlicer runs for the prediction) must parse and run on 3.9.
SLICER_PYTHON = (3, 9)
SHIPPED = sorted([*(REPO / "StrokePredictorLib").rglob("*.py"), *(REPO / "StrokePredictor").rglob("*.py")])
NEWER_NAMES = {  # module -> names that appeared after Python 3.9
    "itertools": {"pairwise", "batched"}, "typing": {
        "TypeAlias", "ParamSpec", "Concatenate", "TypeGuard", "Self", "Never", "LiteralString", "assert_never",
        "reveal_type", "Required", "NotRequired", "Unpack", "TypeVarTuple", "dataclass_transform", "override",
        "is_typeddict", "get_overloads", "assert_type", "TypeIs"},
    "types": {"NoneType", "EllipsisType", "UnionType"}, "datetime": {"UTC"}, "enum": {"StrEnum", "verify"},
    "contextlib": {"chdir", "aclosing"}, "inspect": {"get_annotations"},
}
NEWER_MODULES = {"tomllib"}
NEWER_CALL_KEYWORDS = {"zip": {"strict"}, "dataclass": {"slots", "kw_only", "match_args"},
                       "field": {"kw_only"}, "bisect": {"key"}, "bisect_left": {"key"}, "bisect_right": {"key"},
                       "insort": {"key"}, "insort_left": {"key"}, "insort_right": {"key"}}
NEWER_ATTRIBUTES = {"bit_count"}


def python39_problems(source: str, filename: str = "<source>") -> list[str]:
    """What in ``source`` does not run on Python 3.9: syntax of 3.10+ (``match``, parenthesised
    context managers, ``except*``), ``zip(strict=...)`` and other 3.10+ keywords, names and modules
    added after 3.9, ``X | Y`` evaluated at run time (``isinstance``, annotations in a file without
    ``from __future__ import annotations``, or in a ``@parameterNodeWrapper`` class, whose
    annotations Slicer evaluates)."""
    problems = []
    try:
        tree = ast.parse(source, filename=filename, feature_version=SLICER_PYTHON)
    except SyntaxError as error:
        return [f"{filename}:{error.lineno}: syntax Python 3.9 does not have ({error.msg})"]
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations"
                 for a in n.names) for n in tree.body)

    def has_union(node: ast.AST | None) -> bool:
        return node is not None and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                                        for n in ast.walk(node))

    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            for keyword in node.keywords:
                if keyword.arg in NEWER_CALL_KEYWORDS.get(name, ()):
                    problems.append(f"{where}: {name}({keyword.arg}=...) needs Python 3.10+")
            if name in ("isinstance", "issubclass") and len(node.args) == 2 and has_union(node.args[1]):
                problems.append(f"{where}: {name}(x, A | B) needs Python 3.10+")
            if name in NEWER_ATTRIBUTES and isinstance(node.func, ast.Attribute):
                problems.append(f"{where}: .{name}() needs Python 3.10+")
            if name in ("aiter", "anext") and isinstance(node.func, ast.Name):
                problems.append(f"{where}: {name}() needs Python 3.10+")
        elif isinstance(node, ast.ImportFrom) and node.module in NEWER_NAMES:
            for alias in node.names:
                if alias.name in NEWER_NAMES[node.module]:
                    problems.append(f"{where}: {node.module}.{alias.name} needs Python 3.10+")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.attr in NEWER_NAMES.get(node.value.id, ()):
            problems.append(f"{where}: {node.value.id}.{node.attr} needs Python 3.10+")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in NEWER_MODULES:
                    problems.append(f"{where}: module {name} needs Python 3.11+")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not future:
            arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg,
                         node.args.kwarg]
            if has_union(node.returns) or any(a is not None and has_union(a.annotation) for a in arguments):
                problems.append(f"{where}: 'X | Y' annotation without 'from __future__ import annotations'")
        elif isinstance(node, ast.AnnAssign) and not future and has_union(node.annotation):
            problems.append(f"{where}: 'X | Y' annotation without 'from __future__ import annotations'")
        elif isinstance(node, ast.ClassDef) and any(getattr(d, "id", getattr(d, "attr", "")) == "parameterNodeWrapper"
                                                    for d in node.decorator_list):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and has_union(item.annotation):
                    problems.append(f"{where}: parameter '{ast.unparse(item.target)}' uses 'X | Y', which Slicer "
                                    "evaluates at run time")
    return problems


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_code_that_runs_in_slicer_runs_on_python_3_9(path):
    assert python39_problems(path.read_text(), path.relative_to(REPO).as_posix()) == []


def test_python39_checker_finds_what_3_9_lacks():
    bad = """
import tomllib
from itertools import pairwise
from typing import TypeAlias
def f(a: int | None) -> list[int]:
    for x, y in zip(a, a, strict=True):
        pass
    match a:
        case 1:
            pass
    if isinstance(a, int | str):
        pass
    with (open("a") as f1, open("b") as f2):
        pass
    return (5).bit_count()
"""
    problems = python39_problems(bad)
    assert len(problems) == 1 and "syntax" in problems[0]  # the match statement stops the parse
    without_syntax = bad.replace("    match a:\n        case 1:\n            pass\n", "").replace(
        '    with (open("a") as f1, open("b") as f2):\n        pass\n', "")
    found = "\n".join(python39_problems(without_syntax))
    for expected in ("tomllib", "itertools.pairwise", "typing.TypeAlias", "zip(strict=...)", "isinstance(x, A | B)",
                     "without 'from __future__", ".bit_count()"):
        assert expected in found, expected
    assert python39_problems("from __future__ import annotations\ndef f(a: int | None) -> None: ...\n") == []
    wrapper = ("from __future__ import annotations\n@parameterNodeWrapper\nclass P:\n    a: int | None\n")
    assert "Slicer evaluates" in python39_problems(wrapper)[0]


def test_supported_slicer_versions_are_stated_where_users_see_them():
    """The module's minimum (which it enforces in its panel), the extension description (shown
    before installing) and the README's "In 3D Slicer" section agree."""
    tree = ast.parse((REPO / "StrokePredictor" / "StrokePredictor.py").read_text())
    minimum = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", "") == "MINIMUM_SLICER")
    oldest = f"{minimum[0]}.{minimum[1]}"
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]*)"\)', (REPO / "CMakeLists.txt").read_text()).group(1)
    assert f"Requires 3D Slicer {oldest} or newer" in description
    readme = (REPO / "README.md").read_text()
    section = readme.split("## In 3D Slicer", 1)[1].split("\n## ", 1)[0]
    stated = re.search(r"\*\*Supported Slicer versions: ([0-9., and]+)\*\*", section)
    assert stated is not None and stated.group(1).split(",")[0].strip() == oldest
    assert f"supported: {stated.group(1)}." in description
    assert python39_problems.__doc__ and SLICER_PYTHON == (3, 9) and minimum == (5, 8)  # Slicer 5.8 ships Python 3.9
