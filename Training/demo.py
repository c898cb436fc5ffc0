"""``python -m Training demo`` (the README's main command): the whole job on the bundled defaults.

The shipped sample case (``StrokePredictor/Resources/SampleData``: simulated DWI, ADC and FLAIR
built on a real SOOP lesion shape, plus its clinical values) goes through the bundled acute model
(``StrokePredictor/Resources/Models/acute``) with 20 Monte-Carlo samples; every output of the
prediction command is written to ``outputs/demo`` (probability, uncertainty, lesion mask,
``lesion.seg.nrrd`` for Slicer, attention, summary and a PNG overview), and the lesion volume with
its interval and the clinical features that weighed most are printed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from StrokePredictorLib.bundle import default_bundle_dir
from StrokePredictorLib.errors import StrokePredictorError
from StrokePredictorLib.io import find_case_files
from Training import config as cfg

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "StrokePredictor" / "Resources" / "SampleData"


@dataclass(frozen=True)
class DemoConfig:
    sample: Path = field(default=SAMPLE_DIR, metadata={"help": "folder of the sample case"})
    bundle: Path | None = field(default=None, metadata={"help": "model bundle (default: the bundled acute model)"})
    out: Path = field(default=Path("outputs/demo"), metadata={"help": "output folder"})
    mc_samples: int = field(default=20, metadata={"help": "Monte-Carlo dropout samples"})
    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})


def sample_case(folder: Path) -> dict[str, Path]:
    """The sample case's files: ``dwi``, ``adc``, ``flair`` (optional) and ``clinical`` JSON (optional)."""
    files = find_case_files(folder)
    missing = [name for name in ("dwi", "adc") if name not in files]
    if missing:
        raise StrokePredictorError(f"The sample case in {folder} has no {' or '.join(missing)} file.")
    return files


def main(argv: list[str]) -> int:
    from StrokePredictorLib import predict

    config = cfg.parse(DemoConfig, argv, __doc__.splitlines()[0], prog="python -m Training demo")
    bundle = config.bundle or default_bundle_dir("acute")
    if not (Path(bundle) / "model.json").is_file():
        raise StrokePredictorError(f"No model bundle in {bundle}: the trained acute bundle should ship in "
                                   "StrokePredictor/Resources/Models/acute (see its model card).")
    files = sample_case(Path(config.sample))
    arguments = ["--dwi", str(files["dwi"]), "--adc", str(files["adc"]), "--bundle", str(bundle),
                 "--out", str(config.out), "--mc-samples", str(config.mc_samples), "--device", config.device,
                 "--overwrite"]
    if "flair" in files:
        arguments += ["--flair", str(files["flair"])]
    if "clinical" in files:
        arguments += ["--clinical", str(files["clinical"])]
    print(f"Sample case: {Path(config.sample)} (simulated MR on a real SOOP lesion shape)")
    print(f"Model bundle: {bundle}")
    code = predict.main(arguments)
    if code != 0:
        return code
    summary = json.loads((Path(config.out) / "summary.json").read_text())
    attention = json.loads((Path(config.out) / "attention.json").read_text())
    volume = summary["lesion_volume_ml"]
    low, high = volume["ci95"]
    print()
    print(f"Predicted lesion volume: {volume['mask']:.1f} mL (MC median {volume['median']:.1f} mL, "
          f"95% interval {low:.1f}-{high:.1f} mL), {summary['n_components']} component(s)")
    print(f"Mean uncertainty in the lesion: {summary['mean_uncertainty_in_lesion']:.3f} bits (predictive entropy)")
    top = sorted(attention["features"], key=lambda f: f["weight"], reverse=True)[:3]
    print("Clinical features that weighed most: " + ", ".join(
        f"{f['label']} {f['weight']:.2f}" + (" (missing)" if f["missing"] else "") for f in top))
    print(f"All outputs: {Path(config.out).resolve()}")
    print(f"Overview picture: {(Path(config.out) / 'overview.png').resolve()}")
    return 0
