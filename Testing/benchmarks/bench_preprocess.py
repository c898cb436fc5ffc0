"""Benchmark: preprocessing of an ISLES-sized case (files in -> network-ready tensors).

Case: DWI and ADC 112x112x73 at 2 mm, FLAIR 512x512x29 at 0.45x0.45x5 mm with a rigid offset
(analytic phantom, written as float64 NIfTI like ISLES 2022), plus the real ISLES 2022 case
when ../shared/data/isles22_case0009 is present. Includes reading the files, FLAIR
registration, brain mask, normalisation and resampling to the model grid. Target: at most 3 s
median on 2 CPU cores.

    python Testing/benchmarks/bench_preprocess.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from phantoms import ADC_1E3, DWI_INTENSITY, FLAIR_INTENSITY, centered_geometry, rotation_direction, sample  # noqa: E402

from StrokePredictorLib.io import discover_isles, write_volume  # noqa: E402
from StrokePredictorLib.preprocess import ModelGrid, preprocess_files  # noqa: E402


def _write_phantom(folder: Path) -> tuple[Path, Path, Path]:
    dwi_geometry = centered_geometry((112, 112, 73), (2.0, 2.0, 2.0), rotation_direction((4, -3, 2)))
    flair_geometry = centered_geometry((512, 512, 29), (0.45, 0.45, 5.0), shift=(2.0, -3.0, 4.0))
    offset = sitk.Euler3DTransform((0, 0, 0), 0.04, -0.03, 0.05, (3.0, -2.0, 4.0))
    rng = np.random.default_rng(0)
    dwi = sample(dwi_geometry, DWI_INTENSITY, smooth_mm=1.5, rng=rng, noise=3.0).astype(np.float64)
    adc = sample(dwi_geometry, ADC_1E3, smooth_mm=1.5).astype(np.float64)
    flair = sample(flair_geometry, FLAIR_INTENSITY, transform=offset.GetInverse(), rng=rng, noise=3.0)
    paths = (folder / "dwi.nii.gz", folder / "adc.nii.gz", folder / "flair.nii.gz")
    for array, geometry, path in ((dwi, dwi_geometry, paths[0]), (adc, dwi_geometry, paths[1]),
                                  (flair.astype(np.float64), flair_geometry, paths[2])):
        write_volume(array, geometry, path)
    return paths


def _time(paths: tuple[Path, Path, Path], repeats: int, grid: ModelGrid) -> list[float]:
    preprocess_files(*map(str, paths), grid=grid)  # warm-up (imports, caches)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        preprocess_files(*map(str, paths), grid=grid)
        timings.append(time.perf_counter() - start)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    grid = ModelGrid((96, 112, 80), (2.0, 2.0, 2.0))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}, SimpleITK {sitk.Version.VersionString()}")
    with tempfile.TemporaryDirectory() as folder:
        timings = _time(_write_phantom(Path(folder)), args.repeats, grid)
    print(f"phantom ISLES-sized case: median {statistics.median(timings):.2f} s "
          f"(min {min(timings):.2f}, max {max(timings):.2f}, n={len(timings)}); target <= 3 s")
    real = HERE.parents[2] / "shared" / "data" / "isles22_case0009" / "ISLES-2022"
    if real.is_dir():
        (case,) = discover_isles(real)
        timings = _time((case.dwi, case.adc, case.flair), args.repeats, grid)
        print(f"real ISLES 2022 case {case.case_id}: median {statistics.median(timings):.2f} s "
              f"(min {min(timings):.2f}, max {max(timings):.2f}, n={len(timings)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
