"""The contract with the Lib's prediction command line (``python -m StrokePredictorLib.predict``):
building its arguments and parsing its output lines (``PROGRESS <fraction> <message>``,
``RESULT <summary.json>``, ``error: <message>``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class OutputLine:
    """One parsed line of the prediction command's output.

    Attributes:
        kind: ``progress``, ``result``, ``error`` or ``log``.
        fraction: progress in [0, 1] (``progress`` lines only).
        text: the message, the summary path (``result``) or the raw line (``log``).
    """

    kind: str
    text: str
    fraction: float | None = None


def parse_line(line: str) -> OutputLine:
    """Parse one output line of the prediction command."""
    stripped = line.strip()
    if stripped.startswith("PROGRESS "):
        parts = stripped.split(" ", 2)
        try:
            fraction = min(max(float(parts[1]), 0.0), 1.0)
        except (IndexError, ValueError):
            return OutputLine("log", line)
        return OutputLine("progress", parts[2] if len(parts) > 2 else "", fraction)
    if stripped.startswith("RESULT "):
        return OutputLine("result", stripped[len("RESULT "):].strip())
    if stripped.startswith("error: "):
        return OutputLine("error", stripped[len("error: "):].strip())
    return OutputLine("log", line)


def build_arguments(
    python: str,
    *,
    dwi: Path,
    adc: Path,
    flair: Path | None,
    clinical: Path | None,
    bundle: Path,
    out: Path,
    mc_samples: int,
    seed: int,
    device: str,
    threshold: float | None = None,
    what_if: list[str] | None = None,
    effects: bool = True,
) -> list[str]:
    """The command line that runs one prediction (contract 4); ``threshold`` None: the bundle's;
    ``what_if`` (``["treatment=none,thrombectomy"]``) adds clinical scenarios; ``effects`` False
    skips measuring each feature's effect."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    args = [python, "-m", "StrokePredictorLib.predict", "--dwi", os.fspath(dwi), "--adc", os.fspath(adc)]
    if flair is not None:
        args += ["--flair", os.fspath(flair)]
    if clinical is not None:
        args += ["--clinical", os.fspath(clinical)]
    args += [
        "--bundle", os.fspath(bundle), "--out", os.fspath(out), "--mc-samples", str(int(mc_samples)),
        "--seed", str(int(seed)), "--device", device,
    ]
    if threshold is not None:
        args += ["--threshold", f"{float(threshold):g}"]
    if what_if:
        args += ["--what-if", *what_if]
    args.append("--effects" if effects else "--no-effects")  # explicit: the CLI's default is off
    return args
