"""spotstart: serve your own LLMs on spot GPUs.

The public API is what ``__all__`` lists; everything else is internal.
"""

import typing as _typing

from spotstart.errors import SpotstartError
from spotstart.fetch import Concurrency, Disk, FetchConfig, FetchReport, Retry, fetch, fetch_async

if _typing.TYPE_CHECKING:
    from spotstart.weights.loader import LoadReport, load, load_async, load_into
    from spotstart.weights.stream import aiter_tensors, iter_tensors

_LAZY = {"LoadReport", "load", "load_async", "load_into"}  # spotstart.weights, on first use
_LAZY_STREAM = {"aiter_tensors", "iter_tensors"}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        from spotstart.weights import loader

        return getattr(loader, name)
    if name in _LAZY_STREAM:
        from spotstart.weights import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'spotstart' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY | _LAZY_STREAM)


__all__ = [
    "Concurrency",
    "Disk",
    "FetchConfig",
    "FetchReport",
    "LoadReport",
    "Retry",
    "SpotstartError",
    "aiter_tensors",
    "fetch",
    "fetch_async",
    "iter_tensors",
    "load",
    "load_async",
    "load_into",
]
__version__ = "0.1.0"
