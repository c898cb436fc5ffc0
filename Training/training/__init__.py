"""Stage 4, training: networks trained, checkpointed and exported as model bundles.

One engine, :mod:`.loop`, trains from an interchangeable data source (:mod:`.sources`): the
cache of :mod:`Training.data`, or data synthesised by :mod:`Training.synthesis` (a CPU pool of
pre-rendered volumes, or synthesis on the GPU at every step). ``train`` (CPU, CUDA, torchrun with
:mod:`.distributed`) and ``train-synth`` (variants in lockstep) are its two front ends; both write
run folders of one format. ``export`` turns a run's checkpoint into the model bundle the Slicer
module loads, and ``interpolate`` mixes two bundles' weights (WiSE-FT).

Imports the earlier stages, never :mod:`Training.evaluation`.
"""
