"""The Slicer Logic's what-if comparison and measured feature effects, on a real MRML
scene (slicer-core) with the real prediction CLI in a subprocess and a tiny random bundle."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("slicer")
import slicer_env  # noqa: E402

CLINICAL = {"age": "71", "sex": "F", "nihss": "12", "onset_to_imaging_h": "5"}


@pytest.fixture(scope="module")
def module():
    return slicer_env.import_module()


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> dict:
    import inference_phantom

    folder = tmp_path_factory.mktemp("case")
    paths = inference_phantom.write_case(folder, flair=False)
    paths["bundle"] = inference_phantom.write_tiny_bundle(folder / "bundle")
    return paths


@pytest.fixture()
def env(module):
    return slicer_env.make_scene()


def _nodes(case_dir):
    import slicer

    return {name: slicer.util.loadVolume(str(case_dir[name]), {"name": name.upper()}) for name in ("dwi", "adc")}


def _logic(module, runner=None):
    from StrokePredictorSlicer.runner import SubprocessRunner

    return module.StrokePredictorLogic(runner=runner or SubprocessRunner(), python=sys.executable)


def _world(node) -> np.ndarray:
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def test_comparison_nodes_difference_regions_and_volumes_side_by_side(env, module, case_dir):
    import slicer

    nodes = _nodes(case_dir)
    dwi = nodes["dwi"]
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(env.scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "MR study")
    for node in nodes.values():
        sh.CreateItem(study, node)
    logic = _logic(module)
    result = logic.compare(dwi, nodes["adc"], None, CLINICAL, field="treatment", first="thrombolysis",
                           second="thrombectomy", bundle=case_dir["bundle"], mcSamples=4, device="cpu", timeout=240)
    assert result.difference.IsA("vtkMRMLScalarVolumeNode") and result.regions.IsA("vtkMRMLLabelMapVolumeNode")
    assert result.difference.GetName() == "DWI what-if difference (treatment=thrombolysis minus treatment=thrombectomy)"
    for node in (result.difference, result.regions):  # on the DWI grid, in world coordinates
        assert node.GetImageData().GetDimensions() == dwi.GetImageData().GetDimensions()
        np.testing.assert_allclose(_world(node), _world(dwi), atol=1e-6)
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    difference = slicer.util.arrayFromVolume(result.difference)
    regions = slicer.util.arrayFromVolume(result.regions)
    assert -1.0 <= difference.min() and difference.max() <= 1.0 and np.abs(difference).max() > 0
    assert set(np.unique(regions)) <= {0, 1, 2, 3}
    display = result.regions.GetDisplayNode().GetColorNode()
    assert display.GetNumberOfColors() == 4 and display.GetColorName(1) == "first scenario only"

    table = result.table
    assert table.GetNumberOfRows() == 2
    assert [table.GetCellText(r, 0) for r in range(2)] == ["treatment=thrombolysis", "treatment=thrombectomy"]
    volumes = slicer.util.arrayFromTableColumn(table, "Lesion volume (mL)")
    only = slicer.util.arrayFromTableColumn(table, "Only in this scenario (mL)")
    voxel_ml = float(np.prod(dwi.GetSpacing())) / 1000.0
    assert volumes[0] == pytest.approx(np.isin(regions, (1, 3)).sum() * voxel_ml, rel=1e-4, abs=1e-6)
    assert volumes[1] == pytest.approx(np.isin(regions, (2, 3)).sum() * voxel_ml, rel=1e-4, abs=1e-6)
    assert only[0] == pytest.approx((regions == 1).sum() * voxel_ml, abs=1e-6)
    assert only[1] == pytest.approx((regions == 2).sum() * voxel_ml, abs=1e-6)
    low = slicer.util.arrayFromTableColumn(table, "95% interval low (mL)")
    high = slicer.util.arrayFromTableColumn(table, "95% interval high (mL)")
    for row, scenario in enumerate(result.scenarios):  # the run's own numbers, side by side
        assert low[row] == pytest.approx(scenario["ci95_low_ml"])
        assert high[row] == pytest.approx(scenario["ci95_high_ml"])
        assert volumes[row] == pytest.approx(scenario["volume_ml"])
    assert float(table.GetAttribute("StrokePredictor.netDifferenceMl")) == pytest.approx(volumes[0] - volumes[1],
                                                                                          abs=1e-4)


def test_comparison_refuses_bad_scenarios_before_any_process(env, module, case_dir):
    from StrokePredictorLib.errors import ClinicalValueError

    nodes = _nodes(case_dir)
    ids = env.node_ids()

    class NeverRunner:
        def start(self, *args, **kwargs):
            raise AssertionError("no process may start for bad scenarios")

    logic = _logic(module, NeverRunner())
    for field, first, second, message in (("treatment", "thrombectomy", "Thrombectomy", "same value"),
                                          ("onset_to_imaging_h", "3", "99", "out of range"),
                                          ("colour", "red", "blue", "colour")):
        with pytest.raises(ClinicalValueError, match=message):
            logic.startComparison(nodes["dwi"], nodes["adc"], None, CLINICAL, field=field, first=first,
                                  second=second, bundle=case_dir["bundle"])
    assert module.StrokePredictorLogic.comparisonSpec("onset", "2", "unknown") == "onset_to_imaging_h=2,unknown"
    assert env.node_ids() == ids


def test_feature_table_carries_the_measured_effects(env, module, case_dir):
    import slicer

    nodes = _nodes(case_dir)
    result = _logic(module).predict(nodes["dwi"], nodes["adc"], None, CLINICAL, bundle=case_dir["bundle"],
                                    mcSamples=2, device="cpu", timeout=240)
    table = result.feature_table
    names = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
    effects = dict(zip(names, slicer.util.arrayFromTableColumn(table, "Effect (mL)"), strict=True))
    listed = {f["name"]: f["effect_ml"] for f in result.features}
    for name, value in effects.items():
        if listed[name] is None:  # missing in the form: nothing to measure
            assert np.isnan(value), name
        else:
            assert value == pytest.approx(listed[name], abs=1e-9), name
    assert {n for n, v in effects.items() if not np.isnan(v)} == {"age", "sex", "nihss", "onset_to_imaging_h"}
    column = table.GetColumnIndex("Acts through")  # the test bundle has no growth head: all cross-attention
    assert column >= 0 and {table.GetCellText(r, column) for r in range(table.GetNumberOfRows())} == {"cross-attention"}
    assert json.dumps(listed)  # plain numbers and None


@pytest.mark.slow
def test_comparison_is_rendered_in_the_slice_view(env, module, case_dir, tmp_path):
    """The region map (label layer) and the difference map (foreground) reach Slicer's own slice
    view, rendered offscreen; the script behind docs' what-if screenshot."""
    import render_screenshot

    env, dwi, result = render_screenshot.build_comparison_scene(tmp_path, "treatment", "thrombolysis",
                                                                 "thrombectomy", bundle=case_dir["bundle"])
    composite = env.scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetItemAsObject(0)
    assert composite.GetLabelVolumeID() == result.regions.GetID()
    assert composite.GetForegroundVolumeID() == result.difference.GetID()
    pixels = render_screenshot.render_slice_view(env, "Red", (256, 256), render_screenshot.lesion_center_ras(result))
    assert pixels.shape == (256, 256, 3) and pixels.std() > 5
    colours = {value: np.round(np.asarray(module.scene.REGION_COLORS[value]) * 255) for value in (1, 2, 3)}
    import slicer

    present = [v for v in (1, 2, 3) if (slicer.util.arrayFromVolume(result.regions) == v).any()]
    assert present
    # a label colour blends with the DWI underneath (label opacity): look for pixels close to its hue
    found = any((np.abs(pixels.astype(float) - colours[v]).max(axis=-1) < 60).sum() > 10 for v in present)
    assert found, present
