"""spotstart: serve your own LLMs on spot GPUs.

The public API is what ``__all__`` lists; everything else is internal.
"""

from spotstart.errors import SpotstartError
from spotstart.fetch import Concurrency, Disk, FetchConfig, FetchReport, Retry, fetch, fetch_async
from spotstart.weights.loader import LoadReport, load, load_async, load_into

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
