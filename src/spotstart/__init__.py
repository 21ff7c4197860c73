"""spotstart: serve your own LLMs on spot GPUs.

The public API is what ``__all__`` lists; everything else is internal.
"""

import typing as _typing

from spotstart.errors import SpotstartError
from spotstart.fetch import Concurrency, Disk, FetchConfig, FetchReport, Retry, fetch, fetch_async

if _typing.TYPE_CHECKING:
    from spotstart.weights.loader import LoadReport, load, load_async, load_into

_LAZY = {"LoadReport", "load", "load_async", "load_into"}  # spotstart.weights, on first use


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        from spotstart.weights import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'spotstart' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)


__all__ = [
    "Concurrency",
    "Disk",
    "FetchConfig",
    "FetchReport",
    "LoadReport",
    "Retry",
    "SpotstartError",
    "fetch",
    "fetch_async",
    "load",
    "load_async",
    "load_into",
]
__version__ = "0.1.0"
