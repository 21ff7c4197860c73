"""Fixtures for fleet tests: the shared spot traces, found next to the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

TRACES_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "spot-traces"


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    if not TRACES_DIR.is_dir():
        pytest.skip(f"spot traces not found at {TRACES_DIR.resolve()} (../shared/data/spot-traces)")
    return TRACES_DIR.resolve()
