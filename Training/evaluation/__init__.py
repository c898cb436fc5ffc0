"""Stage 5, evaluation: how good a checkpoint or bundle is, and what to ship with it.

``evaluate`` scores predictions with the ISLES 2022 metrics (:mod:`.metrics`) beside a classical
baseline (:mod:`.baseline`); ``postprocess`` searches a bundle's post-processing on validation
data; ``ablate`` compares imaging-only with fusion; ``behaviour`` (:mod:`.clinical_behaviour`)
checks how predictions follow the clinical inputs; ``visualize`` draws the figures and ``card``
(:mod:`.model_card`) writes the model card from the measured results.

The last stage: it may import every earlier one.
"""
