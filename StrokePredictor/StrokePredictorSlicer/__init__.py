"""Scene glue of the StrokePredictor Slicer module (no Qt): process runners, the prediction
command line, and turning volume nodes into files and result files into nodes."""
