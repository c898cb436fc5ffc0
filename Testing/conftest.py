"""Shared pytest fixtures: paths to the repository and to the optional shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real data lives beside the checkout (never inside it); STROKEPREDICTOR_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("STROKEPREDICTOR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def soop_dir() -> Path:
    path = SHARED_DATA / "soop"
    if not (path / "participants.tsv").is_file():
        pytest.skip("SOOP lesion library not available (../shared/data/soop)")
    return path


@pytest.fixture(scope="session")
def isles_case_dir() -> Path:
    path = SHARED_DATA / "isles22_case0009" / "ISLES-2022"
    if not path.is_dir():
        pytest.skip("real ISLES 2022 validation case not available (../shared/data/isles22_case0009)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _limit_threads() -> None:
    """Keep tests polite on small shared machines."""
    try:
        import torch

        torch.set_num_threads(min(2, torch.get_num_threads()))
    except ImportError:  # pragma: no cover
        pass
