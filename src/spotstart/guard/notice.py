"""What a preemption watcher reports: pure data shared by the watchers (guard/watchers/) and
the drain controller (guard/drain.py). No I/O here."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


class NoticeKind(enum.Enum):
    """``PREEMPTION`` and ``TERMINATION`` take the node away at ``deadline``; the others are
    early signals (AWS rebalance recommendation, GCE maintenance event) that a policy may
    treat as a drain or only as a warning."""

    PREEMPTION = "preemption"
    TERMINATION = "termination"  # SIGTERM / Kubernetes pod deletion
    REBALANCE = "rebalance"
    MAINTENANCE = "maintenance"

    @property
    def is_early_signal(self) -> bool:
        return self in (NoticeKind.REBALANCE, NoticeKind.MAINTENANCE)


@dataclass(frozen=True)
class PreemptionNotice:
    """One notice. ``deadline`` and ``received_at`` are seconds on the guard's monotonic clock
    (the clock every watcher is given), so deadlines compare without wall-clock skew.
    ``source`` names the watcher ("gce", "aws", "azure", "signal"); ``detail`` keeps the raw
    fields the cloud sent (action, event id, NotBefore...) for logs and hooks."""

    kind: NoticeKind
    source: str
    received_at: float
    deadline: float
    detail: dict[str, str] = field(default_factory=dict)

    @property
    def window_s(self) -> float:
        return self.deadline - self.received_at


class NoticeWatcher(Protocol):
    """Yields notices as they arrive; one implementation per cloud plus SIGTERM."""

    name: str

    def watch(self) -> AsyncIterator[PreemptionNotice]: ...
