"""Fetching objects to local disk at the link's limit: plan, transfer, verify, journal, cache."""

from spotstart.fetch.config import Concurrency, Disk, FetchConfig, FetchReport, FileResult, Retry
from spotstart.fetch.engine import fetch, fetch_async
from spotstart.fetch.scheduler import NullProgress, ProgressListener

__all__ = [
    "Concurrency",
    "Disk",
    "FetchConfig",
    "FetchReport",
    "FileResult",
    "NullProgress",
    "ProgressListener",
    "Retry",
    "fetch",
    "fetch_async",
]
