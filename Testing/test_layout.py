"""Training/ follows the pipeline: every module imports, each verb has a module of its own, and no
stage imports a later one (imports parsed with ``ast``, including module names given as strings to
``importlib``, as the verb table and the campaign do)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from Training.__main__ import VERBS

TRAINING = Path(__file__).resolve().parents[1] / "Training"

#: The pipeline's stages in order; a module may import its own stage and earlier ones.
STAGES = ("synthesis", "clinical", "data", "training", "evaluation")
#: Top-level modules: ``config`` comes before every stage, the others after all of them.
BASE, TOP = ("config",), ("__init__", "__main__", "campaign", "demo")
MODULE_NAME = re.compile(r"Training(\.\w+)+")


def _module_name(path: Path) -> str:
    parts = path.relative_to(TRAINING.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(TRAINING.rglob("*.py"))}


def rank(module: str) -> int:
    """Position of ``module`` in the pipeline: 0 for ``Training.config``, 1.. for the stages in
    order, and after all of them for the top-level runners."""
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in TOP):
        return len(STAGES) + 1
    if len(parts) == 2 and parts[1] in BASE:
        return 0
    if parts[1] not in STAGES:
        raise AssertionError(f"{module} lies in no pipeline stage: add it to one of {STAGES}")
    return 1 + STAGES.index(parts[1])


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """The ``Training`` modules that ``source`` (the text of ``module``) imports: import statements
    (relative ones resolved) and string constants that name a module (``importlib`` targets)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.fullmatch(node.value):
            found.add(node.value)
    return {name for name in found if name.startswith("Training.")}  # the root package holds only a docstring


def layer_violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """``module -> imported`` for every import of a later stage (or of any stage by the base)."""
    own = rank(module)
    return [f"{module} -> {name}" for name in sorted(imported_modules(source, module, is_package))
            if name != module and rank(name) > own]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    assert importlib.import_module(module).__name__ == module


def test_stages_import_only_earlier_stages():
    violations = [v for module, path in MODULES.items()
                  for v in layer_violations(module, path.read_text(), path.name == "__init__.py")]
    assert violations == []


def test_every_module_lies_in_a_stage_or_at_the_top():
    outside = sorted(m for m in MODULES if m.count(".") == 1 and m.split(".")[1] not in BASE + TOP + STAGES)
    assert outside == []
    assert {m.split(".")[1] for m in MODULES if m.count(".") >= 2} == set(STAGES)


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("Training.data.cache", "from Training.evaluation.metrics import dice\n",
     ["Training.data.cache -> Training.evaluation.metrics"]),
    ("Training.synthesis.pool", "def f():\n    from Training.training import train\n",
     ["Training.synthesis.pool -> Training.training", "Training.synthesis.pool -> Training.training.train"]),
    ("Training.clinical.nihss", "import Training.data.dataset\n",
     ["Training.clinical.nihss -> Training.data.dataset"]),
    ("Training.training.train", "from ..evaluation import metrics\n",
     ["Training.training.train -> Training.evaluation", "Training.training.train -> Training.evaluation.metrics"]),
    ("Training.config", "from Training.synthesis import case\n",
     ["Training.config -> Training.synthesis", "Training.config -> Training.synthesis.case"]),
    ("Training.training.train_synth", "importlib.import_module('Training.evaluation.evaluate')\n",
     ["Training.training.train_synth -> Training.evaluation.evaluate"]),
    ("Training.evaluation.ablate", "from Training.training.train import run\nfrom Training.data import dataset\n", []),
    ("Training.campaign", "MODULE = 'Training.evaluation.postprocess'\n", []),
])
def test_the_layer_check_catches_a_later_stage(module, source, expected):
    assert layer_violations(module, source) == expected


def test_each_verb_has_a_module_of_its_own():
    modules = [module for module, _ in VERBS.values()]
    assert len(set(modules)) == len(modules) == len(VERBS)
    for module in modules:
        assert module in MODULES, module
        assert callable(importlib.import_module(module).main), module


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_says_what_it_is(stage):
    doc = importlib.import_module(f"Training.{stage}").__doc__ or ""
    assert doc.startswith(f"Stage {STAGES.index(stage) + 1}, "), doc[:80]
    assert f"{stage}/" in (importlib.import_module("Training").__doc__ or "")
