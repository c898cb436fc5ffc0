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
                    "--threshold", "0.4"]
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
