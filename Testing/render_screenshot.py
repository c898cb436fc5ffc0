"""Render a Slicer slice view offscreen with Slicer's own slice logic and displayable managers.

What the application's slice view shows is the blend that ``vtkMRMLSliceLogic`` produces
(``GetImageDataConnection()``: background, foreground with its colour table, threshold and
opacity) plus what the slice-view displayable managers draw on top (here the segmentation
outline of ``vtkMRMLSegmentationsDisplayableManager2D``). This module builds that pipeline in an
offscreen ``vtkRenderWindow`` (VTK falls back to EGL/OSMesa without a display) and returns the
pixels, so tests can check the picture and the README can show it.

Command line (writes docs/slicer_screenshot.png from the sample case when present, else the test
phantom with a tiny random bundle)::

    PYTHONPATH=. .venv/bin/python Testing/render_screenshot.py [--out docs/slicer_screenshot.png]

A what-if comparison instead (the Logic's ``compare`` on the sample case with the bundled outcome
model: difference map as foreground, region map as label layer)::

    PYTHONPATH=. .venv/bin/python Testing/render_screenshot.py --compare treatment none thrombectomy \
        --out docs/slicer_what_if.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

TESTING = Path(__file__).resolve().parent
REPO = TESTING.parent
if str(TESTING) not in sys.path:
    sys.path.insert(0, str(TESTING))


def render_slice_view(env: Any, name: str = "Red", size: tuple[int, int] = (512, 512),
                      center_ras: tuple[float, float, float] | None = None) -> np.ndarray:
    """Render slice view ``name`` of ``env`` (a ``slicer_env.SlicerEnvironment`` with slice views)
    offscreen; returns an RGB uint8 array (height, width, 3), top row first."""
    import slicer
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    logic = env.slice_logics[name]
    slice_node = logic.GetSliceNode()
    slice_node.SetDimensions(size[0], size[1], 1)
    logic.FitSliceToBackground(size[0], size[1]) if hasattr(logic, "FitSliceToBackground") else None
    logic.FitSliceToAll()
    if center_ras is not None:
        slice_node.JumpSliceByCentering(*center_ras)
        slice_node.JumpSlice(*center_ras)
    slice_node.UpdateMatrices()

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0, 0, 0)
    window.AddRenderer(renderer)
    mapper = vtk.vtkImageMapper()
    mapper.SetInputConnection(logic.GetImageDataConnection())
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    renderer.AddViewProp(actor)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)

    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(env.app_logic)
    for manager in ("vtkMRMLSegmentationsDisplayableManager2D",):
        if not factory.IsDisplayableManagerRegistered(manager):
            factory.RegisterDisplayableManager(manager)
    group = factory.InstantiateDisplayableManagers(renderer)
    group.SetMRMLDisplayableNode(slice_node)
    logic.UpdateImageData() if hasattr(logic, "UpdateImageData") else None
    window.Render()
    group.RequestRender()
    window.Render()

    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)
    result = np.flipud(pixels).copy()
    del group
    window.Finalize()
    return result


def build_demo_scene(work: Path, bundle: Path | None = None) -> tuple[Any, Any, Any]:
    """A scene with a prediction: the sample case and bundled model when present, else the
    test phantom with a tiny random bundle. Returns (env, dwi node, result nodes)."""
    import inference_phantom
    import slicer
    import slicer_env

    module = slicer_env.import_module()  # puts the module's folder (StrokePredictorSlicer) on the path
    from StrokePredictorSlicer.runner import SubprocessRunner

    env = slicer_env.make_scene()
    files = module.sampleDataFiles()
    if files is not None and bundle is None and (module.MODELS_DIR / "acute" / "model.json").is_file():
        bundle = module.MODELS_DIR / "acute"
    else:
        files = inference_phantom.write_case(work / "case", flair=False)
        bundle = bundle or inference_phantom.write_tiny_bundle(work / "bundle")
    dwi = slicer.util.loadVolume(str(files["dwi"]), {"name": "DWI"})
    adc = slicer.util.loadVolume(str(files["adc"]), {"name": "ADC"})
    env.add_slice_views(("Red",))
    logic = module.StrokePredictorLogic(runner=SubprocessRunner(), python=sys.executable)
    result = logic.predict(dwi, adc, None, {"nihss": "12", "age": "70"}, bundle=bundle, mcSamples=4, timeout=300)
    module.scene.show_layer(dwi, result.probability, 0.7, result.segmentation)
    return env, dwi, result


def build_comparison_scene(work: Path, field: str, first: str, second: str,
                           bundle: Path | None = None) -> tuple[Any, Any, Any]:
    """A scene with a what-if comparison (the sample case with its clinical values and the bundled
    outcome model when present, else the test phantom with a tiny random bundle). Returns (env, dwi
    node, comparison nodes)."""
    import inference_phantom
    import slicer
    import slicer_env

    from StrokePredictorLib import clinical

    module = slicer_env.import_module()  # puts the module's folder (StrokePredictorSlicer) on the path
    from StrokePredictorSlicer.runner import SubprocessRunner

    env = slicer_env.make_scene()
    files = module.sampleDataFiles()
    values: dict = {}
    if files is not None and bundle is None and (module.MODELS_DIR / "outcome" / "model.json").is_file():
        bundle = module.MODELS_DIR / "outcome"
        if "clinical" in files:
            values = {k: v for k, v in clinical.read_json(files["clinical"]).values.items() if v is not None}
    else:
        files = inference_phantom.write_case(work / "case", flair=False)
        bundle = bundle or inference_phantom.write_tiny_bundle(work / "bundle")
    dwi = slicer.util.loadVolume(str(files["dwi"]), {"name": "DWI"})
    adc = slicer.util.loadVolume(str(files["adc"]), {"name": "ADC"})
    env.add_slice_views(("Red",))
    logic = module.StrokePredictorLogic(runner=SubprocessRunner(), python=sys.executable)
    result = logic.compare(dwi, adc, None, values, field=field, first=first, second=second, bundle=bundle,
                           mcSamples=4, timeout=900)
    module.scene.show_comparison(dwi, result.difference, result.regions, 0.7)
    return env, dwi, result


def lesion_center_ras(result: Any) -> tuple[float, float, float]:
    """RAS position to show: the centre of mass of the predicted lesion (probability >= 0.5); for a
    what-if comparison, of the lesion on the slice with the most tissue in the first scenario only
    (the tissue a treatment saves, when the first scenario is no treatment)."""
    import slicer
    import vtk

    regions = getattr(result, "regions", None)  # only a what-if comparison has them
    node = getattr(result, "probability", None) or regions
    array = slicer.util.arrayFromVolume(node)
    kji = np.argwhere(array >= 0.5)
    if node is regions and np.any(array == 1):
        best = int(np.argmax((array == 1).sum(axis=(1, 2))))
        kji = kji[kji[:, 0] == best]
    if len(kji) == 0:
        kji = np.argwhere(array == array.max())
    ijk = kji.mean(axis=0)[::-1]
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return tuple(float(v) for v in slicer.util.arrayFromVTKMatrix(matrix) @ np.append(ijk, 1.0))[:3]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "slicer_screenshot.png"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--compare", nargs=3, metavar=("FIELD", "FIRST", "SECOND"),
                        help="render a what-if comparison of two values of one clinical field instead")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with tempfile.TemporaryDirectory() as work:
        if args.compare:
            env, dwi, result = build_comparison_scene(Path(work), *args.compare)
        else:
            env, dwi, result = build_demo_scene(Path(work))
        pixels = render_slice_view(env, "Red", (args.size, args.size), lesion_center_ras(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(out, pixels)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
