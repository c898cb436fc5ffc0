"""Benchmark of ``python -m Training generate``: cases per second.

Usage (from the repository root)::

    PYTHONPATH=. python Testing/benchmarks/bench_generate.py --cases 8 --workers 2 [--mode physical] [--lesions DIR]

Prints one line: cases, workers, mode, seconds, cases/s, and the equivalent command. The
template is loaded before timing starts (it is cached once per process and shared by forked
workers), so the figure is the steady-state generation rate including writing the files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from Training.synthesis.anatomy import load_template
from Training.synthesis.generate import GenerateConfig, generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mode", default="physical")
    parser.add_argument("--lesions", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    load_template(2)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench"
        config = GenerateConfig(out=out, cases=args.cases, seed=args.seed, workers=args.workers, mode=args.mode,
                                lesions=None if args.lesions is None else Path(args.lesions))
        start = time.perf_counter()
        generate(config, progress=False)
        seconds = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    lesions = f" --lesions {args.lesions}" if args.lesions else ""
    sys.stdout.write(
        f"cases={args.cases} workers={args.workers} mode={args.mode} seconds={seconds:.1f} "
        f"cases_per_s={args.cases / seconds:.2f} size_mb={size_mb:.0f}\n"
        f"command: python -m Training generate --out DIR --cases {args.cases} --seed {args.seed} "
        f"--workers {args.workers} --mode {args.mode}{lesions}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
