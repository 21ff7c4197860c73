"""One writer a destination file: two fetches into one DEST (two pods on one shared volume,
a plan and a fetch, a rerun started beside a run still going) take turns per file, as
huggingface_hub's downloads do. Each file's lock is ``DEST/.spotstart/parts/<hash>.lock``
(beside its part file and journal, in the state directory only we can write), held with
``flock(LOCK_EX)`` from before its part file is opened until it is renamed into place and the
cache index says so. The kernel drops a flock when its holder dies (kill -9, OOM, a node's
power): a lock never outlives its process, so nothing stale ever blocks a rerun.

Without it, two runners shared one part file and journal: the second removed the first's
part file and made its own, the first renamed the second's half-written file to the final
name (a reader saw an incomplete file), and the second's rename found nothing (exit 8).

The attacker: whoever can write DEST's parent or DEST itself (a shared volume) but not our
state directory (:func:`spotstart.safefs.private_dir_fd` refuses one others can write), so
no name there is planted; the lock file is still opened ``O_NOFOLLOW`` beneath it and must be
a regular file of ours. A lock file is removed by its holder while held, and a lock taken on
a name that was removed meanwhile is dropped and taken again on the name's new file (the
classic unlink race of lock files: two holders, one on the old inode, one on the new)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat
from pathlib import Path

from spotstart import safefs
from spotstart.errors import DestinationBusy, LocalIOError
from spotstart.fetch.journal import STATE_MODE, local_error
from spotstart.fetch.layout import LOCK_SUFFIX, work_paths


class FileLock:
    """The exclusive lock of the file that lands at ``dest/rel``: :meth:`try_acquire`, then
    :meth:`release` (also on error). Not thread-safe: one event loop uses it."""

    def __init__(self, dest: Path, rel: str) -> None:
        self.dest = dest
        self.rel = rel
        part = work_paths(dest, rel)[0]
        self.path = part.with_name(part.name.removesuffix(".part") + LOCK_SUFFIX)
        self._state_rel = os.path.relpath(part.parent, dest)
        self._fd = -1
        self._dir = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it; True when held (now or already)."""
        if self._fd >= 0:
            return True
        try:
            if self._dir < 0:
                self._dir = safefs.private_dir_fd(self.dest, self._state_rel, STATE_MODE)
            for _ in range(64):  # each turn: the holder removed the name under us; rare
                fd = safefs.open_beneath(
                    self._dir,
                    self.path.name,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                    0o600,
                )
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                        raise LocalIOError(
                            f"{self.path}: not a regular file of ours where fetch keeps its "
                            "lock; remove it"
                        )
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        return False  # another process holds it (fd closed below)
                    # Still the file at the name? A holder removes it before letting go: a
                    # lock on the removed file guards nothing.
                    try:
                        now = os.stat(self.path.name, dir_fd=self._dir, follow_symlinks=False)
                    except FileNotFoundError:
                        now = None
                    if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                        self._fd, fd = fd, -1
                        return True
                finally:
                    if fd >= 0:
                        os.close(fd)
            raise LocalIOError(f"{self.path}: its lock file keeps being replaced; rerun")
        except OSError as exc:
            self._close_dir()
            raise local_error(self.path, exc, "taking the file's lock") from exc
        except LocalIOError:
            self._close_dir()
            raise

    async def acquire(self, poll_s: float = 0.05, max_poll_s: float = 0.5) -> None:
        """Wait for the lock: polled (a cancelled wait leaves no thread blocked in flock
        that would take the lock later), ``poll_s`` growing to ``max_poll_s``."""
        delay = poll_s
        while not self.try_acquire():
            await asyncio.sleep(delay)
            delay = min(max_poll_s, delay * 2)

    def release(self) -> None:
        """Remove the lock file (while still holding it), then let go."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                st = os.fstat(self._fd)
                now = os.stat(self.path.name, dir_fd=self._dir, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(self.path.name, dir_fd=self._dir)
            os.close(self._fd)  # the flock goes with the last descriptor of it
            self._fd = -1
        self._close_dir()

    def _close_dir(self) -> None:
        if self._dir >= 0:
            with contextlib.suppress(OSError):
                os.close(self._dir)
            self._dir = -1


def busy(locks: list[FileLock], dest: Path) -> DestinationBusy:
    """The error of a fetch that would wait (``--no-wait``) for these files' locks."""
    names = ", ".join(lock.rel for lock in locks[:3])
    more = f" (and {len(locks) - 3} more)" if len(locks) > 3 else ""
    return DestinationBusy(
        f"{dest}: another fetch is writing {names}{more}; nothing of it was touched. Rerun "
        "once it is done, or without --no-wait to wait for it"
    )


__all__ = ["DestinationBusy", "FileLock", "busy"]
