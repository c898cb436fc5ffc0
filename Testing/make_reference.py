"""Write the stored reference predictions of the shipped bundles on the sample case.

``Testing/test_shipped_bundles.py`` predicts the sample case with each shipped bundle and compares
with these files (nnU-Net's CI habit). Regenerate them only when a bundle changes on purpose
(new weights or a new post-processing block), and say so in the commit::

    PYTHONPATH=. .venv/bin/python Testing/make_reference.py
"""

from __future__ import annotations

import json
from pathlib import Path

from StrokePredictorLib import clinical
from StrokePredictorLib.bundle import load_bundle
from StrokePredictorLib.inference import Predictor
from StrokePredictorLib.io import read_volume, write_volume

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "StrokePredictor" / "Resources" / "Models"
SAMPLE = REPO / "StrokePredictor" / "Resources" / "SampleData"
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
MC_SAMPLES, SEED = 20, 0


def main() -> int:
    dwi, adc, flair = (read_volume(SAMPLE / f"StrokePredictorSample_{role}.nii.gz") for role in ("dwi", "adc", "flair"))
    record = clinical.read_json(SAMPLE / "StrokePredictorSample_clinical.json")
    REFERENCE.mkdir(parents=True, exist_ok=True)
    for task in ("acute", "outcome"):
        bundle = load_bundle(MODELS / task)
        prediction = Predictor(bundle, device="cpu", mc_samples=MC_SAMPLES, seed=SEED).predict(dwi, adc, flair, record)
        write_volume(prediction.mask, prediction.geometry, REFERENCE / f"sample_{task}_lesion.nii.gz", overwrite=True)
        reference = {"bundle_sha256": bundle.sha256, "postprocessing": bundle.postprocessing.to_dict(),
                     "mc_samples": MC_SAMPLES, "seed": SEED, "volume_ml": prediction.volume_ml,
                     "n_components": prediction.n_components, "feature_attention": prediction.feature_attention}
        (REFERENCE / f"sample_{task}.json").write_text(json.dumps(reference, indent=2) + "\n")
        volume = prediction.volume_ml
        print(f"{task}: {volume['mask']:.1f} mL (95% interval {volume['ci95'][0]:.1f}-{volume['ci95'][1]:.1f}), "
              f"{prediction.n_components} component(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
