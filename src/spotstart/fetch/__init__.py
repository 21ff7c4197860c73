"""Fetching objects to local disk at the link's limit: plan, transfer, verify, journal, cache."""

from spotstart.fetch.config import FetchConfig, FetchReport, FileResult
from spotstart.fetch.engine import NullProgress, ProgressListener, fetch, fetch_async

__all__ = [
    "FetchConfig",
    "FetchReport",
    "FileResult",
    "NullProgress",
    "ProgressListener",
    "fetch",
    "fetch_async",
]
