"""Benchmark of the Slicer module's Logic path: volume nodes in, result nodes out.

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_slicer_logic.py [--threads 2] [--repeats 3]
        [--mc-samples 20] [--bundle DIR]

Runs ``StrokePredictorLogic.predict`` on a real MRML scene (slicer-core, GUI layer stubbed): the
input nodes are written to NIfTI, ``python -m StrokePredictorLib.predict`` runs in a subprocess
(CPU, ``--threads`` cores), and every result (probability, uncertainty, attention volumes,
segmentation, tables, chart) is loaded back into the scene. Timed per repeat from the call to the
result nodes, so the Python start-up, torch import, bundle load and file I/O are included.

Case: the bundled sample case (StrokePredictor/Resources/SampleData) and model
(Resources/Models/acute) when present; otherwise an ISLES-sized analytic phantom (DWI and ADC
112x112x73 at 2 mm, FLAIR 512x512x29 at 0.45x0.45x5 mm) and a randomly initialised lite bundle.
Target: at most 15 s median with 20 MC samples on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTING = Path(__file__).resolve().parents[1]
REPO = TESTING.parent
for path in (REPO, TESTING):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def _phantom_case(folder: Path) -> dict[str, Path]:
    import numpy as np
    import phantoms

    from StrokePredictorLib.io import Geometry, write_volume

    dwi_geometry = Geometry((112, 112, 73), (2.0, 2.0, 2.0), (-111.0, -111.0, -72.0))
    flair_geometry = Geometry((512, 512, 29), (0.45, 0.45, 5.0), (-115.0, -115.0, -70.0),
                              tuple(phantoms.rotation_direction((0.0, 0.0, 4.0)).ravel()))
    rng = np.random.default_rng(0)
    paths = {"dwi": folder / "dwi.nii.gz", "adc": folder / "adc.nii.gz", "flair": folder / "flair.nii.gz"}
    write_volume(phantoms.sample(dwi_geometry, phantoms.DWI_INTENSITY, rng=rng, noise=4.0), dwi_geometry, paths["dwi"])
    write_volume(phantoms.sample(dwi_geometry, phantoms.ADC_1E3, rng=rng, noise=0.03), dwi_geometry, paths["adc"])
    write_volume(phantoms.sample(flair_geometry, phantoms.FLAIR_INTENSITY, rng=rng, noise=3.0), flair_geometry,
                 paths["flair"])
    return paths


def _random_lite_bundle(folder: Path) -> Path:
    import torch

    from StrokePredictorLib.bundle import recommended_grid, save_bundle
    from StrokePredictorLib.network import NetworkConfig, StrokeNet
    from StrokePredictorLib.preprocess import Normalization

    torch.manual_seed(0)
    config = NetworkConfig.lite()
    return save_bundle(folder, StrokeNet(config), task="acute", grid=recommended_grid(config),
                       normalization=Normalization(), data={"description": "random initialisation (benchmark)"},
                       metrics={}, name="random-lite-benchmark")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mc-samples", type=int, default=20)
    parser.add_argument("--bundle", type=Path, default=None)
    args = parser.parse_args(argv)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(args.threads)

    import slicer
    import slicer_env
    from StrokePredictorSlicer.runner import SubprocessRunner

    module = slicer_env.import_module()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        files = module.sampleDataFiles()
        bundle = args.bundle
        if files is not None and bundle is None and (module.MODELS_DIR / "acute" / "model.json").is_file():
            case, bundle = "sample case", module.MODELS_DIR / "acute"
        else:
            files, case = _phantom_case(work / "case"), "ISLES-sized phantom (112x112x73 at 2 mm + FLAIR)"
            bundle = bundle or _random_lite_bundle(work / "bundle")
        from StrokePredictorLib.clinical import read_json

        clinical = read_json(files["clinical"]).to_dict() if "clinical" in files else {"nihss": 12, "age": 70}
        times, cli_timings = [], []
        for _ in range(args.repeats):
            env = slicer_env.make_scene()
            dwi = slicer.util.loadVolume(str(files["dwi"]), {"name": "DWI"})
            adc = slicer.util.loadVolume(str(files["adc"]), {"name": "ADC"})
            flair = slicer.util.loadVolume(str(files["flair"]), {"name": "FLAIR"}) if "flair" in files else None
            logic = module.StrokePredictorLogic(runner=SubprocessRunner(), python=sys.executable)
            start = time.perf_counter()
            result = logic.predict(dwi, adc, flair, clinical, bundle=bundle, mcSamples=args.mc_samples, device="cpu",
                                   timeout=600)
            times.append(time.perf_counter() - start)
            cli_timings.append(result.summary.get("timings_s", {}))
            assert result.probability.GetImageData().GetDimensions() == dwi.GetImageData().GetDimensions()
            del env
    report = {
        "benchmark": "slicer_logic_nodes_in_nodes_out", "case": case,
        "bundle": "sample acute" if case == "sample case" else "random lite",
        "mc_samples": args.mc_samples, "threads": args.threads, "repeats": args.repeats,
        "seconds": [round(t, 2) for t in times], "median_s": round(statistics.median(times), 2),
        "cli_timings_s_last": cli_timings[-1] if cli_timings else {},
        "target_median_s": 15.0, "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(report, indent=2))
    return 0 if report["median_s"] <= 15.0 else 1


if __name__ == "__main__":
    sys.exit(main())
