"""Fetching objects to local disk at the link's limit: plan, transfer, verify, journal, cache."""

from spotstart.fetch.config import FetchConfig, FetchReport, FileResult
from spotstart.fetch.engine import fetch, fetch_async
from spotstart.fetch.scheduler import NullProgress, ProgressListener

__all__ = [
    "FetchConfig",
    "FetchReport",
    "FileResult",
    "NullProgress",
    "ProgressListener",
    "fetch",
    "fetch_async",
]
