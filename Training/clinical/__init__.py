"""Stage 2, clinical data: the clinical values that go with the images.

:mod:`.nihss` predicts NIHSS from a lesion (a Poisson model fitted on SOOP by
``python -m Training.clinical.fit_nihss``); ``clinical`` (:mod:`.clinical_data`) writes the
clinical CSV of an ISLES-layout folder, observed values where there are some and simulated ones
otherwise.

Imports nothing from the later stages.
"""
