"""The metadata emulators the guard's tests poll: one per cloud, per test, on a fixed wall
clock (``W``) so notice deadlines are exact."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from spotstart.emulate.metadata import MetadataEmulator

W = 1_800_000_000.0  # a fixed wall clock of the emulated cloud: 2027-01-15T08:00:00Z


@pytest.fixture
def gce() -> Iterator[MetadataEmulator]:
    with MetadataEmulator("gce") as emu:
        yield emu


@pytest.fixture
def aws() -> Iterator[MetadataEmulator]:
    with MetadataEmulator("aws", wall_clock=lambda: W) as emu:
        yield emu


@pytest.fixture
def azure() -> Iterator[MetadataEmulator]:
    with MetadataEmulator("azure", wall_clock=lambda: W) as emu:
        yield emu
