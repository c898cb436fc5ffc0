"""Simulated clinical values that are consistent with the simulated lesion.

Where a SOOP lesion is used, its participant's real age, sex, NIHSS and prior stroke come with
it (missing where SOOP has ``n/a``); everything else is simulated:

* onset to imaging (h): log-normal around 3 h for witnessed onsets; a wake-up stroke (about 22%)
  has an *unknown* reported onset (missing) but a hidden true time of 4-14 h that still drives
  the images (FLAIR visibility) and the outcome;
* NIHSS (procedural lesions): grows with log lesion volume, territory and the hidden penumbra;
* systolic BP, glucose, atrial fibrillation (more likely with embolic showers and age),
  pre-stroke mRS, treatment (thrombolysis needs a known onset within 4.5 h; thrombectomy is
  given mostly to territorial strokes with NIHSS >= 6 within 24 h);
* realistic missingness per field (:data:`MISSING_RATES`).

The hidden variables (true onset, collateral status) are returned separately and recorded in
dataset.json, never in clinical.csv.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from StrokePredictorLib.clinical import ClinicalRecord, ClinicalValueError, feature, parse_value, validate

#: Probability that a field is missing (onset: the wake-up fraction, set separately).
MISSING_RATES: dict[str, float] = {
    "age": 0.01, "sex": 0.01, "nihss": 0.04, "systolic_bp": 0.05, "glucose": 0.07,
    "atrial_fibrillation": 0.03, "prior_stroke": 0.03, "prestroke_mrs": 0.10, "treatment": 0.02,
}


@dataclass(frozen=True)
class HiddenState:
    """Values that shape the images and the outcome but are not (all) in the clinical CSV."""

    onset_h: float          # true onset-to-imaging time (h), known even for wake-up strokes
    wake_up: bool           # reported onset unknown
    collateral: float       # 0 poor .. 1 good collaterals (slows infarct growth)
    nihss: float            # true NIHSS (used even when reported missing)
    treatment: str          # true treatment
    glucose: float          # mmol/L

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def simulate_clinical(rng: np.random.Generator, *, kind: str, volume_ml: float, territory: int,
                      real: dict | None = None, wakeup_fraction: float = 0.22,
                      missing: bool = True) -> tuple[ClinicalRecord, HiddenState]:
    """Draw one patient's clinical record and hidden state.

    Args:
        rng: random generator.
        kind: lesion kind ("territorial", "embolic", "small", "empty", "soop").
        volume_ml: acute lesion volume (mL).
        territory: territory label of the lesion (0 none; 7/8 posterior fossa).
        real: SOOP values {age, sex, nihss, prior_stroke} (None entries are missing) or None.
        wakeup_fraction: probability of an unknown (wake-up) onset.
        missing: apply :data:`MISSING_RATES` (False gives complete records).

    Returns:
        (validated record, hidden state).
    """
    real = real or {}
    collateral = float(rng.beta(2.5, 2.0))
    if real:
        try:
            age = parse_value(feature("age"), real.get("age"))
        except ClinicalValueError:  # a real participant the form cannot hold (SOOP has a 16-year-old): left empty
            age = None
        sex = real.get("sex")
    else:
        age = float(np.clip(np.round(rng.normal(70, 13)), 18, 100))
        sex = "F" if rng.random() < 0.47 else "M"
    wake_up = bool(rng.random() < wakeup_fraction)
    onset = float(rng.uniform(4.0, 14.0)) if wake_up else float(np.clip(rng.lognormal(np.log(3.0), 0.75), 0.3, 47.0))
    if real and "nihss" in real:
        nihss_true = real.get("nihss")
        nihss_value = None if nihss_true is None else float(nihss_true)
        if nihss_true is None:  # SOOP n/a: still need a hidden severity
            nihss_true = float(np.clip(np.round(2 + 3.0 * np.log1p(volume_ml) + rng.normal(0, 3)), 0, 42))
    else:
        fossa = 0.7 if territory in (7, 8) else 1.0
        mean = 1.0 + fossa * 3.3 * np.log1p(volume_ml) + 6.0 * (1 - collateral) * (kind == "territorial")
        nihss_true = float(np.clip(np.round(mean + rng.normal(0, 2.5)), 0, 42)) if volume_ml > 0 else float(
            np.clip(np.round(rng.exponential(2.0)), 0, 42))
        nihss_value = nihss_true
    age_for_risk = 70.0 if age is None else float(age)
    sbp = float(np.clip(np.round(rng.normal(150 + 0.4 * (age_for_risk - 70), 22)), 80, 260))
    glucose = float(np.clip(np.round(rng.lognormal(np.log(6.8), 0.28), 1), 2.5, 30.0))
    p_af = 0.12 + 0.3 * (kind == "embolic") + 0.12 * (age_for_risk > 75) + 0.1 * (kind == "territorial")
    afib = "yes" if rng.random() < p_af else "no"
    prior = real.get("prior_stroke") if real else ("yes" if rng.random() < 0.18 else "no")
    mrs = float(rng.choice(6, p=[0.55, 0.2, 0.1, 0.08, 0.05, 0.02]))
    large = kind in ("territorial", "soop") and (nihss_true >= 6 or volume_ml > 8)
    lysis = (not wake_up and onset <= 4.5 and rng.random() < 0.55) or (wake_up and rng.random() < 0.1)
    evt = large and onset <= 24 and rng.random() < 0.5
    treatment = {(False, False): "none", (True, False): "thrombolysis", (False, True): "thrombectomy",
                 (True, True): "both"}[(bool(lysis), bool(evt))]
    raw: dict[str, object] = {
        "age": age, "sex": sex, "nihss": nihss_value, "onset_to_imaging_h": None if wake_up else round(onset, 1),
        "systolic_bp": sbp, "glucose": glucose, "atrial_fibrillation": afib, "prior_stroke": prior,
        "prestroke_mrs": mrs, "treatment": treatment,
    }
    if missing:
        for name, rate in MISSING_RATES.items():
            if rng.random() < rate:
                raw[name] = None
    if raw["onset_to_imaging_h"] is not None:
        raw["onset_to_imaging_h"] = max(float(raw["onset_to_imaging_h"]), 0.1)
    hidden = HiddenState(onset, wake_up, collateral, float(nihss_true), treatment, glucose)
    return validate(raw), hidden
