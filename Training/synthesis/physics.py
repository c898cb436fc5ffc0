"""Noise-free template-space images for the two synthesis modes.

``physical`` (default; tests, demos, the sample case): multi-compartment signal model. Each voxel
holds CSF, grey and white matter fractions (partial volume); compartment ``t`` contributes
``S0_t * exp(-b * ADC_t)`` to the diffusion-weighted signal (S = S0 exp(-b ADC)). Tissue ADC
(x10^-3 mm^2/s): WM 0.72, GM 0.90, CSF 2.5-2.9 (ISLES 2022 medians); the b=0 signals S0 are set
so that DWI WM/GM is about 1.05 and CSF 0.45-0.6 of WM, as measured on real ISLES cases. Texture
comes from the MNI T1 (T2-like inverse contrast) plus a smooth field. The lesion lowers the ADC
of the tissue compartments by ``r * severity`` (``r`` 30-50%, rising with time since onset,
pseudo-normalising after 24 h) and raises S0 with time (T2 shine-through); FLAIR shows dark CSF
and a lesion signal that appears only after about 3.5 h (DWI-FLAIR mismatch). Mimics: T2
shine-through blobs (bright DWI, normal ADC), white-matter hyperintensities, an old infarct,
and susceptibility-like artefacts; with ``scan_mimics``, the real-scan mimics of
:mod:`Training.synthesis.mimics` (the same kinds, places and multipliers as the GPU synthesiser's)
multiply S0 (both b-values), the tissue ADC (with extra noise) and FLAIR.

``randomized`` (training; SynthSeg / SynthStroke-style domain randomisation): DWI and FLAIR
intensities are drawn per class (CSF, GM, WM, skull, scalp, lesion core and rim, mimics) from
Gaussian mixtures with random means and spreads for every image; the lesion is hyperintense on
DWI with a random contrast from barely visible to strong and a heterogeneous texture. ADC stays
physical: literature tissue values with a scanner factor (+-15%), lesion reduction 30-50% (20% of
cases 5-30%), and the noise of an ADC computed from a noisy b0/b1000 pair (random S0 contrasts).
"""

from __future__ import annotations

import numpy as np

from Training.synthesis.anatomy import Template
from Training.synthesis.clinical_sim import HiddenState
from Training.synthesis.lesions import Lesion, Mimics, smooth_noise

#: Literature/ISLES tissue ADC (mm^2/s) and DWI ratio targets of the physical mode.
PHYSICS: dict = {
    "adc_mm2s": {"wm": 0.72e-3, "gm": 0.90e-3, "csf": [2.5e-3, 2.9e-3], "skull": 1.0e-3, "scalp": 0.5e-3},
    "dwi_ratio_wm_over_gm": [1.0, 1.1],
    "dwi_ratio_csf_over_wm": [0.45, 0.6],
    "b_values": {"1000": 0.8, "800": 0.2},
    "ood_b_values": [500, 1500, 2000],
    "scanner_adc_factor": [0.95, 1.05],
    "lesion_adc_reduction_max": [0.38, 0.5],
    "lesion_adc_reduction_time": ("r = r_max * (0.75 + 0.25 * (1 - exp(-t / 3 h)))"
                                  " * (1 - 0.4 * clip((t - 24) / 48, 0, 1))"),
    "lesion_t2_shine_through": "S0 *= 1 + U(0.5, 1) * 0.35 * clip(t / 24, 0, 1) * severity",
    "flair_lesion_gain": "FLAIR *= 1 + U(0.35, 0.8) * clip((t - 3.5) / 6, 0, 1) * severity",
    "flair_relative": {"wm": 1.0, "gm": [1.15, 1.35], "csf": [0.15, 0.3], "skull": 0.1, "scalp": 1.6},
}
RANDOMIZED: dict = {
    "scanner_adc_factor": [0.85, 1.15],
    "tissue_adc_jitter": [0.95, 1.05],
    "lesion_adc_reduction": "80%: U(0.3, 0.5); 20%: U(0.05, 0.3)",
    "dwi_means_relative_to_wm": {"gm": [0.6, 1.5], "csf": [0.1, 1.2], "skull": [0.0, 0.5], "scalp": [0.2, 1.5]},
    "flair_means_relative_to_wm": {"gm": [0.7, 1.6], "csf": [0.05, 1.3], "skull": [0.0, 0.5], "scalp": [0.2, 1.8]},
    "class_spread_relative": [0.02, 0.12],
    "dwi_lesion_contrast": "70%: U(0.25, 1.0); 30%: U(0.03, 0.25) (barely visible)",
}


def _u(rng: np.random.Generator, bounds: list | tuple) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def lesion_adc_reduction(onset_h: float, r_max: float) -> float:
    """Fractional ADC reduction of the lesion core at ``onset_h`` hours (physical mode)."""
    r = r_max * (0.75 + 0.25 * (1 - np.exp(-onset_h / 3.0)))
    return float(r * (1 - 0.4 * np.clip((onset_h - 24) / 48, 0, 1)))


def flair_visibility(onset_h: float) -> float:
    """0..1 FLAIR lesion visibility factor: nil before 3.5 h, full by 9.5 h."""
    return float(np.clip((onset_h - 3.5) / 6.0, 0, 1))


def _texture(template: Template, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Anatomical texture factor (~1): inverse T1 contrast plus a smooth random field."""
    brain = template.brain > 0.5
    t1 = template.t1 - float(np.median(template.t1[brain]))
    return (1.0 - amplitude * t1 + 0.06 * smooth_noise(rng, template.shape, 1.0)).astype(np.float32)


def _effective(lesion: Lesion) -> np.ndarray:
    """Lesion effect 0..1 per voxel: severity times partial-volume fraction."""
    return np.clip(lesion.severity, 0, 1.2) * np.clip(lesion.fraction * 1.6, 0, 1)


def _tissue_adc(adc: dict, tissue: str, mimics: Mimics, scanner: float) -> float | np.ndarray:
    """A tissue's ADC (mm^2/s): a number, or for grey matter with the cerebellar cortex's own value
    (:func:`Training.synthesis.lesions.draw_cerebellar`) a map."""
    if tissue == "gm" and mimics.cerebellar is not None:
        return mimics.cerebellar.gm_adc(adc["gm"], scanner)
    return adc[tissue]


def physical_images(template: Template, lesion: Lesion, mimics: Mimics, hidden: HiddenState,
                    rng: np.random.Generator, *, skull: bool, ood: bool) -> tuple[dict, dict]:
    """Noise-free S0 (b=0), S_b (b-weighted) and FLAIR on the template grid.

    Returns:
        ({"s0", "sb", "flair"}: float32 ``[k, j, i]`` arrays in arbitrary units (WM S0 = 1),
        info dict with every drawn parameter).
    """
    p = PHYSICS
    if ood:
        b = float(rng.choice(p["ood_b_values"]))
    else:
        b = 1000.0 if rng.random() < p["b_values"]["1000"] else 800.0
    scanner = _u(rng, p["scanner_adc_factor"])
    adc = {"wm": p["adc_mm2s"]["wm"] * scanner, "gm": p["adc_mm2s"]["gm"] * scanner,
           "csf": _u(rng, p["adc_mm2s"]["csf"]), "skull": p["adc_mm2s"]["skull"], "scalp": p["adc_mm2s"]["scalp"]}
    wm_over_gm = _u(rng, p["dwi_ratio_wm_over_gm"])
    csf_over_wm = _u(rng, p["dwi_ratio_csf_over_wm"])
    s0 = {"wm": 1.0, "gm": float(np.exp(-b * (adc["wm"] - adc["gm"])) / wm_over_gm),
          "csf": float(csf_over_wm * np.exp(-b * (adc["wm"] - adc["csf"]))), "skull": 0.15, "scalp": 0.8}
    onset = hidden.onset_h
    r = lesion_adc_reduction(onset, _u(rng, p["lesion_adc_reduction_max"]))
    shine = float(rng.uniform(0.5, 1.0) * 0.35 * np.clip(onset / 24, 0, 1))
    flair_gain = float(rng.uniform(0.35, 0.8) * flair_visibility(onset))
    eff = _effective(lesion)
    texture = _texture(template, rng, float(rng.uniform(0.15, 0.35)))
    adc_texture = 1.0 + 0.04 * smooth_noise(rng, template.shape, 1.0)
    # mimics: S0 gain, ADC factor, FLAIR gain
    s0_gain = 1 + 0.7 * mimics.shine + 0.35 * mimics.wmh + 1.2 * mimics.chronic + 0.9 * mimics.artefact
    regional = 1.0 if mimics.regional is None else 1.0 + mimics.regional  # DWI bright, ADC unchanged
    adc_gain = (1 + 0.05 * mimics.shine + 0.25 * mimics.wmh) * adc_texture
    chronic = mimics.chronic
    scan = mimics.scan_factors()  # real-scan mimics (Training.synthesis.mimics): S0, ADC, FLAIR multipliers
    lesion_s0 = 1 + shine * eff
    lesion_adc = 1 - r * np.clip(eff, 0, 1)
    s0_img = np.zeros(template.shape, np.float32)
    sb_img = np.zeros(template.shape, np.float32)
    for tissue in ("wm", "gm", "csf"):
        frac = getattr(template, tissue)
        base_adc = _tissue_adc(adc, tissue, mimics, scanner) * adc_gain
        if tissue != "csf":
            base_adc = (base_adc * lesion_adc) * (1 - chronic) + 2.2e-3 * chronic
            s0_t = s0[tissue] * texture * lesion_s0 * s0_gain * regional
            if scan is not None:
                base_adc, s0_t = base_adc * scan[1], s0_t * scan[0]
        else:
            s0_t = s0[tissue] * (1 + 0.7 * mimics.shine + 0.9 * mimics.artefact) * regional
            if scan is not None:
                s0_t = s0_t * scan[0]
        s0_img += frac * s0_t
        sb_img += frac * s0_t * np.exp(-b * base_adc)
    if skull:
        for tissue in ("skull", "scalp"):
            frac = getattr(template, tissue)
            s0_img += frac * s0[tissue]
            sb_img += frac * s0[tissue] * np.exp(-b * adc[tissue])
    fl = {"wm": 1.0, "gm": _u(rng, p["flair_relative"]["gm"]), "csf": _u(rng, p["flair_relative"]["csf"]),
          "skull": 0.1, "scalp": 1.6}
    if ood and rng.random() < 0.5:
        fl["csf"] = float(rng.uniform(1.3, 1.8))  # T2-like, no CSF suppression: never seen in training
    flair_texture = _texture(template, rng, float(rng.uniform(0.1, 0.3)))
    rim = np.clip(4 * chronic * (1 - chronic), 0, 1)
    tissue_flair = (template.wm * fl["wm"] + template.gm * fl["gm"]) * flair_texture
    tissue_flair = tissue_flair * (1 + flair_gain * np.clip(eff, 0, 1)) * (1 + 0.8 * mimics.wmh + 0.5 * mimics.shine)
    tissue_flair = tissue_flair * (1 - 0.6 * chronic + 0.8 * rim)
    if scan is not None:
        tissue_flair = tissue_flair * scan[2]
    if mimics.cerebellar is not None:
        tissue_flair = mimics.cerebellar.flair(tissue_flair)
    flair = tissue_flair + template.csf * fl["csf"]
    if skull:
        flair = flair + template.skull * fl["skull"] + template.scalp * fl["scalp"]
    info = {"b_value": b, "tissue_adc_mm2s": adc, "tissue_s0": s0, "dwi_wm_over_gm": wm_over_gm,
            "dwi_csf_over_wm": csf_over_wm, "lesion_adc_reduction": r, "lesion_t2_shine_through": shine,
            "flair_lesion_gain": flair_gain, "flair_relative": fl}
    return {"s0": s0_img, "sb": sb_img, "flair": flair.astype(np.float32)}, info


def randomized_images(template: Template, lesion: Lesion, mimics: Mimics, hidden: HiddenState,
                      rng: np.random.Generator, *, skull: bool, ood: bool) -> tuple[dict, dict]:
    """Domain-randomised template-space images: ``dwi`` and ``flair`` from per-class Gaussian
    mixtures, ``s0``/``sb`` from physical ADC with random S0 contrasts (for the ADC map).

    Returns:
        ({"dwi", "flair", "s0", "sb"} float32 ``[k, j, i]``, info dict of drawn parameters).
    """
    q = RANDOMIZED
    shape = template.shape
    eff = np.clip(_effective(lesion), 0, 1)
    classes = {"wm": template.wm, "gm": template.gm, "csf": template.csf}
    if skull:
        classes.update({"skull": template.skull, "scalp": template.scalp})

    def gmm(means_rel: dict, lesion_contrast: float, mimic_gain: dict) -> tuple[np.ndarray, dict]:
        means = {"wm": 1.0}
        means.update({c: _u(rng, means_rel[c]) for c in classes if c != "wm"})
        image = np.zeros(shape, np.float32)
        spread_sigma = float(rng.uniform(0.5, 1.5))
        for name, frac in classes.items():
            spread = means[name] * _u(rng, q["class_spread_relative"])
            image += frac * (means[name] + spread * smooth_noise(rng, shape, spread_sigma))
        lesion_texture = 1 + float(rng.uniform(0.0, 0.5)) * smooth_noise(rng, shape, float(rng.uniform(0.5, 1.5)))
        image *= 1 + lesion_contrast * eff * np.clip(lesion_texture, 0.2, 2.0)
        for key, gain in mimic_gain.items():
            image *= 1 + gain * getattr(mimics, key)
        return np.clip(image, 0, None), means

    if rng.random() < 0.7:
        dwi_contrast = float(rng.uniform(0.25, 1.0))
    else:
        dwi_contrast = float(rng.uniform(0.03, 0.25))
    dwi_mimic = {"shine": float(rng.uniform(0.2, 1.0)), "wmh": float(rng.uniform(0.0, 0.4)),
                 "chronic": float(rng.uniform(-0.7, 0.0)), "artefact": float(rng.uniform(0.3, 1.2))}
    dwi, dwi_means = gmm(q["dwi_means_relative_to_wm"], dwi_contrast, dwi_mimic)
    if mimics.regional is not None:
        dwi = dwi * (1 + mimics.regional)
    flair_contrast = float(rng.uniform(0.0, 0.9) * np.clip((hidden.onset_h - 2.0) / 6.0, 0.05, 1.0))
    flair_mimic = {"shine": float(rng.uniform(0.0, 0.8)), "wmh": float(rng.uniform(0.2, 1.0)),
                   "chronic": float(rng.uniform(-0.5, 0.8)), "artefact": 0.0}
    flair, flair_means = gmm(q["flair_means_relative_to_wm"], flair_contrast, flair_mimic)
    if mimics.cerebellar is not None:
        flair = mimics.cerebellar.flair(flair)
    scan = mimics.scan_factors()  # real-scan mimics (Training.synthesis.mimics): S0, ADC, FLAIR multipliers
    if scan is not None:
        flair = flair * scan[2]
    # physical ADC with scanner variability, S0 contrasts random
    scanner = _u(rng, q["scanner_adc_factor"])
    jitter = {t: _u(rng, q["tissue_adc_jitter"]) for t in ("wm", "gm", "csf")}
    adc = {"wm": 0.72e-3 * scanner * jitter["wm"], "gm": 0.90e-3 * scanner * jitter["gm"],
           "csf": float(rng.uniform(2.5e-3, 2.9e-3)) * jitter["csf"], "skull": 1.0e-3, "scalp": 0.5e-3}
    r = float(rng.uniform(0.3, 0.5)) if rng.random() < 0.8 else float(rng.uniform(0.05, 0.3))
    b = float(rng.choice([1500.0, 2000.0, 500.0])) if ood else (1000.0 if rng.random() < 0.8 else 800.0)
    s0 = {"wm": 1.0, "gm": float(rng.uniform(0.9, 1.4)), "csf": float(rng.uniform(1.5, 4.0)), "skull": 0.15,
          "scalp": 0.8}
    adc_texture = 1.0 + 0.04 * smooth_noise(rng, shape, 1.0)
    adc_mimic = (1 + float(rng.uniform(0.0, 0.15)) * mimics.shine + 0.25 * mimics.wmh) * adc_texture
    s0_gain = 1 + 0.7 * mimics.shine + 1.2 * mimics.chronic + 0.9 * mimics.artefact
    s0_img = np.zeros(shape, np.float32)
    sb_img = np.zeros(shape, np.float32)
    for tissue, frac in classes.items():
        value = _tissue_adc(adc, tissue, mimics, scanner) * (adc_mimic if tissue in ("wm", "gm", "csf") else 1.0)
        if tissue in ("wm", "gm"):
            value = value * (1 - r * eff) * (1 - mimics.chronic) + 2.2e-3 * mimics.chronic
        s = s0[tissue] * (s0_gain if tissue in ("wm", "gm") else 1.0)
        if scan is not None and tissue in ("wm", "gm", "csf"):
            s = s * scan[0]
            value = value * scan[1] if tissue != "csf" else value
        s0_img += frac * s
        sb_img += frac * s * np.exp(-b * value)
    if scan is not None:  # the randomised DWI follows the mimics' physics: S0 gain and exp(-b dADC) at WM ADC
        dwi = dwi * scan[0] * np.exp(-b * adc["wm"] * (scan[1] - 1))
    info = {"b_value": b, "tissue_adc_mm2s": adc, "scanner_adc_factor": scanner, "lesion_adc_reduction": r,
            "dwi_class_means": dwi_means, "dwi_lesion_contrast": dwi_contrast, "dwi_mimic_gain": dwi_mimic,
            "flair_class_means": flair_means, "flair_lesion_contrast": flair_contrast, "tissue_s0": s0}
    return {"dwi": dwi.astype(np.float32), "flair": flair.astype(np.float32), "s0": s0_img, "sb": sb_img}, info
