"""Headless research tools of StrokePredictor. Run ``python -m Training --help``.

The subpackages follow the pipeline; each stage imports only the stages before it (a test
parses every module's imports to keep it so)::

    synthesis/   1  simulated cases: anatomy, lesions, mimics, physics -> generate (ISLES layout),
                    synthpack + gpu_synth (domain-randomised rendering), pool (CPU recipe)
    clinical/    2  clinical values: NIHSS model (nihss, fit_nihss), clinical CSV (clinical_data)
    data/        3  preprocess into the training cache (cache), datasets + augmentation (dataset)
    training/    4  loop (the one training engine) with its data sources (cache, pool, GPU
                    synthesis); train and train_synth, its two front ends; distributed, export
                    (checkpoint -> model bundle), interpolate (WiSE-FT)
    evaluation/  5  evaluate, metrics, baseline, postprocess, ablate, clinical_behaviour,
                    select (a checkpoint chosen on validation checks), visualize, model_card

Beside them: :mod:`Training.config` (option parsing shared by every verb, imports no stage),
:mod:`Training.campaign` (runs training, export and the post-processing search end to end and
decides what ships) and :mod:`Training.demo` (the main job on the bundled defaults).
``python -m Training <verb>`` maps each verb to its module (:data:`Training.__main__.VERBS`).
The model bundle that ``export`` writes is the only thing handed to the Slicer module.
"""
