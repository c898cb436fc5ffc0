"""StrokePredictor: acute ischemic stroke lesion prediction from DWI, ADC, optional FLAIR and
clinical data, with Monte-Carlo-dropout uncertainty and attention weights.

Module layout (Slicer's scripted-module template): Module, ParameterNode, Widget, Logic, Test.
The Widget only binds the panel to the parameter node and calls the Logic. The Logic holds no
Qt: it turns nodes into files, runs ``python -m StrokePredictorLib.predict`` in a background
process through an injectable runner (``StrokePredictorSlicer.runner``) and turns the result
files back into nodes (``StrokePredictorSlicer.scene``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import unittest
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
RESOURCES = MODULE_DIR / "Resources"
MODELS_DIR = RESOURCES / "Models"
SAMPLE_DATA_DIR = RESOURCES / "SampleData"

# In a source checkout StrokePredictorLib lies beside the module folder; in an installed
# extension it is packaged next to the module (see CMakeLists.txt).
for _candidate in (MODULE_DIR, MODULE_DIR.parent):
    if (_candidate / "StrokePredictorLib" / "__init__.py").is_file() and str(_candidate) not in sys.path:
        sys.path.append(str(_candidate))
        break

from StrokePredictorSlicer import cli, dependencies, panel, scene  # noqa: E402
from StrokePredictorSlicer.runner import ProcessHandle, ProcessRunner, SubprocessRunner  # noqa: E402

from StrokePredictorLib import clinical  # noqa: E402 (light: numpy only)
from StrokePredictorLib.errors import BundleError, StrokePredictorError  # noqa: E402
from StrokePredictorLib.io import find_case_files  # noqa: E402

logger = logging.getLogger(__name__)

MODEL_CHOICES = ("acute", "outcome", "bundle folder")
# The oldest Slicer the module is checked against (Slicer 5.8: Python 3.9, launchConsoleProcess
# without callbacks, no slicer.packaging); see README "In 3D Slicer".
MINIMUM_SLICER = (5, 8)


def slicerVersionProblem(version: tuple[int, int] | None = None) -> str | None:
    """Why this Slicer cannot run the module (older than :data:`MINIMUM_SLICER`), or None.

    ``version`` defaults to the running application's; outside the application (batch use,
    tests) there is none and nothing is refused.
    """
    if version is None:
        app = getattr(slicer, "app", None)
        major, minor = getattr(app, "majorVersion", None), getattr(app, "minorVersion", None)
        if not isinstance(major, int) or not isinstance(minor, int):
            return None
        version = (major, minor)
    if tuple(version) >= MINIMUM_SLICER:
        return None
    return (f"Stroke Predictor needs 3D Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or newer; this is "
            f"{version[0]}.{version[1]}. Install a current Slicer release to use it.")


#
# Module
#
class StrokePredictor(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Stroke Predictor")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["StrokePredictor contributors"]
        self.parent.helpText = _(
            "Predicts the acute ischemic stroke lesion (or the final infarct) from DWI, ADC, optional FLAIR and "
            "clinical data, with a Monte-Carlo-dropout uncertainty map, the lesion volume with a 95% interval, "
            "and the attention weights of the clinical-imaging fusion network. Research use only."
        )
        self.parent.acknowledgementText = _(
            "Uses the ISLES 2022 data layout. Built on 3D Slicer, PyTorch and SimpleITK."
        )
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "connect"):
            app.connect("startupCompleted()", registerSampleData)


def sampleDataFiles() -> dict[str, Path] | None:
    """The bundled sample case: ``{"dwi", "adc", "flair"?, "clinical"?}`` or None when absent."""
    found = find_case_files(SAMPLE_DATA_DIR)
    return found if "dwi" in found and "adc" in found else None


def registerSampleData():
    """Add the bundled sample case to the Sample Data module (when it is installed)."""
    files = sampleDataFiles()
    if files is None:
        return
    import SampleData

    volumes = [role for role in ("dwi", "adc", "flair") if role in files]
    sums = sampleDataChecksums()
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="StrokePredictor",
        sampleName="StrokePredictorSampleCase",
        uris=[files[role].as_uri() for role in volumes],
        fileNames=[files[role].name for role in volumes],
        nodeNames=[f"StrokeSample_{role.upper()}" for role in volumes],
        thumbnailFileName=str(RESOURCES / "Icons" / "StrokePredictor.png"),
        loadFileTypes=["VolumeFile"] * len(volumes),
        checksums=[f"SHA256:{sums[files[role].name]}" if files[role].name in sums else None for role in volumes],
    )


def sampleDataChecksums() -> dict[str, str]:
    """``{file name: sha256}`` from ``Resources/SampleData/SHA256SUMS`` (empty when absent)."""
    path = SAMPLE_DATA_DIR / "SHA256SUMS"
    if not path.is_file():
        return {}
    pairs = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {name: digest for digest, name in pairs}


#
# Parameter node
#
@parameterNodeWrapper
class StrokePredictorParameterNode:
    """Settings and results of the module, saved with the scene.

    dwi, adc, flair: input volumes (FLAIR optional).
    clinicalJson: the clinical form as JSON ``{field: raw text}`` (empty or missing = unknown).
    model: bundled model ("acute" lesion, "outcome" final infarct) or "bundle folder".
    bundleFolder: a model bundle folder (used when model is "bundle folder").
    device: "auto", "cpu" or "cuda". mcSamples: Monte-Carlo dropout samples. threshold: lesion threshold, used when
    modelThreshold is off (on: the bundle's threshold, chosen on validation data).
    opacity, displayLayer: how the results are shown. The other fields are the last result's nodes.
    """

    dwi: vtkMRMLScalarVolumeNode
    adc: vtkMRMLScalarVolumeNode
    flair: vtkMRMLScalarVolumeNode
    clinicalJson: str = "{}"
    model: Annotated[str, Choice(list(MODEL_CHOICES))] = "acute"
    bundleFolder: str = ""
    device: Annotated[str, Choice(list(cli.DEVICES))] = "auto"
    mcSamples: Annotated[int, WithinRange(1, 200)] = 20
    threshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    modelThreshold: bool = True
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    displayLayer: Annotated[str, Choice(["probability", "uncertainty", "attention"])] = "probability"
    probability: vtkMRMLScalarVolumeNode
    uncertainty: vtkMRMLScalarVolumeNode
    attention: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    statistics: vtkMRMLTableNode
    featureTable: vtkMRMLTableNode


#
# Widget
#
class StrokePredictorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Binds the .ui to the parameter node and calls the Logic; nothing else.

    What the panel shows is decided in ``StrokePredictorSlicer.panel`` (no Qt), so that it is
    tested without Slicer; ``Testing/test_slicer_widget.py`` runs this class under PythonQt's rules.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for the scene and parameter node observers
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._fields = {}  # feature name -> (panel.ClinicalField, widget)
        self._clinicalTimer = None
        self._shownDisplay = None  # (layer, overlay ID, DWI ID, opacity) last shown in the slice views
        self._whatIfNames: list[str] = []  # feature name of each entry of the what-if field selector

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        problem = slicerVersionProblem()
        if problem:  # say so in the panel instead of failing somewhere inside it
            label = qt.QLabel(problem)
            label.wordWrap = True
            label.setObjectName("versionProblemLabel")
            self.layout.addWidget(label)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/StrokePredictor.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = StrokePredictorLogic(runner=SubprocessRunner(schedule=qtSchedule,
                                                                  base_environment=startupEnvironment))
        # The form reaches the parameter node 200 ms after the last keystroke; Apply flushes it.
        self._clinicalTimer = qt.QTimer()
        self._clinicalTimer.setSingleShot(True)
        self._clinicalTimer.setInterval(200)
        self._clinicalTimer.connect("timeout()", self._onClinicalEdited)
        self._buildClinicalForm()
        self.ui.modelSelector.clear()
        self.ui.modelSelector.addItems(list(MODEL_CHOICES))
        self.ui.deviceSelector.clear()
        self.ui.deviceSelector.addItems(list(cli.DEVICES))
        self.ui.whatIfFieldSelector.clear()
        for label, name in panel.what_if_fields():
            self.ui.whatIfFieldSelector.addItem(label)
            self._whatIfNames.append(name)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.bundlePathEdit.connect("currentPathChanged(QString)", self.onBundleFolderChanged)
        for button, layer in self._overlayButtons():
            button.connect("toggled(bool)", lambda checked, layer=layer: self.onOverlayToggled(layer, checked))
        # The opacity slider is bound to the parameter node (SlicerParameterName); the views follow
        # the parameter node in _onParameterNodeModified, so they never lag behind the slider.
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
        self.ui.warningsLabel.setVisible(False)
        self.ui.resultsCollapsibleButton.collapsed = True
        self.initializeParameterNode()

    def _overlayButtons(self) -> list:
        return [(self.ui.probabilityRadioButton, "probability"), (self.ui.uncertaintyRadioButton, "uncertainty"),
                (self.ui.attentionRadioButton, "attention")]

    def _buildClinicalForm(self) -> None:
        """One row per schema feature (``panel.clinical_fields``): choices in a combo box whose first
        item is the feature's "unknown" label, numbers in a line edit (empty = unknown)."""
        import qt

        layout = qt.QFormLayout(self.ui.clinicalFormContainer)
        layout.setContentsMargins(0, 0, 0, 0)
        for field in panel.clinical_fields():
            if field.kind == "choice":
                widget = qt.QComboBox()
                for text, _value in field.items:
                    widget.addItem(text)
                widget.connect("currentIndexChanged(int)", lambda index: self._clinicalTimer.start())
            else:
                widget = qt.QLineEdit()
                widget.setPlaceholderText(field.placeholder)
                widget.connect("textChanged(QString)", lambda text: self._clinicalTimer.start())
            widget.setObjectName(f"clinical_{field.name}")
            widget.setToolTip(field.tooltip)
            layout.addRow(field.label, widget)
            self._fields[field.name] = (field, widget)

    def _clinicalRaw(self) -> dict[str, str]:
        """The form's values ``{feature: raw text}``, each widget read by its field's kind."""
        raw = {}
        for name, (field, widget) in self._fields.items():
            raw[name] = field.value_at(widget.currentIndex) if field.kind == "choice" else widget.text.strip()
        return raw

    def _onClinicalEdited(self) -> None:
        if self._parameterNode:
            self._parameterNode.clinicalJson = json.dumps(self._clinicalRaw())
        self._updateValidation()

    def _flushClinicalForm(self) -> None:
        """Write the form to the parameter node now (a value typed just before Apply counts)."""
        if self._clinicalTimer is not None:
            self._clinicalTimer.stop()
        self._onClinicalEdited()

    def _updateValidation(self) -> None:
        """Highlight invalid clinical values (validated by the Lib's schema) and enable Apply
        only when the inputs and values are usable, showing the reason otherwise."""
        bad = panel.field_problems(self._clinicalRaw())
        for name, (_field, widget) in self._fields.items():
            widget.setStyleSheet("background-color: #ffd6d6" if name in bad else "")
        p = self._parameterNode
        problems = panel.apply_problems(
            bad, have_dwi=p is not None and p.dwi is not None, have_adc=p is not None and p.adc is not None,
            model=p.model if p is not None else "", bundle_folder=p.bundleFolder if p is not None else "")
        running = self._job is not None and self._job.running
        self.ui.validationLabel.text = "\n".join(problems)
        self.ui.validationLabel.setVisible(bool(problems))
        self.ui.applyButton.enabled = not problems and not running
        self.ui.compareButton.enabled = not problems and not running
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _("Run the prediction.")

    def cleanup(self) -> None:
        if self.logic is None:  # setup() refused this Slicer
            return
        self._stopJob()
        if self._clinicalTimer is not None:
            self._clinicalTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def _stopJob(self, timeout: float = 10.0) -> None:
        """Cancel a running prediction and wait (up to ``timeout`` s) until its process tree is gone."""
        if self._job is not None and self._job.running:
            self._job.cancel()
            self._job.wait(timeout)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.dwi:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.dwi = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        self._shownDisplay = None
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._restoreClinicalForm()
            self.ui.bundlePathEdit.currentPath = self._parameterNode.bundleFolder
            self._onParameterNodeModified()
        else:
            self._updateValidation()

    def _restoreClinicalForm(self) -> None:
        raw = panel.parse_clinical_json(self._parameterNode.clinicalJson)
        for name, (field, widget) in self._fields.items():
            value = raw.get(name, "")
            if field.kind == "choice":
                widget.currentIndex = field.index_of(value)
            else:
                widget.text = value

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.ui.bundlePathEdit.setEnabled(p.model == "bundle folder")
        self.ui.thresholdSlider.setEnabled(not p.modelThreshold)
        for button, layer in self._overlayButtons():
            if button.checked != (layer == p.displayLayer):
                button.checked = layer == p.displayLayer
        self._showDisplayLayer()
        self._updateValidation()

    def onBundleFolderChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.bundleFolder = path

    def onOverlayToggled(self, layer: str, checked: bool) -> None:
        if checked and self._parameterNode and self._parameterNode.displayLayer != layer:
            self._parameterNode.displayLayer = layer

    def _showDisplayLayer(self) -> None:
        """Show the parameter node's display layer and opacity in the slice views (when there is
        a result and it changed since last shown)."""
        p = self._parameterNode
        overlay = {"probability": p.probability, "uncertainty": p.uncertainty, "attention": p.attention}.get(
            p.displayLayer)
        if overlay is None:
            return
        state = (p.displayLayer, overlay.GetID(), p.dwi.GetID() if p.dwi is not None else None, float(p.opacity))
        if state != self._shownDisplay:
            self._shownDisplay = state
            scene.show_layer(p.dwi, overlay, p.opacity, p.segmentation)

    def onApplyButton(self) -> None:
        def start(p, bundle):  # noqa: ANN001, ANN202
            return self.logic.startPrediction(
                p.dwi, p.adc, p.flair, panel.parse_clinical_json(p.clinicalJson), bundle=bundle, device=p.device,
                mcSamples=p.mcSamples, threshold=None if p.modelThreshold else p.threshold,
                onProgress=self._onProgress, onFinished=self._onFinished,
            )
        self._startJob(_("Stroke prediction could not start."), start)

    def _startJob(self, failure: str, start) -> None:  # noqa: ANN001
        """Flush the form, make sure the dependencies are there, then ``start(parameterNode, bundle)``."""
        self._flushClinicalForm()
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            if not self._ensureDependencies():
                return
            p = self._parameterNode
            self._job = start(p, self.logic.resolveBundle(p.model, p.bundleFolder))
            self._showStarted()

    def _ensureDependencies(self) -> bool:
        absent = dependencies.missing()
        if not absent:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _("Stroke Predictor needs these Python packages, which are not installed yet (or are too old):")
            + "\n\n  " + "\n  ".join(absent) + "\n\n" + _("Install them now? (This can take several minutes.)"),
            _("Install dependencies"),
        ):
            self.ui.statusLabel.text = _("Dependencies not installed; prediction not started.")
            return False
        with slicer.util.WaitCursor():
            dependencies.install(absent)
        return True

    def _onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def _jobEnded(self, job: PredictionJob, status: str, error: str) -> bool:
        """Panel state after a job; True when it succeeded and the scene is still there."""
        self.ui.cancelButton.setEnabled(False)
        self.ui.progressBar.setVisible(False)
        self._updateValidation()
        if job.state == "cancelled":
            self.ui.statusLabel.text = _("Cancelled; the scene was left as it was.")
            return False
        if job.state != "succeeded":
            self.ui.statusLabel.text = status
            slicer.util.errorDisplay(error + f"\n\n{job.error}")
            return False
        return self._parameterNode is not None  # None: the scene was closed meanwhile

    def _onFinished(self, job: PredictionJob) -> None:
        if not self._jobEnded(job, _("Prediction failed."), _("Stroke prediction failed:")):
            return
        result = job.result
        p = self._parameterNode
        with slicer.util.NodeModify(p):
            p.probability, p.uncertainty, p.attention = result.probability, result.uncertainty, result.attention
            p.segmentation, p.statistics = result.segmentation, result.statistics_table
            p.featureTable = result.feature_table
        texts = panel.result_texts(result.summary, result.features)
        self.ui.volumeValueLabel.text = texts["volume"]
        self.ui.uncertaintyValueLabel.text = texts["uncertainty"]
        self.ui.featuresValueLabel.text = texts["features"]
        self.ui.warningsLabel.text = texts["warnings"]
        self.ui.warningsLabel.setVisible(bool(texts["warnings"]))
        warnings = len(panel.prediction_warnings(result.summary))
        self.ui.statusLabel.text = _("Done.") if not warnings else _("Done, with warnings (see Results).")
        self.ui.resultsCollapsibleButton.collapsed = False
        self._showDisplayLayer()
        self.logic.showChart(result.feature_chart)

    def onCompareButton(self) -> None:
        """Start a what-if comparison of two values of one clinical field (the Logic does the work)."""
        def start(p, bundle):  # noqa: ANN001, ANN202
            return self.logic.startComparison(
                p.dwi, p.adc, p.flair, panel.parse_clinical_json(p.clinicalJson),
                field=self._whatIfNames[self.ui.whatIfFieldSelector.currentIndex],
                first=self.ui.whatIfFirstEdit.text.strip(), second=self.ui.whatIfSecondEdit.text.strip(),
                bundle=bundle, device=p.device, mcSamples=p.mcSamples,
                threshold=None if p.modelThreshold else p.threshold,
                onProgress=self._onProgress, onFinished=self._onComparisonFinished,
            )
        self._startJob(_("The what-if comparison could not start."), start)

    def _showStarted(self) -> None:
        """Progress bar, status and Cancel once a job has started (not before: a refused start
        leaves the panel as it was)."""
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting...")
        self.ui.cancelButton.setEnabled(True)
        self._updateValidation()

    def _onComparisonFinished(self, job: PredictionJob) -> None:
        if not self._jobEnded(job, _("What-if comparison failed."), _("The what-if comparison failed:")):
            return
        p = self._parameterNode
        result = job.result
        self.ui.whatIfResultLabel.text = panel.comparison_text(result.comparison, result.scenarios)
        self.ui.statusLabel.text = _("Comparison done.")
        self.ui.whatIfCollapsibleButton.collapsed = False
        scene.show_comparison(p.dwi, result.difference, result.regions, p.opacity)
        self._shownDisplay = None  # the views show the comparison until a prediction layer is chosen again

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._job.cancel()


def qtSchedule(poll: Callable[[], None], intervalMs: int) -> Callable[[], None]:
    """Call ``poll`` every ``intervalMs`` on Qt's main thread (a ``qt.QTimer``); returns the stop
    function. This is how ``SubprocessRunner`` delivers the prediction's output in the panel."""
    import qt

    timer = qt.QTimer()
    timer.setInterval(int(intervalMs))
    timer.connect("timeout()", poll)
    timer.start()
    return timer.stop


def startupEnvironment() -> dict[str, str]:
    """The environment Slicer was started with (``PythonSlicer`` then sets up its own), or this
    process's environment outside the Slicer application."""
    try:
        return dict(slicer.util.startupEnvironment())
    except AttributeError:  # no slicer.app.startupEnvironment(): not inside the application
        return dict(os.environ)


#
# Logic
#
def pythonExecutable() -> str:
    """Slicer's Python (``PythonSlicer``) when running in Slicer, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class PredictionJob:
    """One running prediction: progress, cancel, and the result nodes once finished.

    ``state`` is ``running``, ``succeeded``, ``failed`` or ``cancelled``. Result nodes are added
    to the scene only when the process has succeeded, all at once; a failed or cancelled job
    leaves the scene unchanged. The temporary folder is removed when the job ends.
    """

    def __init__(self, dwi, workdir: Path, onProgress=None, onFinished=None, kind: str = "prediction") -> None:
        self.dwi = dwi
        self.workdir = workdir
        self.kind = kind  # "prediction" (ResultNodes) or "comparison" (ComparisonNodes)
        self.state = "running"
        self.fraction = 0.0
        self.message = ""
        self.error: str | None = None
        self.result: scene.ResultNodes | scene.ComparisonNodes | None = None
        self.log: list[str] = []
        self._summary: Path | None = None
        self._errorLine: str | None = None
        self._cancelled = False
        self._onProgress = onProgress
        self._onFinished = onFinished
        self.handle: ProcessHandle | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def cancel(self) -> None:
        """Kill the process; the scene stays as it was."""
        if self.running and self.handle is not None:
            self._cancelled = True
            self.handle.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Process the job's events until it ends (or ``timeout`` s); True when it ended."""
        return self.handle.wait(timeout) if self.handle is not None else True

    def onLine(self, line: str) -> None:
        parsed = cli.parse_line(line)
        if parsed.kind == "progress":
            self.fraction, self.message = float(parsed.fraction), parsed.text
            if self._onProgress is not None:
                self._onProgress(self.fraction, self.message)
        elif parsed.kind == "result":
            self._summary = Path(parsed.text)
        elif parsed.kind == "error":
            self._errorLine = parsed.text
        else:
            self.log = (self.log + [line])[-50:]
            logger.debug("predict: %s", line)

    def onProcessFinished(self, code: int) -> None:
        try:
            if self._cancelled:
                self.state = "cancelled"
            elif code != 0 or self._summary is None:
                self.state = "failed"
                self.error = self._errorLine or (
                    f"The prediction process stopped with exit code {code}. Last output:\n" + "\n".join(self.log[-10:])
                )
            elif self.kind == "comparison":
                self.result = scene.create_comparison_nodes(self._summary, self.dwi)
                self.state = "succeeded"
            else:
                self.result = scene.create_result_nodes(self._summary, self.dwi)
                self.state = "succeeded"
        except StrokePredictorError as error:
            self.state, self.error = "failed", str(error)
        except Exception as error:  # noqa: BLE001 - reported to the user, scene already rolled back
            logger.exception("Loading the prediction failed")
            self.state, self.error = "failed", f"Loading the prediction into the scene failed: {error}"
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self._onFinished is not None:
                self._onFinished(self)


class StrokePredictorLogic(ScriptedLoadableModuleLogic):
    """Everything that should be possible in batch mode: no Qt here.

    Args:
        runner: starts the prediction process (default: ``SubprocessRunner`` from Slicer's startup
            environment, callbacks delivered by ``PredictionJob.wait``; the panel passes one that
            polls with a ``qt.QTimer``; tests pass their own).
        python: the interpreter that runs ``StrokePredictorLib.predict`` (default: PythonSlicer).
    """

    def __init__(self, runner: ProcessRunner | None = None, python: str | None = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner = runner if runner is not None else SubprocessRunner(base_environment=startupEnvironment)
        self.python = python or pythonExecutable()

    def getParameterNode(self):
        return StrokePredictorParameterNode(super().getParameterNode())

    @staticmethod
    def resolveBundle(model: str = "acute", folder: str | os.PathLike | None = None) -> Path:
        """The bundle folder for a model choice ("acute", "outcome" or "bundle folder").

        Raises:
            BundleError: the folder has no model.json.
        """
        if model == "bundle folder":
            if not folder:
                raise BundleError("Choose a model bundle folder (it contains model.json and weights.safetensors).")
            path = Path(folder)
        elif model in ("acute", "outcome"):
            path = MODELS_DIR / model
        else:
            raise BundleError(f"Unknown model choice '{model}'; expected one of {', '.join(MODEL_CHOICES)}.")
        if not (path / "model.json").is_file():
            which = f"The bundled '{model}' model" if model != "bundle folder" else f"The folder {path}"
            raise BundleError(f"{which} is not a model bundle: {path / 'model.json'} is missing.")
        return path

    def startPrediction(
        self,
        dwi,
        adc,
        flair=None,
        clinicalValues: Mapping[str, Any] | clinical.ClinicalRecord | None = None,
        *,
        bundle: str | os.PathLike,
        device: str = "auto",
        mcSamples: int = 20,
        threshold: float | None = None,
        seed: int = 0,
        onProgress: Callable[[float, str], None] | None = None,
        onFinished: Callable[[PredictionJob], None] | None = None,
        _whatIf: list[str] | None = None,
    ) -> PredictionJob:
        """Check the inputs, write them to a temporary folder and start the prediction process.

        Returns at once; the job reports progress through ``onProgress(fraction, message)`` and
        calls ``onFinished(job)`` when it has ended (see :class:`PredictionJob`).

        Raises:
            StrokePredictorError: missing or unusable inputs, invalid clinical values or a bad
                bundle; nothing is written to the scene.
        """
        scene.check_input_nodes(dwi, adc, flair)
        if isinstance(clinicalValues, clinical.ClinicalRecord):
            record = clinicalValues
        else:
            record = clinical.validate(dict(clinicalValues or {}))
        bundle = Path(bundle)
        if not (bundle / "model.json").is_file():
            raise BundleError(f"{bundle} is not a model bundle: model.json is missing.")
        if device not in cli.DEVICES:
            raise ValueError(f"device must be one of {cli.DEVICES}")
        workdir = Path(tempfile.mkdtemp(prefix="StrokePredictor-"))
        try:
            paths = {"dwi": scene.write_node(dwi, workdir / "dwi.nii", "DWI"),
                     "adc": scene.write_node(adc, workdir / "adc.nii", "ADC")}
            if flair is not None:
                paths["flair"] = scene.write_node(flair, workdir / "flair.nii", "FLAIR")
            clinical_path = workdir / "clinical.json"
            clinical_path.write_text(json.dumps(record.to_dict()))
            args = cli.build_arguments(
                self.python, dwi=paths["dwi"], adc=paths["adc"], flair=paths.get("flair"), clinical=clinical_path,
                bundle=bundle, out=workdir / "out", mc_samples=mcSamples, seed=seed, device=device,
                threshold=threshold, what_if=_whatIf, effects=not _whatIf,
            )
            job = PredictionJob(dwi, workdir, onProgress, onFinished, "comparison" if _whatIf else "prediction")
            job.handle = self.runner.start(args, env=self._environment(), cwd=str(workdir), on_line=job.onLine,
                                           on_finished=job.onProcessFinished)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return job

    @staticmethod
    def comparisonSpec(field: str, first: Any, second: Any) -> str:
        """The ``--what-if`` item for two values of one clinical field, e.g.
        ``treatment=none,thrombectomy``; the values are validated like the form's.

        Raises:
            ClinicalValueError: unknown field, invalid value, or the same value twice.
        """
        feature = clinical.feature(field)
        values = [clinical.parse_value(feature, value) for value in (first, second)]
        if values[0] == values[1]:
            raise clinical.ClinicalValueError(
                f"The two scenarios give '{feature.name}' the same value ({first} and {second}); choose two "
                "different values to compare."
            )
        shown = ["unknown" if v is None else (f"{v:g}" if isinstance(v, float) else str(v)) for v in values]
        return f"{feature.name}={shown[0]},{shown[1]}"

    def startComparison(self, dwi, adc, flair=None, clinicalValues=None, *, field: str, first: Any, second: Any,
                        **kwargs) -> PredictionJob:
        """Predict two clinical scenarios that differ only in ``field`` (``first`` and ``second``;
        the other values from ``clinicalValues``) and, when done, add the comparison to the scene:
        the difference map (first minus second probability; with no treatment first, positive is
        tissue the treatment is predicted to save), the region labelmap and the two volumes side
        by side (:class:`StrokePredictorSlicer.scene.ComparisonNodes`). The imaging part of the
        network runs once for both. Other arguments as in :meth:`startPrediction`."""
        return self.startPrediction(dwi, adc, flair, clinicalValues,
                                    _whatIf=[self.comparisonSpec(field, first, second)], **kwargs)

    def compare(self, dwi, adc, flair=None, clinicalValues=None, *, field: str, first: Any, second: Any,
                timeout: float | None = None, **kwargs):
        """:meth:`startComparison` and wait (batch use and tests); returns ComparisonNodes.

        Raises:
            StrokePredictorError: bad inputs or a failed run (the scene is unchanged).
        """
        job = self.startComparison(dwi, adc, flair, clinicalValues, field=field, first=first, second=second, **kwargs)
        return self._finish(job, timeout)

    def _finish(self, job: PredictionJob, timeout: float | None):
        if not job.wait(timeout):
            job.cancel()
            job.wait()
            raise StrokePredictorError(f"The prediction did not finish within {timeout:g} s and was cancelled.")
        if job.state != "succeeded":
            raise StrokePredictorError(job.error or f"The prediction ended as {job.state}.")
        return job.result

    def predict(self, dwi, adc, flair=None, clinicalValues=None, *, timeout: float | None = None, **kwargs):
        """Run a prediction and wait for it (batch use and tests).

        Returns:
            StrokePredictorSlicer.scene.ResultNodes
        Raises:
            StrokePredictorError: bad inputs or a failed prediction (the scene is unchanged).
        """
        job = self.startPrediction(dwi, adc, flair, clinicalValues, **kwargs)
        if not job.wait(timeout):
            job.cancel()
            job.wait()
            raise StrokePredictorError(f"The prediction did not finish within {timeout:g} s and was cancelled.")
        if job.state != "succeeded":
            raise StrokePredictorError(job.error or f"The prediction ended as {job.state}.")
        return job.result

    @staticmethod
    def _environment() -> dict[str, str]:
        """What the prediction process needs on top of the runner's environment: the folder that
        holds ``StrokePredictorLib`` on ``PYTHONPATH`` (prepended) and unbuffered output."""
        import StrokePredictorLib

        lib_parent = str(Path(StrokePredictorLib.__file__).resolve().parents[1])
        return {"PYTHONPATH": lib_parent, "PYTHONUNBUFFERED": "1"}

    @staticmethod
    def showChart(chart) -> None:
        """Show a plot chart in the layout's plot view (when there is a layout)."""
        plots = getattr(getattr(slicer, "modules", None), "plots", None)
        if plots is not None and chart is not None:
            plots.logic().ShowChartInLayout(chart)


#
# Test
#
class StrokePredictorTest(ScriptedLoadableModuleTest):
    """Self-test: runs the Logic end to end on the bundled sample case; skipped, with a message
    that says what to install, when torch, nibabel or safetensors are missing (Slicer installs
    nothing in testing mode)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        try:
            self.test_EndToEnd()
        except unittest.SkipTest as skipped:  # "Reload and Test" calls runTest without a test runner
            logger.warning("%s", skipped)
            self.delayDisplay(str(skipped))

    def test_EndToEnd(self):
        import numpy as np

        absent = dependencies.missing_essential()
        if absent:
            self.skipTest(selfTestSkipMessage(absent))
        files = sampleDataFiles()
        if files is None:
            raise AssertionError(f"The sample case is missing from {SAMPLE_DATA_DIR} (need *dwi*.nii* and *adc*.nii*).")
        self.delayDisplay("Loading the sample case")
        dwi = slicer.util.loadVolume(str(files["dwi"]))
        adc = slicer.util.loadVolume(str(files["adc"]))
        flair = slicer.util.loadVolume(str(files["flair"])) if "flair" in files else None
        values = clinical.read_json(files["clinical"]).to_dict() if "clinical" in files else {}
        logic = StrokePredictorLogic()
        self.delayDisplay("Predicting (5 Monte-Carlo samples)")
        result = logic.predict(dwi, adc, flair, values, bundle=logic.resolveBundle("acute"), mcSamples=5,
                               timeout=600)
        for node in (result.probability, result.uncertainty, result.attention):
            self.assertEqual(node.GetImageData().GetDimensions(), dwi.GetImageData().GetDimensions())
        probability = slicer.util.arrayFromVolume(result.probability)
        self.assertTrue(0.0 <= float(probability.min()) and float(probability.max()) <= 1.0)
        weights = slicer.util.arrayFromTableColumn(result.feature_table, "Weight")
        self.assertAlmostEqual(float(np.sum(weights)), 1.0, places=4)
        segment = result.segmentation.GetSegmentation().GetNthSegment(0)
        self.assertEqual(segment.GetName(), scene.SEGMENTATION_NODE_NAME)
        self.assertGreaterEqual(result.summary["lesion_volume_ml"]["mask"], 0.0)
        self.delayDisplay("Test passed")


def selfTestSkipMessage(absent: list[str]) -> str:
    """Why the self-test was skipped and what to do about it."""
    needs_torch = "torch" in absent
    how = ("install the PyTorch extension (Extensions Manager) for torch, and "
           if needs_torch else "") + "press Apply once in the Stroke Predictor module, which offers to install the rest"
    return (f"StrokePredictor self-test skipped: the prediction needs Python packages that are not installed "
            f"here: {', '.join(absent)}. To run it, {how}; then run the test again.")
