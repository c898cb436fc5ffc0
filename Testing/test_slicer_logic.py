"""The Slicer module's Logic on a real MRML scene (slicer-core), with the real prediction CLI.

Only the GUI layer (qt, ctk, ScriptedLoadableModule, parameterNodeWrapper) is replaced; volumes
are loaded from NIfTI with oblique, anisotropic geometry through Slicer's Volumes logic, and
the prediction runs ``python -m StrokePredictorLib.predict`` in a subprocess with a tiny random
bundle.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")
import slicer_env  # noqa: E402

from StrokePredictorLib.io import Geometry, read_volume, write_volume  # noqa: E402

CLINICAL = {"age": "71", "sex": "F", "nihss": "12", "onset_to_imaging_h": "", "atrial_fibrillation": "yes"}


@pytest.fixture(scope="module")
def module():
    return slicer_env.import_module()


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> dict[str, Path]:
    import inference_phantom

    folder = tmp_path_factory.mktemp("case")
    paths = inference_phantom.write_case(folder, flair=True)
    paths["bundle"] = inference_phantom.write_tiny_bundle(folder / "bundle")
    # An ADC far away from the DWI (no physical overlap).
    adc = read_volume(paths["adc"])
    g = adc.geometry
    far = Geometry(g.size, g.spacing, tuple(np.asarray(g.origin) + 500.0), g.direction)
    paths["adc_far"] = write_volume(adc.array, far, folder / "adc_far.nii.gz")
    return paths


@pytest.fixture()
def env(module):
    return slicer_env.make_scene()


def _load(env, case_dir, names=("dwi", "adc", "flair")):
    import slicer

    nodes = {name: slicer.util.loadVolume(str(case_dir[name]), {"name": name.upper()}) for name in names}
    return nodes


def _logic(module, runner=None):
    from StrokePredictorSlicer.runner import SubprocessRunner

    return module.StrokePredictorLogic(runner=runner or SubprocessRunner(), python=sys.executable)


def _world_matrix(node) -> np.ndarray:
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    result = slicer.util.arrayFromVTKMatrix(matrix)
    if node.GetParentTransformNode() is not None:
        to_world = vtk.vtkMatrix4x4()
        node.GetParentTransformNode().GetMatrixTransformToWorld(to_world)
        result = slicer.util.arrayFromVTKMatrix(to_world) @ result
    return result


def _assert_chart_names_the_features(env, result) -> None:
    """Slicer's plot view ignores a bar series' X column (bars at 0, 1, 2, ...; labels only in
    tooltips), so the chart has one bar series per feature, named by its label (shown in the
    legend), each reading that feature's weight."""
    import slicer

    chart = result.feature_chart
    assert chart.GetLegendVisibility()
    count = chart.GetNumberOfPlotSeriesNodes()
    series = [env.scene.GetNodeByID(chart.GetNthPlotSeriesNodeID(i)) for i in range(count)]
    labels = [result.feature_table.GetCellText(row, 1) for row in range(result.feature_table.GetNumberOfRows())]
    weights = slicer.util.arrayFromTableColumn(result.feature_table, "Weight")
    assert len(labels) == 10 and [s.GetName() for s in series] == labels
    colors = set()
    for node, label, weight in zip(series, labels, weights, strict=True):
        assert node.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeBar
        table = node.GetTableNode()
        assert node.GetYColumnName() == label and table.GetNumberOfRows() == 1
        assert float(table.GetTable().GetColumnByName(label).GetValue(0)) == pytest.approx(float(weight))
        colors.add(tuple(round(c, 3) for c in node.GetColor()))
    assert len(colors) == 10  # one colour per feature: the legend tells them apart


def _temp_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("StrokePredictor-*")}


# ----------------------------------------------------------------------------------------
def test_loaded_geometry_is_oblique_and_written_back_exactly(env, module, case_dir, tmp_path):
    """The input path: node -> array + world IJKToRAS -> NIfTI reproduces the file's geometry."""
    from StrokePredictorSlicer import scene

    nodes = _load(env, case_dir, ("dwi",))
    source = read_volume(case_dir["dwi"])
    direction = source.geometry.direction_matrix
    assert not np.allclose(np.abs(direction), np.eye(3), atol=0.05)  # oblique
    assert len(set(source.geometry.spacing)) == 3  # anisotropic
    written = read_volume(scene.write_node(nodes["dwi"], tmp_path / "dwi.nii", "DWI"))
    assert written.geometry.same_grid(source.geometry, tolerance_mm=1e-3)
    np.testing.assert_allclose(written.array, source.array, rtol=1e-6)


@pytest.mark.slow
def test_full_prediction_creates_expected_nodes(env, module, case_dir, tmp_path):
    import slicer
    import slicerio
    import slicerio.segmentation

    from StrokePredictorLib import clinical, outputs

    nodes = _load(env, case_dir)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(env.scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "MR study")
    for node in nodes.values():
        sh.CreateItem(study, node)
    env.add_slice_views(("Red",))
    before = _temp_folders()
    progress: list[tuple[float, str]] = []
    logic = _logic(module)
    job = logic.startPrediction(nodes["dwi"], nodes["adc"], nodes["flair"], CLINICAL, bundle=case_dir["bundle"],
                                mcSamples=4, threshold=0.5, onProgress=lambda f, m: progress.append((f, m)))
    assert job.wait(180)
    assert job.state == "succeeded", job.error
    result = job.result

    # progress parsed from PROGRESS lines, increasing, ending at 1
    fractions = [f for f, _ in progress]
    assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert _temp_folders() == before  # the temporary folder is gone

    # types, names
    dwi = nodes["dwi"]
    assert result.probability.IsA("vtkMRMLScalarVolumeNode")
    assert result.probability.GetName() == "DWI lesion probability"
    assert result.uncertainty.GetName() == "DWI uncertainty (entropy, bits)"
    assert result.attention.GetName() == "DWI spatial attention"
    assert result.segmentation.IsA("vtkMRMLSegmentationNode")
    assert result.segmentation.GetName() == "Stroke lesion (predicted)"
    assert result.feature_table.IsA("vtkMRMLTableNode") and result.statistics_table.IsA("vtkMRMLTableNode")
    assert result.feature_chart.IsA("vtkMRMLPlotChartNode")
    _assert_chart_names_the_features(env, result)

    # geometry: every output volume equals the DWI's grid in world coordinates
    for node in (result.probability, result.uncertainty, result.attention):
        assert node.GetImageData().GetDimensions() == dwi.GetImageData().GetDimensions()
        np.testing.assert_allclose(_world_matrix(node), _world_matrix(dwi), atol=1e-6)
    probability = slicer.util.arrayFromVolume(result.probability)
    assert 0.0 <= probability.min() and probability.max() <= 1.0 and probability.std() > 0

    # display settings
    display = result.probability.GetDisplayNode()
    color = display.GetColorNode()
    assert color.GetName() == "Inferno" and color.GetNumberOfColors() == 256
    lo, hi = np.asarray(color.GetLookupTable().GetTableValue(0)[:3]), color.GetLookupTable().GetTableValue(255)[:3]
    assert lo.sum() < 0.1 and hi[0] > 0.9 and hi[1] > 0.9  # black -> pale yellow
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5))
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.1)
    seg_display = result.segmentation.GetDisplayNode()
    assert seg_display.GetVisibility2DOutline() and not seg_display.GetVisibility2DFill()
    module.scene.show_layer(dwi, result.probability, 0.6, result.segmentation)
    composite = env.scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetItemAsObject(0)
    assert composite.GetForegroundVolumeID() == result.probability.GetID()
    assert composite.GetBackgroundVolumeID() == dwi.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.6)

    # subject hierarchy: in the DWI's study
    for node in result.nodes():
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study, node.GetName()

    # feature attention table: the ten schema features, weights summing to 1
    names = [result.feature_table.GetCellText(row, 0) for row in range(result.feature_table.GetNumberOfRows())]
    assert names == list(clinical.FEATURE_NAMES)
    weights = slicer.util.arrayFromTableColumn(result.feature_table, "Weight")
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-4)
    assert np.all(weights >= 0)
    values = {names[r]: result.feature_table.GetCellText(r, 2) for r in range(len(names))}
    assert values["nihss"] == "12.0" and values["onset_to_imaging_h"] == "unknown" and values["sex"] == "F"

    # statistics table agrees with the summary and the segmentation
    stats = {result.statistics_table.GetCellText(r, 0): float(result.statistics_table.GetCellText(r, 1))
             for r in range(result.statistics_table.GetNumberOfRows())}
    volume = result.summary["lesion_volume_ml"]
    assert stats["Lesion volume (thresholded)"] == pytest.approx(volume["mask"])
    assert stats["Lesion volume, 95% interval low"] == pytest.approx(volume["ci95"][0])
    assert stats["Lesion volume, Monte-Carlo 97.5%"] == pytest.approx(volume["mc_ci95"][1])
    assert stats["Connected components"] == result.summary["n_components"]
    assert stats["Monte-Carlo samples"] == 4
    post = result.summary["postprocessing"]
    assert stats["Smallest component kept"] == post["min_component_ml"]
    assert stats["Components removed at median ADC of"] == post["max_component_adc"]

    # segmentation content equals probability >= threshold, and survives .seg.nrrd + slicerio
    segment_id = result.segmentation.GetSegmentation().GetNthSegmentID(0)
    seg_array = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentation, segment_id, dwi)
    np.testing.assert_array_equal(seg_array > 0, probability >= 0.5)
    assert (seg_array > 0).sum() * np.prod(dwi.GetSpacing()) / 1000 == pytest.approx(volume["mask"], rel=1e-4)
    path = tmp_path / "lesion.seg.nrrd"
    assert slicer.util.saveNode(result.segmentation, str(path))
    read = slicerio.read_segmentation(str(path))
    segments = read["segments"]
    assert [s["name"] for s in segments] == ["Stroke lesion (predicted)"]
    terminology = segments[0]["terminology"]
    assert terminology["category"] == ["SCT", "49755003", "Morphologically Altered Structure"]
    assert terminology["type"] == ["SCT", "55641003", "Infarct"]
    assert slicerio.segmentation.terminology_entry_to_string(terminology) == outputs.SEGMENT_TERMINOLOGY


def test_cancel_leaves_scene_unchanged(env, module, case_dir):
    nodes = _load(env, case_dir, ("dwi", "adc"))
    ids = env.node_ids()
    before = _temp_folders()
    logic = _logic(module)
    finished = []
    job = None

    def on_progress(fraction, message):
        job.cancel()

    job = logic.startPrediction(nodes["dwi"], nodes["adc"], None, CLINICAL, bundle=case_dir["bundle"], mcSamples=4,
                                onProgress=on_progress, onFinished=finished.append)
    assert job.wait(120)
    assert job.state == "cancelled" and job.result is None and finished == [job]
    assert env.node_ids() == ids
    assert _temp_folders() == before


def test_bad_inputs_give_messages_and_change_nothing(env, module, case_dir):
    import slicer

    from StrokePredictorLib.errors import BundleError, ClinicalValueError, InputImageError

    nodes = _load(env, case_dir, ("dwi", "adc"))
    far = slicer.util.loadVolume(str(case_dir["adc_far"]), {"name": "ADC far"})
    ids = env.node_ids()
    before = _temp_folders()

    class NeverRunner:
        def start(self, *args, **kwargs):
            raise AssertionError("no process may start for bad inputs")

    logic = _logic(module, NeverRunner())
    bundle = case_dir["bundle"]
    with pytest.raises(InputImageError, match=r"Select an ADC volume"):
        logic.startPrediction(nodes["dwi"], None, bundle=bundle)
    with pytest.raises(InputImageError, match=r"Select a DWI volume"):
        logic.startPrediction(None, nodes["adc"], bundle=bundle)
    with pytest.raises(InputImageError, match=r"ADC volume 'ADC far' does not overlap the DWI 'DWI' \(it covers 0%"):
        logic.startPrediction(nodes["dwi"], far, bundle=bundle)
    with pytest.raises(InputImageError, match=r"same volume 'DWI' is selected as DWI and ADC"):
        logic.startPrediction(nodes["dwi"], nodes["dwi"], bundle=bundle)
    with pytest.raises(ClinicalValueError, match=r"nihss.*out of range; expected 0 to 42"):
        logic.startPrediction(nodes["dwi"], nodes["adc"], None, {"nihss": "57"}, bundle=bundle)
    with pytest.raises(BundleError, match=r"model.json is missing"):
        logic.startPrediction(nodes["dwi"], nodes["adc"], bundle=case_dir["dwi"].parent)
    with pytest.raises(BundleError, match=r"Choose a model bundle folder"):
        module.StrokePredictorLogic.resolveBundle("bundle folder", "")
    assert module.StrokePredictorLogic.resolveBundle("bundle folder", str(bundle)) == bundle
    assert env.node_ids() == ids
    assert _temp_folders() == before


def test_non_linear_transform_refused_linear_one_applied(env, module, case_dir):
    import slicer
    import vtk
    from StrokePredictorSlicer import scene

    from StrokePredictorLib.errors import InputImageError

    nodes = _load(env, case_dir, ("dwi", "adc"))
    linear = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 12.5)
    linear.SetMatrixTransformToParent(matrix)
    nodes["dwi"].SetAndObserveTransformNodeID(linear.GetID())
    geometry = scene.node_geometry(nodes["dwi"], "DWI")
    source = read_volume(case_dir["dwi"]).geometry
    np.testing.assert_allclose(geometry.ijk_to_ras[0, 3], source.ijk_to_ras[0, 3] + 12.5, atol=1e-6)
    grid = env.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    nodes["adc"].SetAndObserveTransformNodeID(grid.GetID())
    ids = env.node_ids()
    logic = _logic(module)
    with pytest.raises(InputImageError, match=r"ADC volume 'ADC' is under a non-linear transform \('warp'\)"):
        logic.startPrediction(nodes["dwi"], nodes["adc"], bundle=case_dir["bundle"])
    assert env.node_ids() == ids
    assert slicer.mrmlScene is env.scene


def test_failed_process_reports_its_error_and_changes_nothing(env, module, case_dir):
    """A CLI error line reaches the job's error; a crash without one reports the exit code."""
    from StrokePredictorSlicer.runner import SubprocessRunner

    nodes = _load(env, case_dir, ("dwi", "adc"))
    ids = env.node_ids()

    class ScriptRunner(SubprocessRunner):
        def __init__(self, script):
            super().__init__()
            self.script = script

        def start(self, args, **kwargs):
            return super().start([sys.executable, "-c", self.script], **kwargs)

    failing = ("import sys; print('PROGRESS 0.1 reading'); "
               "print('error: DWI file x is truncated.', file=sys.stderr); sys.exit(2)")
    job = _logic(module, ScriptRunner(failing)).startPrediction(nodes["dwi"], nodes["adc"], bundle=case_dir["bundle"])
    assert job.wait(30) and job.state == "failed"
    assert job.error == "DWI file x is truncated."
    crash = "print('PROGRESS 0.1 reading'); print('Traceback: boom'); raise SystemExit(3)"
    job = _logic(module, ScriptRunner(crash)).startPrediction(nodes["dwi"], nodes["adc"], bundle=case_dir["bundle"])
    assert job.wait(30) and job.state == "failed"
    assert "exit code 3" in job.error and "Traceback: boom" in job.error
    # a RESULT pointing at files that are not on the DWI grid is refused, nothing added
    bad_dir = Path(tempfile.mkdtemp(prefix="sp-bad-"))
    small = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    for name in ("probability", "uncertainty", "attention_spatial"):
        write_volume(np.zeros(small.shape, np.float32), small, bad_dir / f"{name}.nii.gz")
    (bad_dir / "lesion.seg.nrrd").write_text("")
    (bad_dir / "attention.json").write_text(json.dumps({"features": []}))
    (bad_dir / "summary.json").write_text(json.dumps({"files": {}}))
    job = _logic(module, ScriptRunner(f"print('RESULT {bad_dir / 'summary.json'}')")).startPrediction(
        nodes["dwi"], nodes["adc"], bundle=case_dir["bundle"])
    assert job.wait(30) and job.state == "failed"
    assert "probability file" in job.error and "is not on the DWI grid" in job.error
    assert env.node_ids() == ids


def test_rollback_removes_partially_added_nodes(env, module):
    from StrokePredictorSlicer import scene

    ids = env.node_ids()
    with pytest.raises(RuntimeError, match="boom"), scene.all_or_nothing(env.scene):
        env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "half")
        env.scene.AddNewNodeByClass("vtkMRMLTableNode", "written")
        raise RuntimeError("boom")
    assert env.node_ids() == ids


def test_output_line_parsing(module):
    from StrokePredictorSlicer import cli

    assert cli.parse_line("PROGRESS 0.250 Preprocessing") == cli.OutputLine("progress", "Preprocessing", 0.25)
    assert cli.parse_line("PROGRESS 1.7 done").fraction == 1.0
    assert cli.parse_line("RESULT /tmp/x/summary.json\n") == cli.OutputLine("result", "/tmp/x/summary.json")
    assert cli.parse_line("error: ADC missing.") == cli.OutputLine("error", "ADC missing.")
    assert cli.parse_line("PROGRESS abc").kind == "log"
    args = cli.build_arguments("py", dwi=Path("d"), adc=Path("a"), flair=None, clinical=Path("c.json"),
                               bundle=Path("b"), out=Path("o"), mc_samples=7, seed=1, device="cpu", threshold=0.4)
    assert args == ["py", "-m", "StrokePredictorLib.predict", "--dwi", "d", "--adc", "a", "--clinical", "c.json",
                    "--bundle", "b", "--out", "o", "--mc-samples", "7", "--seed", "1", "--device", "cpu",
                    "--threshold", "0.4", "--effects"]  # the panel asks for the effects: the CLI's default is off
    default = cli.build_arguments("py", dwi=Path("d"), adc=Path("a"), flair=None, clinical=None, bundle=Path("b"),
                                  out=Path("o"), mc_samples=7, seed=1, device="cpu")
    assert "--threshold" not in default  # the bundle's post-processing decides


def test_parameter_node_persists_settings(env, module):
    p = module.StrokePredictorLogic(runner=object(), python="python").getParameterNode()
    assert (p.model, p.device, p.mcSamples, p.threshold, p.modelThreshold) == ("acute", "auto", 20, 0.5, True)
    p.mcSamples = 7
    p.device = "cpu"
    again = module.StrokePredictorLogic(runner=object(), python="python").getParameterNode()
    assert (again.mcSamples, again.device) == (7, "cpu")
    assert env.scene.GetNodesByClass("vtkMRMLScriptedModuleNode").GetNumberOfItems() == 1


# ----------------------------------------------------------------------------------------
# The process runner (findings 2 and 4)
TREE = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(f"PIDS {os.getpid()} {child.pid}", flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    try:
        import os

        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _wait_gone(pids, timeout=5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def test_cancel_kills_the_child_the_process_started(module):
    """PythonSlicer is a launcher whose child runs the prediction: Cancel must end both."""
    from StrokePredictorSlicer.runner import SubprocessRunner

    lines, codes = [], []
    handle = SubprocessRunner().start([sys.executable, "-c", TREE], env=None, cwd=None, on_line=lines.append,
                                      on_finished=codes.append)
    import time

    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        handle.wait(0.1)
    pids = [int(x) for x in lines[0].split()[1:]]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    handle.cancel()
    assert handle.wait(15) and codes and codes[0] != 0
    assert _wait_gone(pids), "a process of the cancelled tree is still running"
    assert not handle.is_running()


def test_runner_polls_through_the_injected_schedule_and_uses_the_base_environment(module, tmp_path):
    """In Slicer a qt.QTimer calls poll(); here a stand-in schedule does, and nothing is
    delivered except through it. The process starts from the base (Slicer's startup)
    environment with PYTHONPATH prepended."""
    import time

    from StrokePredictorSlicer.runner import SubprocessRunner, merge_environment

    scheduled, stopped = [], []

    def schedule(poll, interval_ms):
        scheduled.append((poll, interval_ms))
        return lambda: stopped.append(True)

    base = {"PATH": __import__("os").environ.get("PATH", ""), "SP_FROM_BASE": "yes", "PYTHONPATH": "/base/path"}
    lines, codes = [], []
    script = "import os; print('PROGRESS 0.5', os.environ.get('SP_FROM_BASE'), os.environ['PYTHONPATH'])"
    runner = SubprocessRunner(schedule=schedule, base_environment=lambda: base, interval_ms=50)
    handle = runner.start([sys.executable, "-c", script], env={"PYTHONPATH": "/lib/parent"}, cwd=str(tmp_path),
                          on_line=lines.append, on_finished=codes.append)
    assert len(scheduled) == 1 and scheduled[0][1] == 50
    poll = scheduled[0][0]
    time.sleep(1.0)
    assert lines == [] and codes == []  # nothing arrives until the scheduler polls
    deadline = time.monotonic() + 30
    while not codes and time.monotonic() < deadline:
        poll()
        time.sleep(0.05)
    import os

    assert codes == [0] and stopped == [True] and not handle.is_running()
    assert lines == [f"PROGRESS 0.5 yes /lib/parent{os.pathsep}/base/path"]
    assert merge_environment({"A": "1"}, {"PYTHONPATH": "x"}) == {"A": "1", "PYTHONPATH": "x"}


def test_default_runner_works_with_the_launch_api_of_slicer_5_8(module, env, monkeypatch, tmp_path):
    """Slicer 5.8/5.10's launchConsoleProcess has no blocking/logCallback/completedCallback: the
    Logic's runner must not need them (it starts the process itself, from Slicer's startup
    environment)."""
    import inspect

    import slicer

    def launchConsoleProcess(args, useStartupEnvironment=True, updateEnvironment=None, cwd=None):  # 5.8.1, 5.10.0
        import subprocess

        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)

    class StartupEnvironment:  # what slicer.app.startupEnvironment() returns (QProcessEnvironment)
        values = {"PATH": __import__("os").environ.get("PATH", ""), "SP_STARTUP": "from-startup"}

        def keys(self):
            return list(self.values)

        def value(self, key):
            return self.values[key]

    monkeypatch.setattr(slicer.util, "launchConsoleProcess", launchConsoleProcess)
    monkeypatch.setattr(slicer.app, "startupEnvironment", lambda: StartupEnvironment(), raising=False)
    assert "blocking" not in inspect.signature(slicer.util.launchConsoleProcess).parameters
    logic = module.StrokePredictorLogic(python=sys.executable)
    lines, codes = [], []
    script = "import os; print('PROGRESS 1', os.environ.get('SP_STARTUP'), os.environ.get('SP_ONLY_HERE'))"
    monkeypatch.setenv("SP_ONLY_HERE", "leaked")
    handle = logic.runner.start([sys.executable, "-c", script], env=logic._environment(), cwd=str(tmp_path),
                                on_line=lines.append, on_finished=codes.append)
    assert handle.wait(30) and codes == [0]
    assert lines == ["PROGRESS 1 from-startup None"]


# ----------------------------------------------------------------------------------------
# Dependencies (finding 8) and the self-test (finding 5)
def test_missing_dependencies_respect_minimum_versions(module, tmp_path):
    from StrokePredictorSlicer import dependencies

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnibabel>=5.0\nsafetensors>=0.4  # weights\nscipy\ntorch>=2.0\n")
    versions = {"nibabel": "4.0.2", "safetensors": "0.4.5", "scipy": "1.11.0", "torch": "2.1.0+cpu"}

    def version_of(name):
        if name not in versions:
            raise __import__("importlib").metadata.PackageNotFoundError(name)
        return versions[name]

    assert dependencies.missing(requirements, version_of) == ["nibabel>=5.0"]  # 4.0.2 is too old
    del versions["scipy"], versions["torch"]
    assert dependencies.missing(requirements, version_of) == ["nibabel>=5.0", "scipy", "torch>=2.0"]
    assert dependencies.missing_essential(version_of) == ["torch"]
    requirements.write_text('nibabel>=5.0\nscipy; python_version < "3"\n')  # torch: always needed, listed or not
    assert dependencies.missing(requirements, version_of) == ["nibabel>=5.0", "torch"]


def test_install_uses_pip_ensure_on_5_12_without_a_second_prompt(module, monkeypatch):
    """slicer.packaging is a submodule that must be imported (it is not an attribute of slicer
    until then); the user already agreed, so pip_ensure must not ask again (and raise if declined)."""
    import types

    import slicer
    from StrokePredictorSlicer import dependencies

    calls = []
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda requirements, **kwargs: calls.append(("pip_ensure", list(requirements), kwargs))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.delattr(slicer, "packaging", raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirements: calls.append(("pip_install", requirements)),
                        raising=False)
    dependencies.install(["nibabel>=5.0", "scipy"])
    assert calls == [("pip_ensure", ["nibabel>=5.0", "scipy"], {"prompt_install": False,
                                                                "requester": "Stroke Predictor"})]
    calls.clear()
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer 5.8/5.10: no such module
    dependencies.install(["nibabel>=5.0"])
    assert calls == [("pip_install", ["nibabel>=5.0"])]


def test_self_test_skips_with_a_clear_message_without_dependencies(module, env, monkeypatch):
    import unittest

    from StrokePredictorSlicer import dependencies

    monkeypatch.setattr(dependencies, "missing_essential", lambda *args, **kwargs: ["torch", "safetensors"])
    result = unittest.TestResult()
    module.StrokePredictorTest("test_EndToEnd").run(result)
    assert result.errors == [] and result.failures == [] and len(result.skipped) == 1
    message = result.skipped[0][1]
    assert "torch, safetensors" in message and "PyTorch extension" in message and "skipped" in message
    test = module.StrokePredictorTest()
    test.runTest()  # what "Reload and Test" calls: no exception, the message is displayed
    assert test.displayed == [message]


@pytest.mark.slow
def test_self_test_runs_end_to_end_when_dependencies_are_present(module, env):
    """The module's own self-test, unchanged, on the bundled sample case with the shipped model."""
    import unittest

    from StrokePredictorSlicer import dependencies

    assert dependencies.missing_essential() == []
    result = unittest.TestResult()
    test = module.StrokePredictorTest("test_EndToEnd")
    test.run(result)
    assert result.errors == [] and result.failures == [] and result.skipped == [], result.errors
    assert test.displayed[-1] == "Test passed"


# ----------------------------------------------------------------------------------------
# Finding 9: translations and Sample Data's current argument names
def test_module_texts_go_through_translate(module, monkeypatch):
    import types

    monkeypatch.setattr(module, "translate", lambda context, text: f"[{context}] {text}")
    monkeypatch.setattr(module, "_", lambda text: f"<{text}>")
    parent = types.SimpleNamespace()
    module.StrokePredictor(parent)
    assert parent.categories == ["[qSlicerAbstractCoreModule] Segmentation"]  # Slicer's category context
    assert parent.title == "<Stroke Predictor>"
    assert parent.helpText.startswith("<Predicts") and parent.acknowledgementText.startswith("<Uses")


def test_sample_data_registered_with_load_file_types(module, monkeypatch):
    import types

    registered = []

    def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                       nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                       loadFileTypes=None, loadFiles=None, loadFileProperties=None, checksums=None,
                                       loadFileType=None):  # the signature of Slicer 5.8.1 - 5.12.3
        registered.append(dict(locals()))

    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=registerCustomSampleDataSource)
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    module.registerSampleData()
    assert len(registered) == 1
    source = registered[0]
    assert source["loadFileType"] is None, "loadFileType is the deprecated name"
    assert source["loadFileTypes"] == ["VolumeFile"] * 3
    assert [Path(u).name for u in source["fileNames"]] == ["StrokePredictorSample_dwi.nii.gz",
                                                            "StrokePredictorSample_adc.nii.gz",
                                                            "StrokePredictorSample_flair.nii.gz"]
    assert all(c.startswith("SHA256:") for c in source["checksums"])
