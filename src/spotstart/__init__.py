"""spotstart: serve your own LLMs on spot GPUs.

The public API is what ``__all__`` lists; everything else is internal.

Every name is imported on first use (PEP 562), so ``import spotstart`` and ``spotstart
--version`` cost almost nothing: ``spotstart.fetch`` pulls aiohttp, ``spotstart.load`` torch,
and only the program that uses them pays for them.
"""

import sys as _sys
import types as _types
import typing as _typing

if _typing.TYPE_CHECKING:
    from spotstart.errors import SpotstartError
    from spotstart.fetch import (
        Concurrency,
        Disk,
        FetchConfig,
        FetchReport,
        Retry,
        fetch,
        fetch_async,
    )
    from spotstart.weights.loader import LoadReport, load, load_async, load_into
    from spotstart.weights.stream import aiter_tensors, iter_tensors

__version__ = "0.1.0"

# public name -> the module that defines it, imported when the name is first read
_HOME = {
    "Concurrency": "spotstart.fetch",
    "Disk": "spotstart.fetch",
    "FetchConfig": "spotstart.fetch",
    "FetchReport": "spotstart.fetch",
    "LoadReport": "spotstart.weights.loader",
    "Retry": "spotstart.fetch",
    "SpotstartError": "spotstart.errors",
    "aiter_tensors": "spotstart.weights.stream",
    "fetch": "spotstart.fetch",
    "fetch_async": "spotstart.fetch",
    "iter_tensors": "spotstart.weights.stream",
    "load": "spotstart.weights.loader",
    "load_async": "spotstart.weights.loader",
    "load_into": "spotstart.weights.loader",
}


def __getattr__(name: str) -> _typing.Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'spotstart' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(home), name)
    globals()[name] = value  # the next read is a plain attribute: no second import
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


class _Package(_types.ModuleType):
    """``spotstart.fetch`` is the function, though ``spotstart/fetch/`` is also a subpackage.

    Importing a submodule sets it as an attribute of its parent; when ``spotstart.fetch`` (the
    package) is first imported by anything but ``__getattr__`` above, that would make
    ``spotstart.fetch`` the module. The package stays reachable as ``sys.modules``'
    ``"spotstart.fetch"``, as it was before the imports were lazy.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _HOME and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

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
