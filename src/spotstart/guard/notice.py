"""What a preemption watcher reports: pure data shared by the watchers (guard/watchers/) and
the drain controller (guard/drain.py). No I/O here."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


class NoticeKind(enum.Enum):
    """What a notice says will happen to this VM (and the server on it).

    Removals, always drained: ``PREEMPTION`` (spot reclaim), ``TERMINATION`` (SIGTERM, pod
    deletion, GCE TERMINATE_ON_HOST_MAINTENANCE), ``RESTART`` (Azure Reboot/Redeploy: the VM
    comes back, the server does not survive). Early signals, where the VM keeps running and the
    server with it, only warned about unless ``--early-signals drain``: ``REBALANCE`` (AWS: a
    higher risk of interruption), ``MIGRATION`` (GCE live migration, Azure Freeze: a pause of
    seconds), ``MAINTENANCE`` (a GCE maintenance value not known to us)."""

    PREEMPTION = "preemption"
    TERMINATION = "termination"  # SIGTERM / Kubernetes pod deletion
    RESTART = "restart"
    REBALANCE = "rebalance"
    MIGRATION = "migration"
    MAINTENANCE = "maintenance"

    @property
    def is_early_signal(self) -> bool:
        return self in (NoticeKind.REBALANCE, NoticeKind.MIGRATION, NoticeKind.MAINTENANCE)


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
