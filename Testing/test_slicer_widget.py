"""The module panel (``StrokePredictorWidget``) run in CI under a stand-in for Slicer's PythonQt.

What runs for real: the module file itself; the real ``StrokePredictor.ui`` loaded by a real
Qt 5.15 (PyQt5's ``uic``, ``QT_QPA_PLATFORM=offscreen``), real QComboBox/QLineEdit/QSpinBox/
QRadioButton/QTimer objects and Qt's event loop; a real MRML scene with Slicer's Volumes,
Segmentations and Tables logics (slicer-core); the module's Logic, scene glue and, in the Cancel
and scene-close tests, the real process runner with its ``qt.QTimer`` polling and a real
process tree.

What follows PythonQt's rules (``Testing/slicer_env.py``, after PythonQtInstanceWrapper.cpp):
every Qt object the module touches is wrapped so that ``obj.name`` reads the Qt property (a
method only when there is no property of that name), ``obj.name = value`` writes a writable Qt
property or an existing dynamic property and otherwise raises AttributeError ("creating new
attributes on C++ objects is not allowed"), ``obj.connect("signal(args)", f)`` passes as many
signal arguments as ``f`` takes, and an exception in a slot is printed and recorded (each test
asserts there was none). ctk and qMRML widgets are their Qt base classes with the properties,
signals and methods the module and Slicer's parameter-node connectors use; ``connectGui``
follows ``slicer.parameterNodeWrapper`` (same signals, same reads and writes, combo items from
``Choice``). ``ScriptedLoadableModuleWidget`` is Slicer's plain Python base class, without
``addObserver`` (that comes from ``VTKObservationMixin``).

What this cannot catch: differences between PyQt5's and PythonQt's type conversions (e.g.
QVariant, enums, overload resolution of C++ methods), methods that PythonQt does not expose
(PyQt exposes every public method, PythonQt only slots and wrapped methods), the real ctk/qMRML
widgets' behaviour beyond the stand-ins (a qMRMLNodeComboBox following node additions and
removals, ctkPathLineEdit's browse dialog, ctkCollapsibleButton's drawing), Slicer's real
``parameterNodeWrapper`` internals beyond the connectors mirrored here, the layout and look of
the panel, translation catalogs, the PythonSlicer launcher itself, and anything that needs the
Slicer application (module manager, layout manager and plot view, settings, dialogs shown
outside testing mode). The module's self-test covers those inside Slicer.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")
pytest.importorskip("PyQt5")
import slicer_env  # noqa: E402

from StrokePredictorLib import clinical  # noqa: E402
from StrokePredictorLib.io import read_volume, write_volume  # noqa: E402


@pytest.fixture(scope="module")
def module():
    return slicer_env.import_module()


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> dict[str, Path]:
    import inference_phantom

    return inference_phantom.write_case(tmp_path_factory.mktemp("case"), flair=False)


@pytest.fixture()
def qt_env(module):
    env = slicer_env.install_pythonqt()
    slicer_env.clear_slot_errors()
    yield env
    slicer_env.uninstall_pythonqt(env)


@pytest.fixture()
def scene_env(module, qt_env):
    env = slicer_env.make_scene()
    env.add_slice_views(("Red",))
    return env


@pytest.fixture()
def messages(module, monkeypatch):
    """Error popups the module shows (recorded) and no dependency installation."""
    import slicer
    from StrokePredictorSlicer import dependencies

    shown: list[str] = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *args, **kwargs: shown.append(text))
    monkeypatch.setattr(dependencies, "missing", lambda *args, **kwargs: [])
    return shown


def _is_choice(feature) -> bool:
    return feature.kind in ("binary", "categorical")


def _set_field(widget, feature, value: str) -> None:
    """Fill one clinical field the way a user does, by its widget kind."""
    field = _field(widget, feature.name)
    if _is_choice(feature):
        field.currentIndex = feature.categories.index(value) + 1 if value else 0
    else:
        field.text = value


def _panel(module, qt_env):
    """The widget as Slicer builds it: a module panel as parent, then setup()."""
    parent = qt_env.qt.qSlicerScriptedLoadableModuleWidget()
    parent.setLayout(qt_env.qt.QVBoxLayout())
    widget = module.StrokePredictorWidget(parent)
    widget.setup()
    parent.show()  # offscreen; "visible" is only true for shown widgets
    return widget


def _load(case_dir):
    import slicer

    return {name: slicer.util.loadVolume(str(case_dir[name]), {"name": name.upper()}) for name in ("dwi", "adc")}


def _field(widget, name):
    """The clinical form's widget for feature ``name`` (as PythonQt returns it)."""
    return widget.ui.clinicalFormContainer.findChild(slicer_env._qt()[2].QWidget, f"clinical_{name}")


def _composite(scene_env):
    return scene_env.scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetItemAsObject(0)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class ResultRunner:
    """Stands in for the prediction process: records what it was started with, writes result
    files on the DWI grid into ``--out`` (with ``warnings`` in summary.json), then reports
    progress and the result line by line, one line each time the test calls :meth:`step`."""

    def __init__(self, dwi_path: Path, warnings=("ADC median is unusually high",)) -> None:
        self.dwi = read_volume(dwi_path)
        self.warnings = list(warnings)
        self.started: list[dict] = []
        self.handles: list[ResultRunner.Handle] = []

    class Handle:
        def __init__(self, lines, on_line, on_finished) -> None:
            self.lines, self.on_line, self.on_finished = list(lines), on_line, on_finished
            self.finished = False
            self.cancelled = False

        def is_running(self) -> bool:
            return not self.finished

        def cancel(self) -> None:
            self.cancelled = True
            self.lines = []

        def step(self) -> None:
            if self.finished:
                return
            if self.lines:
                self.on_line(self.lines.pop(0))
                return
            self.finished = True
            self.on_finished(-9 if self.cancelled else 0)

        def wait(self, timeout=None) -> bool:
            while not self.finished:
                self.step()
            return True

    def start(self, args, *, env, cwd, on_line, on_finished):
        out = Path(args[args.index("--out") + 1])
        self.started.append({"args": list(args), "env": dict(env or {}), "cwd": cwd,
                             "clinical": json.loads(Path(args[args.index("--clinical") + 1]).read_text())})
        out.mkdir(parents=True)
        g = self.dwi.geometry
        shape = self.dwi.array.shape
        probability = np.zeros(shape, np.float32)
        probability[8:12, 15:25, 15:25] = 0.9
        for name, array in (("probability", probability), ("uncertainty", probability * 0.5),
                            ("attention_spatial", probability * 0.2)):
            write_volume(array, g, out / f"{name}.nii.gz")
        from StrokePredictorLib import outputs

        outputs.write_segmentation_nrrd((probability >= 0.5).astype(np.uint8), g, out / "lesion.seg.nrrd")
        weights = np.linspace(1.0, 2.0, len(clinical.FEATURES))
        weights = weights / weights.sum()
        features = [{"name": f.name, "label": f.label, "weight": float(w), "missing": True, "value": None}
                    for f, w in zip(clinical.FEATURES, weights, strict=True)]
        (out / "attention.json").write_text(json.dumps({"features": features}))
        summary = {"lesion_volume_ml": {"mask": 12.34, "median": 12.0, "ci95": [10.5, 14.25],
                                        "mc_ci95": [11.0, 13.5]},
                   "n_components": 2, "mean_uncertainty_in_lesion": 0.25, "threshold": 0.5, "mc_samples": 4,
                   "warnings": self.warnings}
        (out / "summary.json").write_text(json.dumps(summary))
        lines = ["PROGRESS 0.25 Preprocessing", "PROGRESS 0.5 Monte-Carlo sample 2/4", "a log line",
                 f"RESULT {out / 'summary.json'}"]
        handle = ResultRunner.Handle(lines, on_line, on_finished)
        self.handles.append(handle)
        return handle


# ----------------------------------------------------------------------------------------
def test_setup_builds_the_panel_under_pythonqt_rules(module, qt_env, scene_env, messages):
    """Finding 1: setup() must not probe widgets (QComboBox has placeholderText since Qt 5.15) nor
    assign attributes PythonQt refuses; every clinical field gets the widget its kind needs."""
    widget = _panel(module, qt_env)
    ui = widget.ui
    assert len(clinical.FEATURES) == 10
    for feature in clinical.FEATURES:
        field = _field(widget, feature.name)
        assert field is not None, feature.name
        expected = "QComboBox" if _is_choice(feature) else "QLineEdit"
        assert field.className() == expected, feature.name
        if expected == "QComboBox":
            assert [field.itemText(i) for i in range(field.count)] == [feature.missing_label, *feature.categories]
        else:
            assert field.placeholderText == feature.missing_label
    assert [ui.modelSelector.itemText(i) for i in range(ui.modelSelector.count)] == list(module.MODEL_CHOICES)
    assert [ui.deviceSelector.itemText(i) for i in range(ui.deviceSelector.count)] == ["auto", "cpu", "cuda"]
    assert ui.applyButton.enabled is False
    assert ui.validationLabel.text == "Select the DWI and ADC volumes."
    assert ui.progressBar.visible is False and ui.warningsLabel.visible is False
    assert widget._parameterNode is not None and ui.mcSamplesSpinBox.value == 20
    assert slicer_env.slot_errors() == [] and messages == []
    # The stand-in really enforces PythonQt's rule (otherwise this test could not fail).
    with pytest.raises(AttributeError, match="creating new attributes on C\\+\\+ objects is not allowed"):
        ui.modelSelector.text = "x"


def test_clinical_form_every_widget_kind_validates_and_reaches_the_parameter_node(
        module, qt_env, scene_env, case_dir, messages):
    widget = _panel(module, qt_env)
    ui = widget.ui
    nodes = _load(case_dir)
    ui.dwiSelector.setCurrentNode(nodes["dwi"])
    ui.adcSelector.setCurrentNode(nodes["adc"])
    p = widget._parameterNode
    assert p.dwi is nodes["dwi"] and p.adc is nodes["adc"]
    values = {"age": "71", "sex": "F", "nihss": "12", "onset_to_imaging_h": "", "systolic_bp": "165",
              "glucose": "7.2", "atrial_fibrillation": "yes", "prior_stroke": "no", "prestroke_mrs": "1",
              "treatment": "thrombectomy"}
    for feature in clinical.FEATURES:
        _set_field(widget, feature, values[feature.name])
    assert qt_env.wait_until(lambda: json.loads(p.clinicalJson) == values, timeout=5), p.clinicalJson
    assert ui.applyButton.enabled is True and ui.validationLabel.visible is False
    # an out-of-range value: highlighted, named, Apply off
    nihss = _field(widget, "nihss")
    nihss.text = "57"
    assert qt_env.wait_until(lambda: ui.applyButton.enabled is False, timeout=5)
    assert "nihss" in ui.validationLabel.text and "0 to 42" in ui.validationLabel.text
    assert "#ffd6d6" in nihss.styleSheet and _field(widget, "age").styleSheet == ""
    nihss.text = "12"
    assert qt_env.wait_until(lambda: ui.applyButton.enabled is True, timeout=5)
    # model choice "bundle folder" needs a folder
    ui.modelSelector.currentIndex = module.MODEL_CHOICES.index("bundle folder")
    assert p.model == "bundle folder" and ui.applyButton.enabled is False
    assert ui.validationLabel.text.startswith("Choose a model bundle folder.") and ui.bundlePathEdit.enabled
    ui.bundlePathEdit.currentPath = str(case_dir["dwi"].parent)
    assert p.bundleFolder == str(case_dir["dwi"].parent) and ui.applyButton.enabled is True
    assert slicer_env.slot_errors() == [] and messages == []


def test_apply_progress_results_warnings_and_display(module, qt_env, scene_env, case_dir, messages):
    """Apply with an injected runner; findings 6 (opacity), 7 (typing just before Apply),
    9 (overlay buttons bound to displayLayer) and the prediction's warnings in the panel."""
    widget = _panel(module, qt_env)
    ui = widget.ui
    nodes = _load(case_dir)
    ui.dwiSelector.setCurrentNode(nodes["dwi"])
    ui.adcSelector.setCurrentNode(nodes["adc"])
    runner = ResultRunner(case_dir["dwi"])
    widget.logic.runner = runner
    p = widget._parameterNode
    # Finding 7: typed and Apply pressed at once, no event processed in between.
    _field(widget, "age").text = "64"
    ui.applyButton.click()
    assert len(runner.started) == 1, messages
    assert runner.started[0]["clinical"]["age"] == 64.0
    assert json.loads(p.clinicalJson)["age"] == "64"
    assert ui.cancelButton.enabled is True and ui.applyButton.enabled is False and ui.progressBar.visible
    handle = runner.handles[0]
    handle.step()
    assert ui.progressBar.value == 25 and ui.statusLabel.text == "Preprocessing"
    handle.step()
    assert ui.progressBar.value == 50 and ui.statusLabel.text == "Monte-Carlo sample 2/4"
    handle.wait()
    assert widget._job.state == "succeeded", widget._job.error
    assert ui.cancelButton.enabled is False and ui.applyButton.enabled is True and ui.progressBar.visible is False
    assert ui.volumeValueLabel.text == "12.3 mL (MC median 12.0, 95% interval 10.5-14.2 mL), 2 component(s)"
    assert ui.uncertaintyValueLabel.text == "0.250 bits"
    top = sorted(clinical.FEATURES, key=lambda f: -clinical.FEATURES.index(f))[:3]  # weights rise with the index
    expected = zip(top, (0.1333, 0.1259, 0.1185), strict=True)
    assert ui.featuresValueLabel.text == ", ".join(f"{f.label} {w:.2f}" for f, w in expected)
    assert ui.warningsLabel.visible and "ADC median is unusually high" in ui.warningsLabel.text
    assert ui.statusLabel.text == "Done, with warnings (see Results)."
    assert ui.resultsCollapsibleButton.collapsed is False
    assert p.probability.GetName() == "DWI lesion probability" and p.featureTable is not None
    composite = _composite(scene_env)
    assert composite.GetForegroundVolumeID() == p.probability.GetID()
    assert composite.GetBackgroundVolumeID() == nodes["dwi"].GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.6)
    # Finding 6: the views follow the slider at once, not one step behind.
    ui.opacitySlider.value = 0.3
    assert p.opacity == pytest.approx(0.3)
    assert composite.GetForegroundOpacity() == pytest.approx(0.3)
    ui.opacitySlider.value = 0.85
    assert composite.GetForegroundOpacity() == pytest.approx(0.85)
    # Finding 9: the radio buttons write displayLayer, and displayLayer checks the buttons.
    ui.uncertaintyRadioButton.click()
    assert p.displayLayer == "uncertainty"
    assert composite.GetForegroundVolumeID() == p.uncertainty.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.85)
    p.displayLayer = "attention"
    assert ui.attentionRadioButton.checked is True and ui.uncertaintyRadioButton.checked is False
    assert composite.GetForegroundVolumeID() == p.attention.GetID()
    assert slicer_env.slot_errors() == [] and messages == []


def test_no_warnings_label_when_the_summary_has_none(module, qt_env, scene_env, case_dir, messages):
    widget = _panel(module, qt_env)
    nodes = _load(case_dir)
    widget.ui.dwiSelector.setCurrentNode(nodes["dwi"])
    widget.ui.adcSelector.setCurrentNode(nodes["adc"])
    widget.logic.runner = ResultRunner(case_dir["dwi"], warnings=())
    widget.ui.applyButton.click()
    widget.logic.runner.handles[0].wait()
    assert widget.ui.statusLabel.text == "Done." and widget.ui.warningsLabel.visible is False
    assert slicer_env.slot_errors() == [] and messages == []


# A prediction process stand-in that starts a grandchild (as the PythonSlicer launcher starts
# the real Python) and runs until it is killed.
TREE_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(os.environ["SP_PIDS"], "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    print("PROGRESS 0.1 started", flush=True)
    time.sleep(120)
""")


class TreeRunner:
    """The module's own runner (``SubprocessRunner`` polling with ``qtSchedule``), running
    :data:`TREE_SCRIPT` instead of the prediction command."""

    def __init__(self, module, pid_file: Path) -> None:
        from StrokePredictorSlicer.runner import SubprocessRunner

        self.inner = SubprocessRunner(schedule=module.qtSchedule)
        self.pid_file = pid_file

    def start(self, args, *, env, cwd, on_line, on_finished):
        return self.inner.start([sys.executable, "-c", TREE_SCRIPT], env={**(env or {}), "SP_PIDS": str(self.pid_file)},
                                cwd=cwd, on_line=on_line, on_finished=on_finished)


def _start_tree(module, qt_env, widget, case_dir, tmp_path):
    nodes = _load(case_dir)
    widget.ui.dwiSelector.setCurrentNode(nodes["dwi"])
    widget.ui.adcSelector.setCurrentNode(nodes["adc"])
    pid_file = tmp_path / "pids"
    widget.logic.runner = TreeRunner(module, pid_file)
    widget.ui.applyButton.click()
    assert qt_env.wait_until(lambda: widget.ui.statusLabel.text == "started", timeout=30)  # via the QTimer
    pids = [int(x) for x in pid_file.read_text().split()]
    assert all(_alive(pid) for pid in pids)
    return pids


def test_cancel_ends_the_whole_process_tree(module, qt_env, scene_env, case_dir, tmp_path, messages):
    widget = _panel(module, qt_env)
    pids = _start_tree(module, qt_env, widget, case_dir, tmp_path)
    ids = scene_env.node_ids()
    assert widget.ui.progressBar.value == 10 and widget.ui.cancelButton.enabled is True
    widget.ui.cancelButton.click()
    assert qt_env.wait_until(lambda: widget._job.state == "cancelled", timeout=15)
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "the prediction's child process survived Cancel"
    assert widget.ui.statusLabel.text == "Cancelled; the scene was left as it was."
    assert widget.ui.applyButton.enabled is True and widget.ui.cancelButton.enabled is False
    assert scene_env.node_ids() == ids
    assert slicer_env.slot_errors() == [] and messages == []


def test_scene_close_ends_the_process_tree_and_resets_the_panel(module, qt_env, scene_env, case_dir, tmp_path,
                                                               messages):
    import slicer

    widget = _panel(module, qt_env)
    pids = _start_tree(module, qt_env, widget, case_dir, tmp_path)
    job = widget._job
    slicer.mrmlScene.Clear()  # File > Close Scene: StartCloseEvent ... EndCloseEvent
    assert job.state == "cancelled"  # stopped within the close, before any further event processing
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "the prediction's child process survived closing the scene"
    assert widget._parameterNode is None  # the panel is not entered: no new parameter node yet
    assert widget.ui.applyButton.enabled is False and widget.ui.cancelButton.enabled is False
    widget.enter()
    assert widget._parameterNode is not None and widget.ui.validationLabel.text == "Select the DWI and ADC volumes."
    assert slicer_env.slot_errors() == [] and messages == []


def test_restoring_a_saved_parameter_node_fills_the_panel(module, qt_env, scene_env, case_dir, tmp_path, messages):
    """A scene saved with the module's settings (MRML file) is loaded; the panel shows them and
    does not overwrite them."""
    import slicer

    nodes = _load(case_dir)
    saved = {"age": "80", "sex": "M", "nihss": "7", "treatment": "thrombolysis", "atrial_fibrillation": "no"}
    p = module.StrokePredictorLogic(runner=object(), python="python").getParameterNode()
    p.clinicalJson = json.dumps(saved)
    p.model, p.device, p.mcSamples, p.opacity, p.displayLayer = "outcome", "cpu", 7, 0.35, "uncertainty"
    p.modelThreshold, p.threshold = False, 0.4
    p.dwi, p.adc = nodes["dwi"], nodes["adc"]
    scene_file = tmp_path / "saved.mrml"
    scene_env.scene.SetURL(str(scene_file))
    assert scene_env.scene.Commit()
    slicer.mrmlScene.Clear()
    scene_env.scene.SetURL(str(scene_file))
    assert scene_env.scene.Import()
    restored = slicer.mrmlScene.GetNodesByClass("vtkMRMLScriptedModuleNode")
    assert restored.GetNumberOfItems() == 1

    widget = _panel(module, qt_env)
    ui = widget.ui
    p = widget._parameterNode
    assert p.parameterNode.GetID() == restored.GetItemAsObject(0).GetID()
    qt_env.process_events(0.4)  # let the form's timer run: it must not rewrite the saved values
    assert json.loads(p.clinicalJson) == {**{f.name: "" for f in clinical.FEATURES}, **saved}
    fields = {f.name: _field(widget, f.name) for f in clinical.FEATURES}
    assert fields["age"].text == "80" and fields["nihss"].text == "7" and fields["glucose"].text == ""
    assert fields["sex"].currentText == "M" and fields["treatment"].currentText == "thrombolysis"
    assert fields["prior_stroke"].currentIndex == 0
    assert ui.modelSelector.currentText == "outcome" and ui.deviceSelector.currentText == "cpu"
    assert ui.mcSamplesSpinBox.value == 7 and ui.opacitySlider.value == pytest.approx(0.35)
    assert ui.modelThresholdCheckBox.checked is False and ui.thresholdSlider.enabled is True
    assert ui.thresholdSlider.value == pytest.approx(0.4)
    assert ui.uncertaintyRadioButton.checked is True and ui.probabilityRadioButton.checked is False
    assert ui.dwiSelector.currentNode().GetName() == "DWI" and ui.adcSelector.currentNode().GetName() == "ADC"
    assert ui.applyButton.enabled is True
    assert slicer_env.slot_errors() == [] and messages == []


def test_older_slicer_is_refused_in_the_panel_and_5_8_is_accepted(module, qt_env, scene_env, messages, monkeypatch):
    import slicer

    assert module.slicerVersionProblem((5, 8)) is None and module.slicerVersionProblem((6, 0)) is None
    monkeypatch.setattr(slicer.app, "majorVersion", 5, raising=False)
    monkeypatch.setattr(slicer.app, "minorVersion", 6, raising=False)
    widget = _panel(module, qt_env)
    label = widget.parent.findChild(slicer_env._qt()[2].QLabel, "versionProblemLabel")
    assert label is not None and label.text == (
        "Stroke Predictor needs 3D Slicer 5.8 or newer; this is 5.6. Install a current Slicer release to use it.")
    assert widget.logic is None
    widget.enter()
    widget.cleanup()
    monkeypatch.setattr(slicer.app, "minorVersion", 8, raising=False)
    widget = _panel(module, qt_env)
    assert widget.logic is not None and widget.ui.applyButton.enabled is False
    assert slicer_env.slot_errors() == [] and messages == []


@pytest.mark.slow
def test_apply_runs_the_real_prediction_through_the_panel(module, qt_env, scene_env, case_dir, tmp_path, messages):
    """No injection: the panel's own runner (QTimer polling) runs ``python -m
    StrokePredictorLib.predict`` on a tiny random bundle chosen as a bundle folder."""
    import inference_phantom

    bundle = inference_phantom.write_tiny_bundle(tmp_path / "bundle")
    widget = _panel(module, qt_env)
    ui = widget.ui
    nodes = _load(case_dir)
    ui.dwiSelector.setCurrentNode(nodes["dwi"])
    ui.adcSelector.setCurrentNode(nodes["adc"])
    ui.modelSelector.currentIndex = module.MODEL_CHOICES.index("bundle folder")
    ui.bundlePathEdit.currentPath = str(bundle)
    ui.mcSamplesSpinBox.value = 3
    _set_field(widget, clinical.FEATURES[0], "70")
    ui.applyButton.click()
    seen = set()
    assert qt_env.wait_until(lambda: seen.add(ui.progressBar.value) or not widget._job.running, timeout=180)
    assert widget._job.state == "succeeded", widget._job.error
    assert len(seen - {0}) >= 2  # progress arrived while it ran
    p = widget._parameterNode
    assert p.probability is not None and p.segmentation is not None
    assert ui.volumeValueLabel.text.endswith("component(s)") and ui.statusLabel.text.startswith("Done")
    warnings = module.panel.prediction_warnings(widget._job.result.summary)
    assert ui.warningsLabel.visible == bool(warnings)
    assert _composite(scene_env).GetForegroundVolumeID() == p.probability.GetID()
    assert slicer_env.slot_errors() == [] and messages == []
