"""Inference benchmark of the ``lite`` network on an ISLES-sized case (run as a script, not by pytest).

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_inference.py [--device cpu|cuda] [--threads 2]
        [--repeats 3] [--mc-samples 20] [--bundle DIR]

Builds a synthetic case (DWI and ADC 112x112x73 at 2 mm, FLAIR 512x512x29 at 0.45x0.45x5 mm,
oblique to each other) and, unless ``--bundle`` is given, a randomly initialised lite bundle. Each
repeat runs in a fresh subprocess (so peak memory is that of one prediction, measured with
``resource.getrusage`` maxrss) and times:

* ``files_to_outputs_s``: bundle load + reading the files + preprocessing + network + 20 MC
  samples + writing every output file (the CLI's work, without the Python start-up);
* ``network_deterministic_s``: one deterministic pass (network + head);
* ``network_mc_s``: the same pass plus the N Monte-Carlo samples; ``mc_ratio`` = mc / deterministic.

Targets (CPU, 2 cores): files to outputs <= 10 s median, mc_ratio <= 2, peak memory <= 3 GB;
CUDA: files to outputs < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _ellipsoid_image(geometry, values: tuple[float, float, float], seed: int) -> np.ndarray:
    from StrokePredictorLib.io import Geometry  # noqa: F401

    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in geometry.shape), indexing="ij")
    points = geometry.index_to_lps(np.stack([i, j, k], axis=-1))
    brain = ((points / np.array([68.0, 85.0, 58.0])) ** 2).sum(-1) <= 1
    lesion = (((points - np.array([-30.0, 20.0, 10.0])) / np.array([12.0, 10.0, 9.0])) ** 2).sum(-1) <= 1
    rng = np.random.default_rng(seed)
    image = np.where(brain, values[0], 0.0) + np.where(lesion, values[1] - values[0], 0.0)
    image = image + brain * rng.normal(0, values[2], brain.shape)
    return np.clip(image, 0, None).astype(np.float32)


def make_case(folder: Path) -> dict[str, Path]:
    from StrokePredictorLib.io import Geometry, write_volume

    angle = np.radians(6.0)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    dwi_geometry = Geometry((112, 112, 73), (2.0, 2.0, 2.0), (-111.0, -111.0, -72.0))
    flair_geometry = Geometry((512, 512, 29), (0.45, 0.45, 5.0), (-115.0, -115.0, -70.0), tuple(rotation.ravel()))
    paths = {name: folder / f"{name}.nii.gz" for name in ("dwi", "adc", "flair")}
    write_volume(_ellipsoid_image(dwi_geometry, (100.0, 170.0, 8.0), 0), dwi_geometry, paths["dwi"])
    write_volume(_ellipsoid_image(dwi_geometry, (800.0, 450.0, 60.0), 1), dwi_geometry, paths["adc"])  # 10^-6
    write_volume(_ellipsoid_image(flair_geometry, (300.0, 520.0, 25.0), 2), flair_geometry, paths["flair"])
    return paths


def make_bundle(folder: Path) -> Path:
    import torch

    from StrokePredictorLib.bundle import LITE_GRID, save_bundle
    from StrokePredictorLib.network import NetworkConfig, StrokeNet
    from StrokePredictorLib.preprocess import Normalization

    torch.manual_seed(0)
    return save_bundle(folder, StrokeNet(NetworkConfig.lite()), task="acute", grid=LITE_GRID,
                       normalization=Normalization(), data={"description": "random initialisation (benchmark)"},
                       metrics={}, name="lite-random")


def worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from StrokePredictorLib.inference import Predictor
    from StrokePredictorLib.io import read_volume
    from StrokePredictorLib.outputs import write_outputs
    from StrokePredictorLib.preprocess import preprocess

    case = json.loads(args.worker)
    start = time.perf_counter()
    predictor = Predictor(case["bundle"], device=args.device, mc_samples=args.mc_samples, seed=0)
    dwi = read_volume(case["dwi"], role="DWI")
    adc = read_volume(case["adc"], role="ADC")
    flair = read_volume(case["flair"], role="FLAIR")
    prediction = predictor.predict(dwi, adc, flair, None)
    write_outputs(prediction, Path(case["out"]), dwi=dwi, bundle=predictor.bundle.describe(), inputs={})
    files_to_outputs = time.perf_counter() - start

    # Deterministic pass against the MC pass on the same (already warm) process and input.
    pre = preprocess(dwi, adc, flair, grid=predictor.bundle.grid, normalization=predictor.bundle.normalization)
    deterministic = Predictor(predictor.bundle, device=args.device, mc_samples=1, deterministic=True)
    mc = Predictor(predictor.bundle, device=args.device, mc_samples=args.mc_samples, seed=0)
    times: dict[str, list[float]] = {"det": [], "mc": []}
    for _ in range(3):
        for key, runner in (("det", deterministic), ("mc", mc)):
            result = runner.predict_preprocessed(pre)
            times[key].append(result.timings["network_s"] + result.timings["sampling_s"])
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "files_to_outputs_s": files_to_outputs,
        "first_call_timings": prediction.timings,
        "network_deterministic_s": float(np.median(times["det"])),
        "network_mc_s": float(np.median(times["mc"])),
        "peak_rss_gb": rss_kb / 1024**2,
        "lesion_ml": prediction.volume_ml["mask"],
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mc-samples", type=int, default=20)
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    import torch

    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, torch {torch.__version__}"
    if args.device.startswith("cuda") and torch.cuda.is_available():
        machine += f", GPU {torch.cuda.get_device_name(0)}"
    print(f"machine: {machine}; device {args.device}; torch threads {args.threads}; {args.mc_samples} MC samples")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_case(folder)
        bundle = args.bundle or str(make_bundle(folder / "bundle"))
        results = []
        for repeat in range(args.repeats):
            case = {**{k: str(v) for k, v in paths.items()}, "bundle": bundle, "out": str(folder / f"out{repeat}")}
            done = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(case), "--device", args.device,
                 "--threads", str(args.threads), "--mc-samples", str(args.mc_samples)],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"repeat {repeat + 1}: " + json.dumps({k: round(v, 3) for k, v in results[-1].items()
                                                        if isinstance(v, float)}))
    def median(key: str) -> float:
        return float(np.median([r[key] for r in results]))

    ratio = median("network_mc_s") / median("network_deterministic_s")
    print(f"median files->outputs: {median('files_to_outputs_s'):.2f} s")
    print(f"median network deterministic: {median('network_deterministic_s'):.3f} s; "
          f"with {args.mc_samples} MC samples: {median('network_mc_s'):.3f} s; ratio {ratio:.2f}")
    print(f"median peak memory (maxrss): {median('peak_rss_gb'):.2f} GB")
    steps = results[0]["first_call_timings"]
    print("first repeat, step timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
