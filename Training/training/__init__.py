"""Stage 4, training: networks trained, checkpointed and exported as model bundles.

``train`` learns from the cache of :mod:`Training.data` (CPU, CUDA, torchrun with
:mod:`.distributed`), ``train-synth`` from synthesised data (:mod:`Training.synthesis`);
``export`` turns a run's checkpoint into the model bundle the Slicer module loads and
``interpolate`` mixes two bundles' weights (WiSE-FT).

Imports the earlier stages, never :mod:`Training.evaluation`.
"""
