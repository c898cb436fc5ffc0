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

* with PyQt5 installed, provides a stand-in for Slicer's PythonQt (:func:`install_pythonqt`): the
  real ``.ui`` loaded by PyQt5's ``uic``, every Qt object handed to the module wrapped so that
  attribute access follows PythonQt's rules, and ctk/qMRML widgets stood in by Qt base classes
  with the properties and signals the module uses (see ``Testing/test_slicer_widget.py``).

Usage (see ``Testing/test_slicer_logic.py``)::

    env = slicer_env.make_scene()          # real scene + logics, slicer.mrmlScene set
    module = slicer_env.import_module()    # StrokePredictor/StrokePredictor.py, GUI layer stubbed
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import sys
import traceback
import types
import unittest
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


class _ScriptedLoadableModuleWidget:
    """Slicer's ``ScriptedLoadableModuleWidget`` (5.8-5.12), minus the developer section: a plain
    Python class (no ``addObserver``: modules mix in ``VTKObservationMixin`` themselves) whose
    ``parent`` is the module panel (``qSlicerScriptedLoadableModuleWidget``, with ``isEntered``)."""

    def __init__(self, parent: Any = None) -> None:
        self.moduleName = type(self).__name__[:-len("Widget")] if type(self).__name__.endswith("Widget") else \
            type(self).__name__
        if parent is None:
            import qt

            parent = qt.qSlicerScriptedLoadableModuleWidget()
            parent.setLayout(qt.QVBoxLayout())
        self.parent = parent
        self.layout = self.parent.layout()

    def resourcePath(self, filename: str) -> str:
        return str(MODULE_FILE.parent / "Resources" / filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass


class _ScriptedLoadableModuleTest(unittest.TestCase):
    """Slicer's ``ScriptedLoadableModuleTest`` is a ``unittest.TestCase`` with ``delayDisplay``."""

    def __init__(self, methodName: str = "runTest") -> None:
        super().__init__(methodName)
        self.displayed: list[str] = []

    def delayDisplay(self, message: str, msec: int = 0) -> None:
        self.displayed.append(message)

    def runTest(self) -> None:  # overridden by the module's test
        pass


class _WithinRange:
    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum


class _Choice:
    def __init__(self, choices: Any) -> None:
        self.choices = list(choices)


def _base_type(hint: Any) -> Any:
    import typing

    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint


def _annotations(hint: Any) -> list[Any]:
    import typing

    found = []
    while typing.get_origin(hint) is typing.Annotated:
        args = typing.get_args(hint)
        found.extend(args[1:])
        hint = args[0]
    return found


class _Connector:
    """One widget bound to one parameter, as Slicer's ``parameterNodeWrapper.guiConnectors`` do
    it for the widget classes this module binds (checked against Slicer 5.8-5.12): the same
    signal, the same property read and written, the same set-up (combo box items from
    ``Choice``, ranges from ``WithinRange``)."""

    def __init__(self, widget: Any, hint: Any) -> None:
        self.widget = widget
        self.kind = widget.className()
        base, notes = _base_type(hint), _annotations(hint)
        bounds = next((n for n in notes if isinstance(n, _WithinRange)), None)
        choice = next((n for n in notes if isinstance(n, _Choice)), None)
        if self.kind == "qMRMLNodeComboBox" and isinstance(base, type) and base.__name__.startswith("vtkMRML"):
            widget.nodeTypes = [base.__name__]
            self.signal = "currentNodeChanged"
        elif self.kind == "QComboBox" and base in (int, float, str, bool):
            if choice is None:
                raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
            self.choices = list(choice.choices)
            widget.clear()
            for item in self.choices:
                widget.addItem(str(item))
            self.signal = "currentIndexChanged"
        elif self.kind in ("QSpinBox", "QSlider") and base is int:
            if bounds is not None:
                widget.minimum, widget.maximum = bounds.minimum, bounds.maximum
            self.signal = "valueChanged"
        elif self.kind in ("ctkSliderWidget", "QDoubleSpinBox") and base is float:
            if bounds is None and self.kind == "ctkSliderWidget":
                raise RuntimeError("Cannot have a connection to ctkSliderWidget where the float types is unbounded.")
            if bounds is not None:
                widget.minimum, widget.maximum = bounds.minimum, bounds.maximum
            self.signal = "valueChanged"
        elif self.kind == "QCheckBox" and base is bool:
            self.signal = "stateChanged"
        elif self.kind == "QLineEdit" and base is str:
            self.signal = "textChanged"
        else:
            raise RuntimeError(f"Unable to create GUI connector from datatype '{hint}' to widget type '{self.kind}'.")
        self._callback = None

    def read(self) -> Any:
        w = self.widget
        if self.kind == "qMRMLNodeComboBox":
            return w.currentNode()
        if self.kind == "QComboBox":
            return self.choices[w.currentIndex]
        if self.kind == "QCheckBox":
            return bool(w.checked)
        if self.kind == "QLineEdit":
            return w.text
        return w.value

    def write(self, value: Any) -> None:
        w = self.widget
        if self.kind == "qMRMLNodeComboBox":
            w.setCurrentNode(value)
        elif self.kind == "QComboBox":
            if value not in self.choices:
                raise ValueError(f"Unable to find value {value} in choices {self.choices}")
            w.currentIndex = self.choices.index(value)
        elif self.kind == "QCheckBox":
            w.checked = bool(value)
        elif self.kind == "QLineEdit":
            w.text = value
        else:
            w.value = value

    def on_changed(self, callback: Any) -> None:
        signal = getattr(self.widget, self.signal)
        if callback is None:
            if self._callback is not None:
                signal.disconnect(self._callback)
        else:
            signal.connect(callback)
        self._callback = callback


def _parameter_node_wrapper(cls: type) -> type:
    """Minimal ``@parameterNodeWrapper``: plain attributes with the class defaults, stored on
    the wrapped ``vtkMRMLScriptedModuleNode`` as strings for str/int/float/bool and as node
    references for MRML nodes, which is what the real decorator persists; ``connectGui`` binds
    the widgets whose ``SlicerParameterName`` property names a parameter, as the real one does
    (GUI written from the node on connect and on every node modification; a widget change
    written to the node inside ``NodeModify``)."""
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)

    def __init__(self: Any, parameterNode: Any) -> None:
        object.__setattr__(self, "parameterNode", parameterNode)
        object.__setattr__(self, "_parameterGUIs", {})
        object.__setattr__(self, "_nextTag", 0)
        object.__setattr__(self, "_updatingGUI", False)
        object.__setattr__(self, "_observing", False)

    def __getattr__(self: Any, name: str) -> Any:
        if name not in hints:
            raise AttributeError(name)
        base = _base_type(hints[name])
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
        base = _base_type(hints[name])
        node = object.__getattribute__(self, "parameterNode")
        if isinstance(base, type) and base.__name__.startswith("vtkMRML"):
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif base is bool:
            node.SetParameter(name, "true" if value else "false")
        elif base in (int, float):
            for annotation in _annotations(hints[name]):
                if isinstance(annotation, _WithinRange) and not annotation.minimum <= value <= annotation.maximum:
                    raise ValueError(f"{name}={value} is not within [{annotation.minimum}, {annotation.maximum}]")
            node.SetParameter(name, str(base(value)))
        else:
            node.SetParameter(name, "" if value is None else str(value))

    def _update_gui(self: Any, caller: Any = None, event: Any = None) -> None:
        if object.__getattribute__(self, "_updatingGUI"):
            return
        object.__setattr__(self, "_updatingGUI", True)
        try:
            for mapping in list(object.__getattribute__(self, "_parameterGUIs").values()):
                for name, connector in mapping.items():
                    connector.write(getattr(self, name))
        finally:
            object.__setattr__(self, "_updatingGUI", False)

    def connectGui(self: Any, gui: Any) -> int:
        import slicer

        widgets = {}
        for widget in vars(gui).values():
            name = widget.property("SlicerParameterName")
            if name:
                if name not in hints:
                    raise ValueError(f"{cls.__name__} has no parameter '{name}' (bound in the .ui)")
                widgets[name] = widget
        mapping = {name: _Connector(widget, hints[name]) for name, widget in widgets.items()}
        tag = object.__getattribute__(self, "_nextTag")
        object.__setattr__(self, "_nextTag", tag + 1)
        object.__getattribute__(self, "_parameterGUIs")[tag] = mapping
        def gui_to_parameter(name: str, connector: _Connector) -> Any:
            def changed() -> None:  # no parameters, like the real connector's bound method
                with slicer.util.NodeModify(self.parameterNode):
                    if not object.__getattribute__(self, "_updatingGUI"):
                        setattr(self, name, connector.read())

            return changed

        for name, connector in mapping.items():
            connector.write(getattr(self, name))
            connector.on_changed(gui_to_parameter(name, connector))
        if not object.__getattribute__(self, "_observing"):
            import vtk

            self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: _update_gui(self))
            object.__setattr__(self, "_observing", True)
        return tag

    def disconnectGui(self: Any, tag: Any) -> None:
        guis = object.__getattribute__(self, "_parameterGUIs")
        for connector in guis.pop(tag, {}).values():
            connector.on_changed(None)

    def forward(method: str) -> Any:  # the real wrapper forwards these to the MRML node
        def call(self: Any, *args: Any) -> Any:
            return getattr(object.__getattribute__(self, "parameterNode"), method)(*args)

        return call

    namespace = {"__init__": __init__, "__getattr__": __getattr__, "__setattr__": __setattr__,
                 "__annotations__": dict(hints), "connectGui": connectGui, "disconnectGui": disconnectGui,
                 **{m: forward(m) for m in ("AddObserver", "RemoveObserver", "StartModify", "EndModify", "Modified")}}
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
    slm.ScriptedLoadableModuleWidget = _ScriptedLoadableModuleWidget
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


# ----------------------------------------------------------------------------------------
# PythonQt stand-in: real Qt 5.15 widgets (PyQt5) seen through PythonQt's attribute rules
# ----------------------------------------------------------------------------------------
_SIGNAL_TYPES = {"bool": bool, "int": int, "double": float, "float": float, "QString": str}
_SLOT_ERRORS: list[str] = []  # exceptions raised in slots (PythonQt prints them and goes on)
_CONNECTIONS: dict[tuple[int, str, Any], list[Any]] = {}


def slot_errors() -> list[str]:
    """Tracebacks of exceptions raised in Python slots since the last :func:`clear_slot_errors`."""
    return list(_SLOT_ERRORS)


def clear_slot_errors() -> None:
    _SLOT_ERRORS.clear()


def _qt() -> Any:
    from PyQt5 import QtCore, QtGui, QtWidgets

    return QtCore, QtGui, QtWidgets


def wrap(value: Any) -> Any:
    """What PythonQt hands to Python: a QObject as a :class:`PythonQtObject`, lists element-wise."""
    QtCore, _, _ = _qt()
    if isinstance(value, QtCore.QObject):
        return PythonQtObject(value)
    if isinstance(value, list):
        return [wrap(v) for v in value]
    return value


def unwrap(value: Any) -> Any:
    if isinstance(value, PythonQtObject):
        return object.__getattribute__(value, "_qobject")
    if isinstance(value, (list, tuple)):
        return type(value)(unwrap(v) for v in value)
    return value


def _accepted_arguments(function: Any) -> int | None:
    """How many signal arguments PythonQt passes: the callable's positional parameters (defaults
    included, as ``co_argcount`` counts them); None for ``*args``."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    count = 0
    for parameter in parameters:
        if parameter.kind == parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


def _slot(function: Any) -> Any:
    accepted = _accepted_arguments(function)

    def call(*args: Any) -> None:
        args = tuple(wrap(a) for a in args)
        if accepted is not None:
            args = args[:accepted]
        try:
            function(*args)
        except Exception:  # noqa: BLE001 - PythonQt prints a slot's exception and carries on
            text = traceback.format_exc()
            _SLOT_ERRORS.append(text)
            print(text, file=sys.stderr)

    return call


class PythonQtSignal:
    """``widget.valueChanged`` as PythonQt returns it: ``connect``/``disconnect``/``emit``."""

    def __init__(self, qobject: Any, name: str, signature: str | None = None) -> None:
        self._qobject, self._name, self._signature = qobject, name, signature

    def _bound(self) -> Any:
        signal = getattr(self._qobject, self._name)
        if self._signature:
            types_ = [_SIGNAL_TYPES.get(t.strip(), object) for t in self._signature.split(",") if t.strip()]
            try:
                return signal[tuple(types_)] if len(types_) > 1 else signal[types_[0]]
            except (KeyError, IndexError, TypeError):
                return signal
        return signal

    def connect(self, function: Any) -> bool:
        slot = _slot(function)
        self._bound().connect(slot)
        _CONNECTIONS.setdefault((id(self._qobject), self._name, function), []).append(slot)
        return True

    def disconnect(self, function: Any) -> bool:
        slots = _CONNECTIONS.get((id(self._qobject), self._name, function))
        if not slots:
            return False
        self._bound().disconnect(slots.pop())
        return True

    def emit(self, *args: Any) -> None:
        self._bound().emit(*[unwrap(a) for a in args])


class PythonQtObject:
    """A Qt object as PythonQt wraps it (``PythonQtInstanceWrapper``):

    * reading ``obj.name`` gives the Qt property ``name`` when there is one (so ``label.text`` is
      a string, not a method), else the method or signal, else a dynamic property, else a child
      with that objectName, else AttributeError;
    * assigning ``obj.name = value`` writes a writable Qt property (AttributeError when it does
      not accept the value or is read-only) or an existing dynamic property; assigning a method
      or anything else raises AttributeError ("creating new attributes on C++ objects is not
      allowed"), exactly where PythonQt raises it;
    * ``obj.connect("signal(args)", callable)`` as PythonQt's QObject wrapper offers it.
    """

    __slots__ = ("_qobject",)

    def __init__(self, qobject: Any) -> None:
        object.__setattr__(self, "_qobject", qobject)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, PythonQtObject) and unwrap(other) is unwrap(self)

    def __hash__(self) -> int:
        return id(unwrap(self))

    def __repr__(self) -> str:
        return f"<PythonQt {self.className()} '{unwrap(self).objectName()}'>"

    def className(self) -> str:
        return unwrap(self).metaObject().className()

    def connect(self, signature: str, function: Any) -> bool:
        match = re.fullmatch(r"\s*(\w+)\((.*)\)\s*", signature)
        if not match:
            raise ValueError(f"not a signal signature: {signature!r}")
        return PythonQtSignal(unwrap(self), match.group(1), match.group(2)).connect(function)

    def disconnect(self, signature: str, function: Any) -> bool:
        match = re.fullmatch(r"\s*(\w+)\((.*)\)\s*", signature)
        return PythonQtSignal(unwrap(self), match.group(1), match.group(2)).disconnect(function)

    def _property(self, name: str) -> Any:
        meta = unwrap(self).metaObject()
        index = meta.indexOfProperty(name)
        return meta.property(index) if index >= 0 else None

    def __getattr__(self, name: str) -> Any:
        QtCore, _, _ = _qt()
        qobject = unwrap(self)
        prop = self._property(name)
        if prop is not None:
            return wrap(prop.read(qobject))
        attribute = getattr(qobject, name, None)
        if isinstance(attribute, QtCore.pyqtBoundSignal):
            return PythonQtSignal(qobject, name)
        if callable(attribute) and not name.startswith("_"):
            def method(*args: Any, **kwargs: Any) -> Any:
                return wrap(attribute(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()}))

            return method
        if name.encode() in [bytes(n) for n in qobject.dynamicPropertyNames()]:
            return wrap(qobject.property(name))
        for child in qobject.children():
            if child.objectName() == name:
                return wrap(child)
        raise AttributeError(f"{self.className()} has no attribute named '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        qobject = unwrap(self)
        prop = self._property(name)
        if prop is not None:
            if not prop.isWritable():
                raise AttributeError(f"Property '{name}' of {self.className()} object is not writable")
            if not prop.write(qobject, unwrap(value)):
                raise AttributeError(f"Property '{name}' of type '{prop.typeName()}' does not accept an object of "
                                     f"type {type(value).__name__} ({value!r})")
            return
        if callable(getattr(qobject, name, None)):
            raise AttributeError(f"Slot '{name}' can not be overwritten on {self.className()} object")
        if name.encode() in [bytes(n) for n in qobject.dynamicPropertyNames()]:
            qobject.setProperty(name, unwrap(value))
            return
        raise AttributeError(f"'{name}' does not exist on {self.className()} and creating new attributes on C++ "
                             f"objects is not allowed")

    def __bool__(self) -> bool:
        return True


def _custom_widgets() -> dict[str, type]:
    """ctk and qMRML widgets the module's .ui uses, as Qt base classes with the properties,
    signals and methods the module and Slicer's parameter node connectors use."""
    QtCore, _, QtWidgets = _qt()
    pyqtProperty, pyqtSignal = QtCore.pyqtProperty, QtCore.pyqtSignal

    class qMRMLWidget(QtWidgets.QWidget):
        mrmlSceneChanged = pyqtSignal(object)

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self._scene = None

        def setMRMLScene(self, scene: Any) -> None:
            if scene is not self._scene:
                self._scene = scene
                self.mrmlSceneChanged.emit(scene)

        def mrmlScene(self) -> Any:
            return self._scene

    class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self._entered = False

        def _get_entered(self) -> bool:
            return self._entered

        isEntered = pyqtProperty(bool, _get_entered)

    class ctkCollapsibleButton(QtWidgets.QWidget):
        contentsCollapsed = pyqtSignal(bool)

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self._collapsed, self._text = False, ""

        def _get_collapsed(self) -> bool:
            return self._collapsed

        def setCollapsed(self, value: bool) -> None:
            if bool(value) != self._collapsed:
                self._collapsed = bool(value)
                self.contentsCollapsed.emit(self._collapsed)

        def _get_text(self) -> str:
            return self._text

        def setText(self, value: str) -> None:
            self._text = str(value)

        collapsed = pyqtProperty(bool, _get_collapsed, setCollapsed)
        text = pyqtProperty(str, _get_text, setText)

    class ctkPathLineEdit(QtWidgets.QWidget):
        Dirs = 0x001
        currentPathChanged = pyqtSignal(str)

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self._path, self._filters = "", 0

        def _get_path(self) -> str:
            return self._path

        def setCurrentPath(self, value: str) -> None:
            if str(value) != self._path:
                self._path = str(value)
                self.currentPathChanged.emit(self._path)

        def _get_filters(self) -> int:
            return self._filters

        def setFilters(self, value: int) -> None:
            self._filters = int(value)

        currentPath = pyqtProperty(str, _get_path, setCurrentPath)
        filters = pyqtProperty(int, _get_filters, setFilters)

    class ctkSliderWidget(QtWidgets.QWidget):
        """A double value clamped to [minimum, maximum] and rounded to ``decimals``, as ctk's."""

        valueChanged = pyqtSignal(float)

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self._value, self._minimum, self._maximum, self._step, self._decimals = 0.0, 0.0, 99.0, 1.0, 2

        def _get_value(self) -> float:
            return self._value

        def setValue(self, value: float) -> None:
            value = round(min(max(float(value), self._minimum), self._maximum), self._decimals)
            if value != self._value:
                self._value = value
                self.valueChanged.emit(value)

        def _get_minimum(self) -> float:
            return self._minimum

        def setMinimum(self, value: float) -> None:
            self._minimum = float(value)
            self._maximum = max(self._maximum, self._minimum)
            self.setValue(self._value)

        def _get_maximum(self) -> float:
            return self._maximum

        def setMaximum(self, value: float) -> None:
            self._maximum = float(value)
            self._minimum = min(self._minimum, self._maximum)
            self.setValue(self._value)

        def _get_step(self) -> float:
            return self._step

        def setSingleStep(self, value: float) -> None:
            self._step = float(value)

        def _get_decimals(self) -> int:
            return self._decimals

        def setDecimals(self, value: int) -> None:
            self._decimals = int(value)

        value = pyqtProperty(float, _get_value, setValue)
        minimum = pyqtProperty(float, _get_minimum, setMinimum)
        maximum = pyqtProperty(float, _get_maximum, setMaximum)
        singleStep = pyqtProperty(float, _get_step, setSingleStep)
        decimals = pyqtProperty(int, _get_decimals, setDecimals)

    class qMRMLNodeComboBox(QtWidgets.QWidget):
        """Holds one node of ``nodeTypes`` from its scene; with ``noneEnabled`` off it selects the
        first such node when the scene is set (it does not follow nodes added later)."""

        currentNodeChanged = pyqtSignal(object)

        def __init__(self, parent: Any = None) -> None:
            super().__init__(parent)
            self._scene, self._node = None, None
            self._types: list[str] = []
            self._flags = {"showChildNodeTypes": True, "addEnabled": True, "removeEnabled": True,
                           "renameEnabled": False, "noneEnabled": False}

        def setMRMLScene(self, scene: Any) -> None:
            self._scene = scene
            if self._node is None and not self._flags["noneEnabled"] and scene is not None:
                for node_type in self._types:
                    first = scene.GetFirstNodeByClass(node_type)
                    if first is not None:
                        self.setCurrentNode(first)
                        break

        def mrmlScene(self) -> Any:
            return self._scene

        def currentNode(self) -> Any:
            return self._node

        def setCurrentNode(self, node: Any) -> None:
            if node is not None and self._types and not any(node.IsA(t) for t in self._types):
                raise TypeError(f"{node.GetClassName()} is not one of {self._types}")
            if node is not self._node:
                self._node = node
                self.currentNodeChanged.emit(node)

        def _get_id(self) -> str:
            return self._node.GetID() if self._node is not None else ""

        def _get_types(self) -> list[str]:
            return list(self._types)

        def setNodeTypes(self, value: list[str]) -> None:
            self._types = [str(v) for v in value]

        currentNodeID = pyqtProperty(str, _get_id)
        nodeTypes = pyqtProperty("QStringList", _get_types, setNodeTypes)

        def _flag(name: str) -> Any:
            return pyqtProperty(bool, lambda self: self._flags[name],
                                lambda self, value: self._flags.__setitem__(name, bool(value)))

        showChildNodeTypes = _flag("showChildNodeTypes")
        addEnabled = _flag("addEnabled")
        removeEnabled = _flag("removeEnabled")
        renameEnabled = _flag("renameEnabled")
        noneEnabled = _flag("noneEnabled")
        del _flag

        def _setter(name: str) -> Any:
            def setter(self: Any, value: bool) -> None:
                self._flags[name] = bool(value)

            return setter

        setShowChildNodeTypes = _setter("showChildNodeTypes")
        setAddEnabled = _setter("addEnabled")
        setRemoveEnabled = _setter("removeEnabled")
        setRenameEnabled = _setter("renameEnabled")
        setNoneEnabled = _setter("noneEnabled")
        del _setter

    return {cls.__name__: cls for cls in (qMRMLWidget, qSlicerScriptedLoadableModuleWidget, ctkCollapsibleButton,
                                          ctkPathLineEdit, ctkSliderWidget, qMRMLNodeComboBox)}


class _QtClass:
    """``qt.QComboBox`` and friends: calling it makes a wrapped object; other attributes (enums,
    static methods) are the Qt class's."""

    def __init__(self, cls: type) -> None:
        self._cls = cls

    def __call__(self, *args: Any) -> Any:
        return wrap(self._cls(*[unwrap(a) for a in args]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cls, name)


class _QtModule(types.ModuleType):
    def __init__(self, name: str, classes: dict[str, type]) -> None:
        super().__init__(name)
        self._classes = classes

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        QtCore, QtGui, QtWidgets = _qt()
        if name in self._classes:
            return _QtClass(self._classes[name])
        for module in (QtWidgets, QtCore, QtGui):
            if hasattr(module, name):
                value = getattr(module, name)
                return _QtClass(value) if isinstance(value, type) and issubclass(value, QtCore.QObject) else value
        raise AttributeError(f"module 'qt' has no attribute '{name}'")


@dataclasses.dataclass
class PythonQtEnvironment:
    """The Qt application and the stand-in modules of :func:`install_pythonqt`."""

    app: Any
    qt: types.ModuleType
    classes: dict[str, type]

    def process_events(self, seconds: float = 0.0) -> None:
        """Run Qt's event loop for ``seconds`` (timers fire, queued signals arrive)."""
        import time

        deadline = time.monotonic() + seconds
        while True:
            self.app.processEvents()
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)

    def wait_until(self, condition: Any, timeout: float = 30.0) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.app.processEvents()
            if condition():
                return True
            time.sleep(0.01)
        return bool(condition())


def load_ui(path: str) -> Any:
    """``slicer.util.loadUI``: the widget of a Qt Designer file, custom widgets included."""
    import io
    import xml.etree.ElementTree as ElementTree

    from PyQt5 import uic

    if not Path(path).is_file():
        raise RuntimeError(f"Could not load UI file: file not found {path}\n\n")
    # uic cannot connect signals with MRML argument types ("vtkMRMLScene*"): make the .ui's
    # connections here, by name, as QUiLoader does in Slicer.
    root = ElementTree.parse(path).getroot()
    connections = root.find("connections")
    wiring = []
    if connections is not None:
        for connection in connections.findall("connection"):
            wiring.append(tuple(connection.findtext(key) for key in ("sender", "signal", "receiver", "slot")))
        root.remove(connections)
    widget = uic.loadUi(io.StringIO(ElementTree.tostring(root, encoding="unicode")))
    named = {w.objectName(): w for w in [widget, *widget.findChildren(_qt()[0].QObject)]}
    for sender, signal, receiver, slot in wiring:
        getattr(named[sender], signal.split("(")[0]).connect(getattr(named[receiver], slot.split("(")[0]))
    return wrap(widget)


def child_widget_variables(widget: Any) -> Any:
    """``slicer.util.childWidgetVariables``: every named descendant as an attribute."""
    _, _, QtWidgets = _qt()
    ui = type("", (), {})()
    for child in unwrap(widget).findChildren(QtWidgets.QWidget):
        if child.objectName():
            setattr(ui, child.objectName(), wrap(child))
    return ui


def install_pythonqt() -> PythonQtEnvironment:
    """Make ``qt`` the PythonQt stand-in (a PyQt5 ``QApplication``, offscreen) and give
    ``slicer.util`` its ``loadUI``/``childWidgetVariables``; :func:`uninstall_pythonqt` undoes it
    (the ``qt_env`` fixture of ``test_slicer_widget.py`` does both)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import slicer

    install_gui_stubs()
    QtCore, _, QtWidgets = _qt()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["StrokePredictorTest"])
    classes = _custom_widgets()
    for name, cls in classes.items():  # uic imports a custom widget from the module named by its header
        module = types.ModuleType(name)
        setattr(module, name, cls)
        sys.modules[name] = module
    qt = _QtModule("qt", classes)
    sys.modules["qt"] = qt
    slicer.util.loadUI = load_ui
    slicer.util.childWidgetVariables = child_widget_variables
    return PythonQtEnvironment(app, qt, classes)


def uninstall_pythonqt(env: PythonQtEnvironment) -> None:
    """Put the non-Qt stand-ins back (``qt`` as the absorbing stub)."""
    sys.modules["qt"] = _StubModule("qt")
    for name in env.classes:
        sys.modules.pop(name, None)
