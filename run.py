#!/usr/bin/env python3
"""The two README commands: ``python3 run.py demo`` and ``python3 run.py test``.

Each creates (or reuses) a virtual environment in ``.venv`` with everything it needs
(torch pinned to the CPU build 2.13.0), then runs:

* ``demo``: the main job on the bundled defaults (sample case -> prediction -> files + PNG);
* ``test``: the whole pytest suite (extra arguments are passed to pytest).

Only the Python standard library is used here, so it runs on a fresh machine.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIREMENTS = ROOT / "requirements-dev.txt"


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in (ROOT / "requirements.txt", REQUIREMENTS, ROOT / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_environment() -> Path:
    """Create .venv and install the requirements unless it is already up to date."""
    if sys.version_info < (3, 10):  # noqa: UP036 - run.py must explain itself on old Pythons
        sys.exit(f"Python 3.10 or newer is needed; this is {sys.version.split()[0]}.")
    stamp = VENV / ".installed"
    if stamp.is_file() and stamp.read_text() == _fingerprint() and _python().is_file():
        return _python()
    print(f"Setting up the virtual environment in {VENV} (first run only, about a minute)...", flush=True)
    if not _python().is_file():
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    pip = [str(_python()), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip", "setuptools", "wheel"], check=True)
    subprocess.run([*pip, "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True)
    stamp.write_text(_fingerprint())
    return _python()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    python = str(ensure_environment())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if argv[0] == "test":
        command = [python, "-m", "pytest", "-q", *argv[1:]]
    else:
        command = [python, "-m", "Training", "demo", *argv[1:]]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
