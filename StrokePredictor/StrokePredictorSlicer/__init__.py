"""Scene glue of the StrokePredictor Slicer module (no Qt): the process runner, the prediction
command line, what the panel shows (``panel``), the Python dependencies, and turning volume
nodes into files and result files into nodes."""
