"""The probability overlay and the lesion outline appear in an offscreen render of a slice view
made with Slicer's own slice logic and displayable managers."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer")
import slicer_env  # noqa: E402


def _fake_result_files(folder, dwi_geometry, centre_lps, radius_mm):
    """Prediction files (contract 4) with a spherical lesion of probability 0.9."""
    from StrokePredictorLib import clinical, outputs
    from StrokePredictorLib.io import write_volume

    k, j, i = np.meshgrid(*(np.arange(n) for n in dwi_geometry.shape), indexing="ij")
    points = dwi_geometry.index_to_lps(np.stack([i, j, k], axis=-1))
    inside = np.linalg.norm(points - np.asarray(centre_lps), axis=-1) <= radius_mm
    probability = np.where(inside, 0.9, 0.0).astype(np.float32)
    for name, array in (("probability", probability), ("uncertainty", probability * 0.5),
                        ("attention_spatial", probability)):
        write_volume(array, dwi_geometry, folder / f"{name}.nii.gz")
    outputs.write_segmentation_nrrd(inside, dwi_geometry, folder / "lesion.seg.nrrd")
    weights = np.full(10, 0.1)
    (folder / "attention.json").write_text(json.dumps({"features": [
        {"name": n, "label": n, "value": None, "missing": True, "weight": w}
        for n, w in zip(clinical.FEATURE_NAMES, weights, strict=True)]}))
    volume = float(inside.sum() * dwi_geometry.voxel_volume_ml)
    (folder / "summary.json").write_text(json.dumps({
        "lesion_volume_ml": {"mask": volume, "median": volume, "ci95": [volume, volume]}, "n_components": 1,
        "mean_uncertainty_in_lesion": 0.45, "threshold": 0.5, "mc_samples": 1}))
    return folder / "summary.json", int(inside.sum())


@pytest.mark.slow
def test_overlay_and_outline_are_rendered(tmp_path):
    import inference_phantom
    import render_screenshot
    import slicer

    from StrokePredictorLib import outputs
    from StrokePredictorLib.io import read_volume

    module = slicer_env.import_module()
    env = slicer_env.make_scene()
    case = inference_phantom.write_case(tmp_path / "case", flair=False)
    dwi = slicer.util.loadVolume(str(case["dwi"]), {"name": "DWI"})
    geometry = read_volume(case["dwi"]).geometry
    centre_lps = np.asarray(geometry.index_to_lps(np.asarray(geometry.size) / 2.0)) + np.array([15.0, -10.0, 0.0])
    summary, n_voxels = _fake_result_files(tmp_path, geometry, centre_lps, 18.0)
    assert n_voxels > 50
    result = module.scene.create_result_nodes(summary, dwi)
    env.add_slice_views(("Red",))
    centre_ras = (-centre_lps[0], -centre_lps[1], centre_lps[2])
    # the view's centre for a prediction: the lesion's centre of mass (within a voxel of the sphere's)
    assert np.allclose(render_screenshot.lesion_center_ras(result), centre_ras, atol=2.0)

    module.scene.show_layer(dwi, None, 0.0)
    result.segmentation.GetDisplayNode().SetVisibility(False)
    plain = render_screenshot.render_slice_view(env, "Red", (256, 256), centre_ras).astype(int)
    module.scene.show_layer(dwi, result.probability, 0.8, result.segmentation)
    shown = render_screenshot.render_slice_view(env, "Red", (256, 256), centre_ras).astype(int)

    centre = shown[118:138, 118:138].reshape(-1, 3).mean(axis=0)
    grey = plain[118:138, 118:138].reshape(-1, 3).mean(axis=0)
    assert np.ptp(grey) < 6 and grey.mean() > 40  # the DWI alone is grey and visible there
    # Inferno at p = 0.9 is yellow-orange: red and green high, blue low.
    assert centre[0] > grey[0] + 40 and centre[0] > centre[2] + 80, (centre, grey)
    # Away from the lesion, the overlay is thresholded out: pixels are unchanged.
    changed = np.abs(shown - plain).sum(axis=-1) > 30
    assert changed[118:138, 118:138].mean() > 0.9
    assert changed[:40, :40].mean() < 0.01 and changed.mean() < 0.5
    # The lesion outline is drawn in the segment's colour around the lesion.
    target = np.asarray(outputs.SEGMENT_COLOR) * 255
    outline = np.linalg.norm(shown - target, axis=-1) < 40
    rows, cols = np.nonzero(outline)
    assert len(rows) > 30
    radius = np.hypot(rows - 128, cols - 128)
    assert np.median(radius) > 10 and np.median(radius) < 128
