"""Local clouds for tests, benchmarks and `spotstart demo`: real S3/GCS servers behind a link.

Not for production traffic: loopback only, no auth beyond what the servers fake.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spotstart.emulate.link import FaultRule, LinkConfig
from spotstart.emulate.proxy import LinkEmulator, TcpProxy
from spotstart.emulate.servers import EmulatorError

if TYPE_CHECKING:
    from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions

__all__ = [
    "EmulatorError",
    "FaultRule",
    "LinkConfig",
    "LinkEmulator",
    "StorageEmulator",
    "StorageEmulatorOptions",
    "TcpProxy",
]


def __getattr__(name: str) -> Any:
    # lazy, so `python -m spotstart.emulate.storage` does not import its own module twice
    if name in ("StorageEmulator", "StorageEmulatorOptions"):
        from spotstart.emulate import storage

        return getattr(storage, name)
    raise AttributeError(f"module 'spotstart.emulate' has no attribute {name!r}")
