"""Start and supervise the inference server behind the guard, like a small init process: signals
go to it, its exit is reaped and reported as a shell would (128+N for signal N), the workers it
leaves in its process group are stopped, and orphans re-parented to the guard (as PID 1 or as
a child subreaper) are reaped. What to do about an exit is the DrainController's business."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

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
        """Reap the server; returns its raw returncode (-N for signal N). What it left in its
        process group is the caller's to stop (:func:`stop_group`), once readiness is off."""
        assert self._proc is not None
        return await self._proc.wait()


async def stop_group(pgid: int, grace_s: float = 1.0) -> int:
    """SIGTERM what is left of process group ``pgid`` (the server is gone: these are its
    workers), SIGKILL it after ``grace_s``. Returns how many signals found someone."""
    hits = 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return hits
        hits += 1
        if sig == signal.SIGTERM:
            log.warning("server exited leaving processes in its group %d: SIGTERM", pgid)
        else:
            log.warning("processes of group %d still there after %.1fs: SIGKILL", pgid, grace_s)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return hits
            await asyncio.sleep(0.05)
    return hits


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Linux: orphans of our descendants are re-parented to us (as to PID 1), so the guard
    can reap them. False where the call is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def zombie_children(parent: int, proc: str = "/proc") -> list[int]:
    """Pids of ``parent``'s children that have exited and wait to be reaped (Linux /proc)."""
    out: list[int] = []
    try:
        entries = os.listdir(proc)
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses; split after the last ')'
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 2 and fields[0] == b"Z" and int(fields[1]) == parent:
            out.append(int(entry))
    return out


class OrphanReaper:
    """Reaps exited children that nobody waits for: orphans re-parented to the guard. Children
    we started ourselves (``known()``: the server, hooks) are left to their own waiters, so
    their exit codes are not stolen."""

    def __init__(self, known: Callable[[], set[int]], interval_s: float = 0.5) -> None:
        self.known = known
        self.interval_s = interval_s
        self.reaped = 0

    def reap_once(self) -> int:
        n = 0
        for pid in zombie_children(os.getpid()):
            if pid in self.known():
                continue
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    n += 1
        self.reaped += n
        return n

    async def run(self) -> None:
        while True:
            self.reap_once()
            await asyncio.sleep(self.interval_s)
