"""Volume nodes to files and prediction files to nodes (MRML only, no Qt).

Inputs: a volume node becomes a ``[k, j, i]`` array (``slicer.util.arrayFromVolume``) with its
world IJK-to-RAS matrix (a linear parent transform is applied, as hardening would, without
changing the node; a non-linear one is refused), written as NIfTI with
``StrokePredictorLib.io.write_volume``.

Outputs: every result volume of the prediction command lies on the DWI grid; it is read with
``StrokePredictorLib.io.read_volume``, checked against the DWI's world geometry and given the
DWI's world IJK-to-RAS matrix exactly. :func:`create_result_nodes` adds all nodes or none: on
any error the nodes it added are removed again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from StrokePredictorLib.errors import InputImageError, StrokePredictorError

logger = logging.getLogger(__name__)

SEGMENTATION_NODE_NAME = "Stroke lesion (predicted)"
PROBABILITY_DISPLAY_THRESHOLD = 0.1  # probabilities below this are transparent in the overlay
COLOR_MAP_NAMES = ("Inferno", "Viridis")


def _slicer() -> Any:
    import slicer

    return slicer


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def world_ijk_to_ras(node: Any, role: str) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a volume node in world coordinates.

    A linear parent transform is composed in (the geometry hardening would give); a non-linear
    one is refused.

    Raises:
        InputImageError: the node has no image data or a non-linear parent transform.
    """
    slicer = _slicer()
    import vtk

    if node.GetImageData() is None:
        raise InputImageError(f"The {role} volume '{node.GetName()}' has no image data.")
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(matrix)
    transform = node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise InputImageError(
                f"The {role} volume '{node.GetName()}' is under a non-linear transform "
                f"('{transform.GetName()}'). Harden the transform (Data module, right-click, 'Harden "
                "transform') or remove it, then apply again."
            )
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = slicer.util.arrayFromVTKMatrix(to_world) @ ijk_to_ras
    return np.asarray(ijk_to_ras, dtype=float)


def node_geometry(node: Any, role: str) -> Any:
    """:class:`StrokePredictorLib.io.Geometry` of a volume node in world coordinates."""
    from StrokePredictorLib.io import Geometry

    matrix = world_ijk_to_ras(node, role)
    size = tuple(int(n) for n in node.GetImageData().GetDimensions())
    try:
        return Geometry.from_ijk_to_ras(matrix, size)
    except ValueError as error:
        raise InputImageError(f"The {role} volume '{node.GetName()}' has an unusable geometry: {error}") from None


def check_input_nodes(dwi: Any, adc: Any, flair: Any = None) -> None:
    """Refuse inputs the prediction cannot use, before anything is written or started.

    Raises:
        InputImageError: a required volume is missing, a volume is not scalar or 3-D, has no
            image data, lies under a non-linear transform, or does not overlap the DWI.
    """
    if dwi is None:
        raise InputImageError("Select a DWI volume (the b=1000 trace image) in the Inputs section.")
    if adc is None:
        raise InputImageError("Select an ADC volume in the Inputs section; the prediction needs DWI and ADC.")
    roles = [("DWI", dwi), ("ADC", adc)] + ([("FLAIR", flair)] if flair is not None else [])
    seen: dict[str, str] = {}
    geometries = {}
    for role, node in roles:
        if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputImageError(f"The {role} input '{node.GetName()}' is not a scalar volume.")
        if node.GetID() in seen:
            raise InputImageError(
                f"The same volume '{node.GetName()}' is selected as {seen[node.GetID()]} and {role}; "
                "select a different volume for each input."
            )
        seen[node.GetID()] = role
        image = node.GetImageData()
        if image is None:
            raise InputImageError(f"The {role} volume '{node.GetName()}' has no image data.")
        if image.GetNumberOfScalarComponents() != 1:
            raise InputImageError(f"The {role} volume '{node.GetName()}' has vector voxels; a scalar volume is needed.")
        dims = image.GetDimensions()
        if min(dims) < 2:
            raise InputImageError(
                f"The {role} volume '{node.GetName()}' has size {tuple(dims)}; a 3-D volume is needed, not a slice."
            )
        geometries[role] = node_geometry(node, role)
    dwi_geometry = geometries["DWI"]
    for role, minimum in (("ADC", 0.5), ("FLAIR", 0.2)):
        if role not in geometries:
            continue
        overlap = dwi_geometry.overlap_fraction(geometries[role])
        if overlap < minimum:
            raise InputImageError(
                f"The {role} volume '{dict(roles)[role].GetName()}' does not overlap the DWI "
                f"'{dwi.GetName()}' (it covers {overlap:.0%} of it in world coordinates); the {role} "
                "must show the same head as the DWI. Check that the right volumes are selected."
            )


def write_node(node: Any, path: Path, role: str) -> Path:
    """Write a scalar volume node (world geometry) to NIfTI; returns the path."""
    from StrokePredictorLib.io import write_volume

    slicer = _slicer()
    geometry = node_geometry(node, role)
    array = np.asarray(slicer.util.arrayFromVolume(node), dtype=np.float32)
    return write_volume(array, geometry, path, compress=False)


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------
@dataclass
class ResultNodes:
    """The nodes made from one prediction."""

    probability: Any
    uncertainty: Any
    attention: Any
    segmentation: Any
    feature_table: Any
    feature_chart: Any
    statistics_table: Any
    summary: dict = field(default_factory=dict)
    features: list[dict] = field(default_factory=list)
    feature_chart_table: Any = None
    feature_series: list[Any] = field(default_factory=list)

    def nodes(self) -> list[Any]:
        nodes = [self.probability, self.uncertainty, self.attention, self.segmentation, self.feature_table,
                 self.feature_chart, self.statistics_table]
        return nodes + ([self.feature_chart_table] if self.feature_chart_table is not None else [])


@contextmanager
def all_or_nothing(scene: Any) -> Iterator[None]:
    """Remove every node added inside the block when the block raises."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    except BaseException:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in before]):
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
        raise


def color_node(name: str = "Inferno") -> Any:
    """A perceptual colour table: Slicer's own (``Inferno`` from the Colors module) when
    present, else one built from matplotlib's table of the same name (added once to the
    scene), else Slicer's ``Iron``."""
    slicer = _slicer()
    scene = slicer.mrmlScene
    for node_id in (f"vtkMRMLColorTableNodeFile{name}.txt", f"vtkMRMLColorTableNode{name}"):
        node = scene.GetNodeByID(node_id)
        if node is not None:
            return node
    nodes = scene.GetNodesByClassByName("vtkMRMLColorTableNode", name)
    if nodes.GetNumberOfItems() > 0:
        return nodes.GetItemAsObject(0)
    try:
        from matplotlib import colormaps

        table = colormaps[name.lower()](np.linspace(0.0, 1.0, 256))
    except (ImportError, KeyError):
        logger.info("No %s colour table; using Iron.", name)
        return scene.GetNodeByID("vtkMRMLColorTableNodeIron")
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetTypeToUser()
    node.SetNumberOfColors(len(table))
    for index, (r, g, b, _) in enumerate(table):
        node.SetColor(index, f"{index}", float(r), float(g), float(b), 1.0)
    node.SetAttribute("Category", "StrokePredictor")
    scene.AddNode(node)
    return node


def _volume_node(name: str, array: np.ndarray, ijk_to_ras: np.ndarray, color: Any, window: tuple[float, float],
                 threshold: float | None = None) -> Any:
    slicer = _slicer()
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if color is not None:
        display.SetAndObserveColorNodeID(color.GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(*window)
    if threshold is not None:
        display.SetApplyThreshold(True)
        display.SetAutoThreshold(False)
        display.SetLowerThreshold(threshold)
        display.SetUpperThreshold(max(window[1], 1.0))
    return node


def _read_on_grid(path: Path, role: str, dwi_geometry: Any) -> np.ndarray:
    from StrokePredictorLib.io import read_volume

    volume = read_volume(path, role=role)
    if not volume.geometry.same_grid(dwi_geometry, tolerance_mm=0.01):
        raise StrokePredictorError(
            f"The prediction's {role} file {path} is not on the DWI grid "
            f"(size {volume.geometry.size} vs {dwi_geometry.size}); the result was not loaded."
        )
    return volume.array


def _table(name: str, columns: list[tuple[str, str, list]]) -> Any:
    """A table node with typed columns: (name, "string" | "double" | "int", values)."""
    import vtk

    slicer = _slicer()
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    for column, kind, _values in columns:
        array = {"string": vtk.vtkStringArray, "double": vtk.vtkDoubleArray, "int": vtk.vtkIntArray}[kind]()
        array.SetName(column)
        table.AddColumn(array)
    table.SetNumberOfRows(len(columns[0][2]) if columns else 0)
    for col, (_, kind, values) in enumerate(columns):
        array = table.GetColumn(col)
        for row, value in enumerate(values):
            if kind == "string":
                array.SetValue(row, "" if value is None else str(value))
            else:
                array.SetValue(row, value)
    node.Modified()
    return node


# Ten distinguishable bar colours (one per clinical feature).
FEATURE_COLORS = ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
                  (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5),
                  (0.74, 0.74, 0.13), (0.09, 0.75, 0.81))


def _feature_chart(prefix: str, features: list[dict]) -> tuple[Any, Any, list[Any]]:
    """A bar chart of the feature attention that names the features.

    Slicer's plot view draws a bar series' bars at 0, 1, 2, ... and ignores its X column (the
    labels appear only in tooltips), so one series per feature, named by the feature's label
    and shown in the legend, is what puts the names on screen. The series read a one-row table
    with one column per feature.

    Returns:
        ``(chart, chart_table, series)``.
    """
    slicer = _slicer()
    scene = slicer.mrmlScene
    labels = [str(f.get("label", f["name"])) for f in features]
    table = _table(f"{prefix} feature attention (chart)",
                   [(label, "double", [float(f["weight"])]) for label, f in zip(labels, features)])  # noqa: B905
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{prefix} feature attention chart")
    series_nodes = []
    for index, label in enumerate(labels):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", label)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
        series.SetYColumnName(label)
        series.SetColor(*FEATURE_COLORS[index % len(FEATURE_COLORS)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        series_nodes.append(series)
    chart.SetTitle("Clinical feature attention")
    chart.SetXAxisTitle("")
    chart.SetYAxisTitle("Attention weight")
    chart.SetLegendVisibility(True)
    return chart, table, series_nodes


def _place_in_study(nodes: list[Any], dwi: Any) -> None:
    """Put ``nodes`` in the DWI's subject-hierarchy parent (its study, or the scene)."""
    slicer = _slicer()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    if sh is None:
        return
    dwi_item = sh.GetItemByDataNode(dwi)
    parent = sh.GetItemParent(dwi_item) if dwi_item else sh.GetSceneItemID()
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:  # the application adds items on its own; a bare scene does not
            sh.CreateItem(parent, node)


def create_result_nodes(result_json: Path, dwi: Any, *, prefix: str | None = None) -> ResultNodes:
    """Turn the prediction command's files into nodes on the DWI grid; all or nothing.

    Args:
        result_json: the ``summary.json`` the command reported on its ``RESULT`` line.
        dwi: the DWI volume node the prediction was made for.
        prefix: start of the node names (default: the DWI's name).

    Raises:
        StrokePredictorError: a file is missing or not on the DWI grid (no node is added).
    """
    slicer = _slicer()
    out = Path(result_json).parent
    try:
        summary = json.loads(Path(result_json).read_text())
        attention = json.loads((out / "attention.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StrokePredictorError(f"The prediction's result files in {out} could not be read: {error}") from None
    listed = summary.get("files", {})
    files = {"probability": listed.get("probability", "probability.nii.gz"),
             "uncertainty": listed.get("uncertainty", "uncertainty.nii.gz"),
             "attention": listed.get("attention_spatial", "attention_spatial.nii.gz")}
    dwi_geometry = node_geometry(dwi, "DWI")
    ijk_to_ras = world_ijk_to_ras(dwi, "DWI")
    arrays = {key: _read_on_grid(out / name, key, dwi_geometry) for key, name in files.items()}
    prefix = prefix or dwi.GetName()
    features = list(attention.get("features", []))
    volume = summary.get("lesion_volume_ml", {})
    ci = list(volume.get("ci95", [float("nan"), float("nan")]))
    mc_ci = list(volume.get("mc_ci95", ci))
    scene = slicer.mrmlScene
    files_seg = listed.get("segmentation", "lesion.seg.nrrd")
    if not (out / files_seg).is_file():
        raise StrokePredictorError(f"The prediction's segmentation file {out / files_seg} is missing.")
    transformed = dwi.GetParentTransformNode() is not None
    with all_or_nothing(scene):
        inferno = color_node("Inferno")
        viridis = color_node("Viridis")
        probability = _volume_node(f"{prefix} lesion probability", arrays["probability"], ijk_to_ras, inferno,
                                   (0.0, 1.0), PROBABILITY_DISPLAY_THRESHOLD)
        uncertainty = _volume_node(f"{prefix} uncertainty (entropy, bits)", arrays["uncertainty"], ijk_to_ras,
                                   viridis, (0.0, 1.0))
        spatial = _volume_node(f"{prefix} spatial attention", arrays["attention"], ijk_to_ras, inferno, (0.0, 1.0))
        segmentation = _load_segmentation(out / files_seg, probability if transformed else dwi)
        display = segmentation.GetDisplayNode()
        display.SetVisibility2DFill(False)
        display.SetVisibility2DOutline(True)
        display.SetSliceIntersectionThickness(2)
        feature_table = _table(f"{prefix} clinical feature attention", [
            ("Feature", "string", [f["name"] for f in features]),
            ("Label", "string", [f.get("label", f["name"]) for f in features]),
            ("Value", "string", ["unknown" if f.get("missing") else f.get("value") for f in features]),
            ("Weight", "double", [float(f["weight"]) for f in features]),
            # measured effect: volume with the feature set to missing minus the volume as given (mL);
            # NaN where the feature is missing already or effects were not measured
            ("Effect (mL)", "double", [float("nan") if f.get("effect_ml") is None else float(f["effect_ml"])
                                       for f in features]),
            # "growth offset": the outcome model's growth head alone reads the feature (the
            # cross-attention sees it as missing, so its weight does not depend on it)
            ("Acts through", "string", [f.get("acts_through", "cross-attention") for f in features]),
        ])
        chart, chart_table, series = _feature_chart(prefix, features)
        post = summary.get("postprocessing") or {}
        stats = [
            ("Lesion volume (thresholded)", float(volume.get("mask", float("nan"))), "mL"),
            ("Lesion volume, MC median", float(volume.get("median", float("nan"))), "mL"),
            ("Lesion volume, 95% interval low", float(ci[0]), "mL"),
            ("Lesion volume, 95% interval high", float(ci[1]), "mL"),
            ("Lesion volume, Monte-Carlo 2.5%", float(mc_ci[0]), "mL"),
            ("Lesion volume, Monte-Carlo 97.5%", float(mc_ci[1]), "mL"),
            ("Connected components", float(summary.get("n_components", 0)), "count"),
            ("Mean uncertainty in lesion", float(summary.get("mean_uncertainty_in_lesion", float("nan"))), "bits"),
            ("Threshold", float(summary.get("threshold", float("nan"))), "probability"),
            ("Smallest component kept", float(post.get("min_component_ml", 0.0)), "mL"),
            ("Components removed at median ADC of", float(post.get("max_component_adc", 0.0)),
             "10^-3 mm^2/s or more (0: none)"),
            ("Monte-Carlo samples", float(summary.get("mc_samples", 0)), "count"),
        ]
        statistics = _table(f"{prefix} lesion statistics", [
            ("Measure", "string", [s[0] for s in stats]),
            ("Value", "double", [s[1] for s in stats]),
            ("Unit", "string", [s[2] for s in stats]),
        ])
        result = ResultNodes(probability, uncertainty, spatial, segmentation, feature_table, chart, statistics,
                             summary, features, chart_table, series)
        _place_in_study([*result.nodes(), *series], dwi)
    return result


@dataclass
class ComparisonNodes:
    """The nodes made from a two-scenario what-if comparison."""

    difference: Any
    regions: Any
    table: Any
    comparison: dict = field(default_factory=dict)
    scenarios: list[dict] = field(default_factory=list)

    def nodes(self) -> list[Any]:
        return [self.difference, self.regions, self.table]


REGION_NAMES = {1: "first scenario only", 2: "second scenario only", 3: "both scenarios"}
REGION_COLORS = {1: (0.2, 0.75, 0.3), 2: (0.85, 0.2, 0.2), 3: (0.95, 0.85, 0.2)}


def _region_colors(prefix: str) -> Any:
    """A four-entry colour table for the region map (0 transparent)."""
    slicer = _slicer()
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(f"{prefix} what-if regions colours")
    node.SetTypeToUser()
    node.SetNumberOfColors(4)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for value, name in REGION_NAMES.items():
        node.SetColor(value, name, *REGION_COLORS[value], 1.0)
    slicer.mrmlScene.AddNode(node)
    return node


def _diverging_colors() -> Any:
    """Slicer's DivergingBlueRed table (blue negative, red positive) when present, else one built
    from matplotlib's ``coolwarm``."""
    slicer = _slicer()
    node = slicer.mrmlScene.GetNodeByID("vtkMRMLColorTableNodeFileDivergingBlueRed.txt")
    return node if node is not None else color_node("coolwarm")


def create_comparison_nodes(result_json: Path, dwi: Any, *, prefix: str | None = None) -> ComparisonNodes:
    """Turn a two-scenario what-if run of the prediction command into nodes on the DWI grid; all
    or nothing: the difference map (probability of the first scenario minus the second; with
    "no treatment" first, positive is tissue the treatment is predicted to save), the region
    labelmap (1 first only, 2 second only, 3 both) and a table of both scenarios' volumes side by
    side with the saved, added and net volumes.

    Raises:
        StrokePredictorError: the run holds no two-scenario comparison, or a file is missing or
            not on the DWI grid (no node is added).
    """
    slicer = _slicer()
    out = Path(result_json).parent
    try:
        what_if = json.loads((out / "what_if.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StrokePredictorError(f"The what-if results in {out} could not be read: {error}") from None
    comparison = what_if.get("comparison")
    scenarios = list(what_if.get("scenarios", []))
    if not comparison or len(scenarios) != 2:
        raise StrokePredictorError("The what-if run holds no comparison of exactly two scenarios.")
    dwi_geometry = node_geometry(dwi, "DWI")
    ijk_to_ras = world_ijk_to_ras(dwi, "DWI")
    difference = _read_on_grid(out / comparison["difference_file"], "what-if difference", dwi_geometry)
    regions = _read_on_grid(out / comparison["regions_file"], "what-if regions", dwi_geometry)
    prefix = prefix or dwi.GetName()
    volumes = comparison["volumes_ml"]
    labels = [str(comparison["first"]), str(comparison["second"])]
    with all_or_nothing(slicer.mrmlScene):
        difference_node = _volume_node(f"{prefix} what-if difference ({labels[0]} minus {labels[1]})", difference,
                                       ijk_to_ras, _diverging_colors(), (-1.0, 1.0))
        regions_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode",
                                                          f"{prefix} what-if regions")
        slicer.util.updateVolumeFromArray(regions_node, np.ascontiguousarray(regions, dtype=np.uint8))
        regions_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
        regions_node.CreateDefaultDisplayNodes()
        regions_node.GetDisplayNode().SetAndObserveColorNodeID(_region_colors(prefix).GetID())
        table = _table(f"{prefix} what-if comparison", [
            ("Scenario", "string", labels),
            ("Lesion volume (mL)", "double", [float(s["volume_ml"]) for s in scenarios]),
            ("MC median (mL)", "double", [float(s["median_ml"]) for s in scenarios]),
            ("95% interval low (mL)", "double", [float(s["ci95_low_ml"]) for s in scenarios]),
            ("95% interval high (mL)", "double", [float(s["ci95_high_ml"]) for s in scenarios]),
            ("Only in this scenario (mL)", "double", [float(volumes["saved"]), float(volumes["added"])]),
        ])
        table.SetAttribute("StrokePredictor.netDifferenceMl", f"{float(volumes['net']):.6g}")
        result = ComparisonNodes(difference_node, regions_node, table, comparison, scenarios)
        _place_in_study(result.nodes(), dwi)
    return result


def _load_segmentation(path: Path, reference: Any) -> Any:
    """Load the command's ``lesion.seg.nrrd`` (segment name, colour and terminology come from the
    file, written by ``StrokePredictorLib.outputs``) with ``reference`` as reference geometry."""
    slicer = _slicer()
    logic = slicer.modules.segmentations.logic()
    segmentation = logic.LoadSegmentationFromFile(str(path), False, SEGMENTATION_NODE_NAME)
    if segmentation is None:
        raise StrokePredictorError(f"The prediction's segmentation {path} could not be loaded.")
    segmentation.SetName(SEGMENTATION_NODE_NAME)
    if segmentation.GetDisplayNode() is None:
        segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    storage = segmentation.GetStorageNode()
    if storage is not None:  # the file lives in a temporary folder: do not point the scene at it
        segmentation.SetAndObserveStorageNodeID(None)
        slicer.mrmlScene.RemoveNode(storage)
    return segmentation


def show_layer(dwi: Any, overlay: Any, opacity: float = 0.5, segmentation: Any = None) -> None:
    """Show ``dwi`` as background and ``overlay`` as foreground in every slice view."""
    slicer = _slicer()
    composites = slicer.mrmlScene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        composite.SetBackgroundVolumeID(dwi.GetID() if dwi is not None else None)
        composite.SetForegroundVolumeID(overlay.GetID() if overlay is not None else None)
        composite.SetForegroundOpacity(float(opacity))
    if segmentation is not None and segmentation.GetDisplayNode() is not None:
        segmentation.GetDisplayNode().SetVisibility(True)


def show_comparison(dwi: Any, difference: Any, regions: Any, opacity: float = 0.5) -> None:
    """Show a what-if comparison in every slice view: the DWI as background, the difference map as
    foreground and the region map as label layer."""
    slicer = _slicer()
    composites = slicer.mrmlScene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        composite.SetBackgroundVolumeID(dwi.GetID() if dwi is not None else None)
        composite.SetForegroundVolumeID(difference.GetID() if difference is not None else None)
        composite.SetForegroundOpacity(float(opacity))
        composite.SetLabelVolumeID(regions.GetID() if regions is not None else None)
