"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the project (real slides, ISBI 2014, Herlev); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_slides(shared_data: Path) -> Path:
    """``../shared/data/slides``: small real vendor slides and deliberately broken files."""
    path = shared_data / "slides"
    if not path.is_dir():
        pytest.skip("../shared/data/slides is not present")
    return path
