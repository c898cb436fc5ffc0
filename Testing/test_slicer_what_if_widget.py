"""The panel's What-if comparison section under PythonQt's rules (see Testing/test_slicer_widget.py):
the Compare button starts the Logic's comparison with the form's values and shows the result."""

# ruff: noqa: F811  (the fixtures are imported from test_slicer_widget and named as test arguments)
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer")
pytest.importorskip("PyQt5")
import slicer_env  # noqa: E402
from test_slicer_widget import _field, _load, _panel, case_dir, messages, module, qt_env, scene_env  # noqa: E402, F401

from StrokePredictorLib.io import read_volume, write_volume  # noqa: E402


class ComparisonRunner:
    """Stands in for the prediction process of a two-scenario what-if run: writes the comparison
    files on the DWI grid into ``--out`` and reports progress and the result, one line per step."""

    def __init__(self, dwi_path: Path) -> None:
        self.dwi = read_volume(dwi_path)
        self.started: list[list[str]] = []
        self.handles: list = []

    class Handle:
        def __init__(self, lines, on_line, on_finished) -> None:
            self.lines, self.on_line, self.on_finished = list(lines), on_line, on_finished
            self.finished = False

        def is_running(self) -> bool:
            return not self.finished

        def cancel(self) -> None:
            self.lines = []

        def wait(self, timeout=None) -> bool:
            while self.lines:
                self.on_line(self.lines.pop(0))
            if not self.finished:
                self.finished = True
                self.on_finished(0)
            return True

    def start(self, args, *, env, cwd, on_line, on_finished):
        out = Path(args[args.index("--out") + 1])
        self.started.append(list(args))
        out.mkdir(parents=True)
        g, shape = self.dwi.geometry, self.dwi.array.shape
        regions = np.zeros(shape, np.uint8)
        regions[8:12, 15:25, 15:25] = 3
        regions[8:12, 25:30, 15:25] = 1
        difference = (regions == 1).astype(np.float32) * 0.7
        write_volume(difference, g, out / "what_if_difference.nii.gz")
        write_volume(regions, g, out / "what_if_regions.nii.gz")
        voxel = g.voxel_volume_ml
        scenarios = [{"treatment": "thrombolysis", "volume_ml": float(np.isin(regions, (1, 3)).sum() * voxel),
                      "median_ml": 1.0, "ci95_low_ml": 0.5, "ci95_high_ml": 9.0},
                     {"treatment": "thrombectomy", "volume_ml": float((regions == 3).sum() * voxel),
                      "median_ml": 1.0, "ci95_low_ml": 0.4, "ci95_high_ml": 8.0}]
        comparison = {"first": "treatment=thrombolysis", "second": "treatment=thrombectomy",
                      "volumes_ml": {"first": scenarios[0]["volume_ml"], "second": scenarios[1]["volume_ml"],
                                     "saved": float((regions == 1).sum() * voxel), "added": 0.0,
                                     "net": float((regions == 1).sum() * voxel)},
                      "difference_file": "what_if_difference.nii.gz", "regions_file": "what_if_regions.nii.gz"}
        (out / "what_if.json").write_text(json.dumps({"scenarios": scenarios, "comparison": comparison}))
        (out / "summary.json").write_text(json.dumps({"lesion_volume_ml": {"mask": 1.0}}))
        handle = ComparisonRunner.Handle(["PROGRESS 0.5 what-if scenarios", f"RESULT {out / 'summary.json'}"],
                                         on_line, on_finished)
        self.handles.append(handle)
        return handle


def test_compare_button_runs_the_comparison_and_shows_it(module, qt_env, scene_env, case_dir, messages):
    widget = _panel(module, qt_env)
    ui = widget.ui
    assert ui.compareButton.enabled is False and ui.whatIfCollapsibleButton.collapsed is True
    names = widget._whatIfNames
    assert ui.whatIfFieldSelector.count == len(names) == 10
    nodes = _load(case_dir)
    ui.dwiSelector.setCurrentNode(nodes["dwi"])
    ui.adcSelector.setCurrentNode(nodes["adc"])
    assert ui.compareButton.enabled is True
    runner = ComparisonRunner(case_dir["dwi"])
    widget.logic.runner = runner
    _field(widget, "age").text = "64"
    ui.whatIfFieldSelector.currentIndex = names.index("treatment")
    ui.whatIfFirstEdit.text = "thrombolysis"
    ui.whatIfSecondEdit.text = "Thrombectomy"
    ui.compareButton.click()
    assert len(runner.started) == 1, messages
    args = runner.started[0]
    assert args[args.index("--what-if") + 1] == "treatment=thrombolysis,thrombectomy" and "--no-effects" in args
    assert ui.compareButton.enabled is False and ui.applyButton.enabled is False and ui.cancelButton.enabled
    runner.handles[0].wait()
    assert widget._job.state == "succeeded", widget._job.error
    assert ui.compareButton.enabled is True and ui.progressBar.visible is False
    assert ui.statusLabel.text == "Comparison done." and ui.whatIfCollapsibleButton.collapsed is False
    text = ui.whatIfResultLabel.text
    assert text.startswith("treatment=thrombolysis: ") and "treatment=thrombectomy: " in text
    assert "only in the second: 0.0 mL" in text
    result = widget._job.result
    composite = scene_env.scene.GetNodesByClass("vtkMRMLSliceCompositeNode").GetItemAsObject(0)
    assert composite.GetForegroundVolumeID() == result.difference.GetID()
    assert composite.GetLabelVolumeID() == result.regions.GetID()
    assert composite.GetBackgroundVolumeID() == nodes["dwi"].GetID()
    assert not messages and not slicer_env.slot_errors()


def test_compare_refuses_two_equal_values_with_a_message(module, qt_env, scene_env, case_dir, messages):
    widget = _panel(module, qt_env)
    ui = widget.ui
    nodes = _load(case_dir)
    ui.dwiSelector.setCurrentNode(nodes["dwi"])
    ui.adcSelector.setCurrentNode(nodes["adc"])
    runner = ComparisonRunner(case_dir["dwi"])
    widget.logic.runner = runner
    ui.whatIfFieldSelector.currentIndex = widget._whatIfNames.index("nihss")
    ui.whatIfFirstEdit.text = "5"
    ui.whatIfSecondEdit.text = "5.0"
    ui.compareButton.click()
    assert runner.started == [] and widget._job is None and ui.progressBar.visible is False
    # tryWithErrorDisplay shows the message (outside testing mode) and re-raises into the slot
    reported = messages + slicer_env.slot_errors()
    assert any("same value" in text for text in reported), reported
    slicer_env.clear_slot_errors()
