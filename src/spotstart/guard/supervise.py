"""Start and supervise the inference server behind the guard, like a small init process: signals
go to it, its exit is reaped and reported as a shell would (128+N for signal N). What to do
about an exit is the DrainController's business, not this module's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence

from spotstart.errors import UsageError

log = logging.getLogger("spotstart.guard")


def exit_status(returncode: int) -> int:
    """asyncio's returncode (-N for signal N) as a shell reports it (128+N)."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (exit code {exit_status(returncode)})"
    return f"exit code {returncode}"


class Supervisor:
    """One child process in a session of its own (so a terminal's Ctrl-C reaches it only through
    the guard, and SIGKILL can take its worker processes too)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if not argv:
            raise ValueError("Supervisor needs a command")
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, start_new_session=True
            )
        except OSError as exc:
            raise UsageError(
                f"server command {self.argv[0]!r} cannot be started: {exc.strerror or exc}; "
                "check the command after '--'"
            ) from exc
        log.info("started server pid %d: %s", self._proc.pid, " ".join(self.argv))

    def send(self, sig: int) -> None:
        """Deliver ``sig`` to the server (not to its process group: the server propagates it)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the server's whole process group (its workers too)."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    async def wait(self) -> int:
        """Reap the server; returns its raw returncode (-N for signal N)."""
        assert self._proc is not None
        return await self._proc.wait()
