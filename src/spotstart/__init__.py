"""spotstart: serve your own LLMs on spot GPUs.

The public API is what ``__all__`` lists; everything else is internal.
"""

from spotstart.errors import SpotstartError
from spotstart.fetch import FetchConfig, FetchReport, fetch, fetch_async

__all__ = ["FetchConfig", "FetchReport", "SpotstartError", "fetch", "fetch_async"]
__version__ = "0.1.0"
