"""A real MRML scene and Slicer module logics from the ``slicer-core`` wheel, for tests.

``slicer-core`` ships Slicer's MRML, Volumes, Segmentations, Colors, Tables and Plots logics as
a Python package, but not the Qt application: there is no ``slicer.app``, no
``slicer.modules``, no ``slicer.ScriptedLoadableModule``, no ``slicer.parameterNodeWrapper``
and no ``qt``/``ctk``. This helper

* builds a real ``vtkMRMLScene`` with ``vtkSlicerApplicationLogic`` and the real module logics
  (:func:`make_scene`), assigns it to ``slicer.mrmlScene`` and exposes the logics as
  ``slicer.modules.<name>.logic()``, and provides ``slicer.app.coreIOManager()`` for volume and
  segmentation files, so that ``slicer.util.loadVolume``/``saveNode`` and friends work;
* installs minimal stand-ins for the GUI layer only (:func:`install_gui_stubs`): ``qt``, ``ctk``,
  ``slicer.ScriptedLoadableModule`` and ``slicer.parameterNodeWrapper``. Nothing of MRML or
  the logics is faked.

Usage (see ``Testing/test_slicer_logic.py``)::

    env = slicer_env.make_scene()          # real scene + logics, slicer.mrmlScene set
    module = slicer_env.import_module()    # StrokePredictor/StrokePredictor.py, GUI layer stubbed
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO_ROOT / "StrokePredictor" / "StrokePredictor.py"


# ----------------------------------------------------------------------------------------
# GUI layer stand-ins (qt, ctk, ScriptedLoadableModule, parameterNodeWrapper)
# ----------------------------------------------------------------------------------------
class _Anything:
    """Absorbs any attribute access or call; stands in for Qt/CTK classes in the module body."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> _Anything:
        return _Anything()

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()

    def __bool__(self) -> bool:
        return False


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything


class _ScriptedLoadableModule:
    def __init__(self, parent: Any) -> None:
        self.parent = parent


class _ScriptedLoadableModuleLogic:
    def __init__(self, parent: Any = None) -> None:
        self.parent = parent

    def getParameterNode(self) -> Any:
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(type(self).__name__, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(type(self).__name__)
            node.SetName(type(self).__name__)
            node = slicer.mrmlScene.AddNode(node)
        return node


class _ScriptedLoadableModuleTest:
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        pass


class _WithinRange:
    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum


class _Choice:
    def __init__(self, choices: Any) -> None:
        self.choices = list(choices)


def _parameter_node_wrapper(cls: type) -> type:
    """Minimal ``@parameterNodeWrapper``: plain attributes with the class defaults, stored on
    the wrapped ``vtkMRMLScriptedModuleNode`` as strings for str/int/float/bool and as node
    references for MRML nodes, which is what the real decorator persists."""
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)

    def __init__(self: Any, parameterNode: Any) -> None:
        object.__setattr__(self, "parameterNode", parameterNode)

    def _base(hint: Any) -> Any:
        while typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        return hint

    def __getattr__(self: Any, name: str) -> Any:
        if name not in hints:
            raise AttributeError(name)
        base = _base(hints[name])
        node = object.__getattribute__(self, "parameterNode")
        if isinstance(base, type) and base.__name__.startswith("vtkMRML"):
            return node.GetNodeReference(name)
        if not node.HasParameter(name):
            return getattr(cls, name, None)
        text = node.GetParameter(name)
        if base is bool:
            return text == "true"
        if base in (int, float):
            return base(text)
        if base is Path:
            return Path(text) if text else None
        return text

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if name not in hints:
            raise AttributeError(f"{cls.__name__} has no parameter {name}")
        base = _base(hints[name])
        node = object.__getattribute__(self, "parameterNode")
        if isinstance(base, type) and base.__name__.startswith("vtkMRML"):
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif base is bool:
            node.SetParameter(name, "true" if value else "false")
        else:
            node.SetParameter(name, "" if value is None else str(value))

    namespace = {"__init__": __init__, "__getattr__": __getattr__, "__setattr__": __setattr__,
                 "__annotations__": dict(hints)}
    for name in hints:
        if hasattr(cls, name):
            namespace[f"_default_{name}"] = getattr(cls, name)
    return type(cls.__name__, (), namespace)


def install_gui_stubs() -> None:
    """Put stand-ins for qt, ctk, slicer.ScriptedLoadableModule and slicer.parameterNodeWrapper
    into ``sys.modules`` (idempotent)."""
    import slicer

    for name in ("qt", "ctk", "PythonQt"):
        if name not in sys.modules:
            sys.modules[name] = _StubModule(name)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = _ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = _Anything
    slm.ScriptedLoadableModuleLogic = _ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = _ScriptedLoadableModuleTest
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = _parameter_node_wrapper
    pnw.WithinRange = _WithinRange
    pnw.Choice = _Choice
    sys.modules["slicer.parameterNodeWrapper"] = pnw
    slicer.parameterNodeWrapper = pnw
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    sys.modules["slicer.i18n"] = i18n
    slicer.i18n = i18n


def import_module() -> types.ModuleType:
    """Import ``StrokePredictor/StrokePredictor.py`` with the GUI layer stubbed."""
    install_gui_stubs()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    module_dir = str(MODULE_FILE.parent)
    if module_dir not in sys.path:
        sys.path.insert(0, module_dir)
    if "StrokePredictor" in sys.modules:
        return sys.modules["StrokePredictor"]
    spec = importlib.util.spec_from_file_location("StrokePredictor", MODULE_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["StrokePredictor"] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------
# Real scene, logics and I/O
# ----------------------------------------------------------------------------------------
class _CoreIOManager:
    """The part of ``qSlicerCoreIOManager`` that ``slicer.util`` load/save helpers use,
    implemented with the real Volumes and Segmentations logics and MRML storage nodes."""

    def __init__(self, env: SlicerEnvironment) -> None:
        self.env = env

    def fileType(self, filename: str) -> str:
        name = str(filename).lower()
        return "SegmentationFile" if name.endswith(".seg.nrrd") else "VolumeFile"

    def loadNodes(self, filetype: str, properties: dict, collection: Any, messages: Any = None) -> bool:
        path = str(properties["fileName"])
        name = properties.get("name") or Path(path).name.split(".")[0]
        if filetype == "SegmentationFile":
            node = self.env.logics["segmentations"].LoadSegmentationFromFile(path, False, name)
        else:
            options = 1 if properties.get("labelmap") else 0
            node = self.env.logics["volumes"].AddArchetypeVolume(path, name, options)
        if node is None:
            return False
        collection.AddItem(node)
        return True

    def saveNodes(self, filetype: str, properties: dict, messages: Any = None, scene: Any = None) -> bool:
        node = self.env.scene.GetNodeByID(properties["nodeID"])
        if not node.GetStorageNode():
            node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(properties["fileName"]))
        return bool(storage.WriteData(node))

    def fileWriterFileType(self, node: Any, extension: str = "") -> str:
        return "SegmentationFile" if node.IsA("vtkMRMLSegmentationNode") else "VolumeFile"


class _Application:
    """Stand-in for ``slicer.app`` with the methods the module and ``slicer.util`` call."""

    def __init__(self, env: SlicerEnvironment) -> None:
        self.env = env
        self._io = _CoreIOManager(env)

    def coreIOManager(self) -> _CoreIOManager:
        return self._io

    def applicationLogic(self) -> Any:
        return self.env.app_logic

    def processEvents(self) -> None:
        pass

    def testingEnabled(self) -> bool:
        return True

    def layoutManager(self) -> None:
        return None

    def setOverrideCursor(self, *args: Any) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass

    @property
    def slicerHome(self) -> str:
        return str(REPO_ROOT)


_MODULE_NAMES = {"colors": "Colors", "volumes": "Volumes", "segmentations": "Segmentations", "tables": "Tables",
                 "plots": "Plots", "subjecthierarchy": "SubjectHierarchy"}


@dataclasses.dataclass
class SlicerEnvironment:
    """A real MRML scene with the application logic and module logics."""

    scene: Any
    app_logic: Any
    logics: dict[str, Any]
    slice_logics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def node_ids(self) -> list[str]:
        """IDs of every node in the scene, in scene order."""
        return [self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())]

    def add_slice_views(self, names: tuple[str, ...] = ("Red", "Yellow", "Green")) -> dict[str, Any]:
        """Create slice nodes, slice composite nodes and ``vtkMRMLSliceLogic`` for each view, as
        the layout manager does in the application."""
        import slicer
        import vtk

        orientations = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
        collection = vtk.vtkCollection()
        for name in names:
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(self.scene)
            slice_node = logic.AddSliceNode(name)
            slice_node.SetOrientation(orientations.get(name, "Axial"))
            self.slice_logics[name] = logic
            collection.AddItem(logic)
        self.app_logic.SetSliceLogics(collection)
        return self.slice_logics


def make_scene() -> SlicerEnvironment:
    """A fresh real scene with the application logic and the Volumes, Segmentations, Colors,
    Tables, Plots, Subject hierarchy and Terminologies logics, installed as ``slicer.mrmlScene``,
    ``slicer.app`` and ``slicer.modules.<name>.logic()``."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics: dict[str, Any] = {}
    classes = {
        "colors": slicer.vtkSlicerColorLogic,
        "volumes": slicer.vtkSlicerVolumesLogic,
        "segmentations": slicer.vtkSlicerSegmentationsModuleLogic,
        "tables": slicer.vtkSlicerTablesLogic,
        "plots": slicer.vtkSlicerPlotsLogic,
        "subjecthierarchy": slicer.vtkSlicerSubjectHierarchyModuleLogic,
    }
    import vtk

    previous = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()  # the colour logic looks for colour files the wheel lacks
    try:
        for name, cls in classes.items():
            logic = cls()
            logic.SetMRMLApplicationLogic(app_logic)
            logic.SetMRMLScene(scene)
            logics[name] = logic
            app_logic.SetModuleLogic(_MODULE_NAMES[name], logic)
            if name == "colors":
                app_logic.SetColorLogic(logic)
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(previous)
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    env = SlicerEnvironment(scene, app_logic, logics)
    slicer.mrmlScene = scene
    slicer.app = _Application(env)
    modules = types.SimpleNamespace()
    for name, logic in logics.items():
        setattr(modules, name, types.SimpleNamespace(logic=(lambda value=logic: value), path=""))
    slicer.modules = modules
    return env
