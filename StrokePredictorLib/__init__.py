"""StrokePredictorLib: the pure-Python core of StrokePredictor.

Reads DWI/ADC/FLAIR with exact physical geometry, preprocesses them for the multimodal
network, runs Monte-Carlo-dropout inference and writes results back on the DWI grid.
It never imports slicer, qt, ctk or vtk: the Slicer module and the Training tools both
build on it.
"""

from __future__ import annotations

__version__ = "0.1.0"

from StrokePredictorLib.errors import StrokePredictorError  # noqa: E402

__all__ = ["StrokePredictorError", "__version__"]
