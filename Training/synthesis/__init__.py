"""Stage 1, synthesis: simulated stroke cases, from anatomy to MR images.

The CPU phantom generator builds one case from template anatomy (:mod:`.anatomy`), lesions
(:mod:`.lesions`), real-scan mimics (:mod:`.mimics`), clinical values (:mod:`.clinical_sim`), the
follow-up infarct (:mod:`.outcome`), MR signal (:mod:`.physics`) and acquisition
(:mod:`.acquisition`), put together by :func:`.case.synthesize_case`; ``generate`` writes such
cases as a dataset in the ISLES 2022 layout. The domain-randomised renderer (:mod:`.gpu_synth`)
draws images from a synthesis pack (``synthpack``) at every training step on the GPU, or fills
the CPU recipe's pre-rendered pool (:mod:`.pool`).

Imports nothing from the later stages.
"""
