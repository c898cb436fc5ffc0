"""Synthetic stroke data: template anatomy, lesions, clinical values, MR signal, outcome.

Public entry point: :func:`Training.synth.case.synthesize_case` (one case in memory);
``Training.generate`` writes datasets in the ISLES 2022 layout.
"""

from __future__ import annotations

from Training.synth.case import ADC_SCALES, MODES, SynthesisParams, SyntheticCase, case_id_for, synthesize_case

__all__ = ["ADC_SCALES", "MODES", "SynthesisParams", "SyntheticCase", "case_id_for", "synthesize_case"]
