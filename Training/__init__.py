"""Headless research tools of StrokePredictor: generate data, preprocess, train, evaluate,
visualize and export model bundles. Run ``python -m Training --help``."""
