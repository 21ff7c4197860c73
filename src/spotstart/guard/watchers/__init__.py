"""Preemption notice watchers, one per cloud plus SIGTERM, all yielding
:class:`~spotstart.guard.notice.PreemptionNotice` on an injected monotonic clock. They only
observe and report; what to do about a notice is the drain controller's business."""

from __future__ import annotations

from spotstart.guard.watchers._common import (
    Cloud,
    Faults,
    PollConfig,
    resolve_metadata_url,
    supervise,
    watch_all,
)
from spotstart.guard.watchers.aws import AwsWatcher, AwsWatcherConfig
from spotstart.guard.watchers.azure import AzureWatcher, AzureWatcherConfig
from spotstart.guard.watchers.detect import detect_cloud, make_watchers
from spotstart.guard.watchers.gce import GceWatcher, GceWatcherConfig
from spotstart.guard.watchers.signals import SignalWatcher, SignalWatcherConfig

__all__ = [
    "AwsWatcher",
    "AwsWatcherConfig",
    "AzureWatcher",
    "AzureWatcherConfig",
    "Cloud",
    "Faults",
    "GceWatcher",
    "GceWatcherConfig",
    "PollConfig",
    "SignalWatcher",
    "SignalWatcherConfig",
    "detect_cloud",
    "make_watchers",
    "resolve_metadata_url",
    "supervise",
    "watch_all",
]
