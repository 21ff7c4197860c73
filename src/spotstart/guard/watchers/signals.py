"""SIGTERM watcher: Kubernetes (pod deletion, GKE/EKS/AKS node drain) and systemd stop a process
with SIGTERM, then SIGKILL after the grace period (``terminationGracePeriodSeconds``, default
30 s). Each signal becomes a TERMINATION notice due at received + grace."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from spotstart.guard.notice import NoticeKind, PreemptionNotice
from spotstart.guard.watchers._common import Clock

_Handler = Callable[[int, Any], Any] | int | signal.Handlers | None


@dataclass(frozen=True)
class SignalWatcherConfig:
    """``grace_s``: seconds from the signal to SIGKILL (the pod's terminationGracePeriodSeconds)."""

    grace_s: float = 30.0
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)

    def __post_init__(self) -> None:
        if self.grace_s < 0:
            raise ValueError("SignalWatcherConfig.grace_s must be >= 0")


class SignalWatcher:
    """Yields a notice per signal received while ``watch()`` is being iterated. Handlers are
    installed on the running loop when iteration starts (main thread only) and the previous
    handlers are restored when the generator is closed."""

    name = "signal"

    def __init__(self, config: SignalWatcherConfig | None = None, *, clock: Clock = time.monotonic):
        self.config = config or SignalWatcherConfig()
        self._clock = clock

    def notice_for(self, signum: int, received_at: float) -> PreemptionNotice:
        name = signal.Signals(signum).name
        deadline = received_at + self.config.grace_s
        detail = {"signal": name, "grace_s": f"{self.config.grace_s:g}"}
        return PreemptionNotice(NoticeKind.TERMINATION, "signal", received_at, deadline, detail)

    async def watch(self) -> AsyncGenerator[PreemptionNotice, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[PreemptionNotice] = asyncio.Queue()
        previous: dict[signal.Signals, _Handler] = {}

        def on_signal(signum: int) -> None:
            queue.put_nowait(self.notice_for(signum, self._clock()))

        try:
            for sig in self.config.signals:
                previous[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, on_signal, sig)
            while True:
                yield await queue.get()
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                # remove_signal_handler leaves SIG_DFL: put back what was there before us
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
