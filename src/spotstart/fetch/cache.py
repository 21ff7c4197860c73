"""The destination's index of completed files (``DEST/.spotstart/index.json``): which object
version each local file holds. A rerun whose object version, size and local file match copies
nothing. A file changed locally (size or mtime) is fetched again."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from spotstart import safefs
from spotstart.errors import LocalIOError
from spotstart.fetch.journal import STATE_MODE, local_error, record_mode
from spotstart.fetch.layout import STATE_DIR

INDEX_DIR = STATE_DIR

INDEX_NAME = "index.json"
INDEX_LOCK = "index.lock"  # held while a save merges into the index on disk


@dataclass(frozen=True)
class CacheEntry:
    """One finished file. ``chunk_bytes``, ``crc``, ``parts`` and ``crcs`` (hex, one per
    chunk of the plan they define) are what peers publish of it: a reader with the same plan
    checks each chunk from us on arrival."""

    source: str
    version: str
    size: int
    mtime_ns: int
    chunk_bytes: int = 0
    crc: str = ""
    parts: tuple[int, ...] = ()
    crcs: tuple[str, ...] = ()


class CacheIndex:
    """Loaded once per fetch; saved atomically after each completed file."""

    def __init__(self, dest: Path) -> None:
        self.path = dest / INDEX_DIR / INDEX_NAME
        self.entries: dict[str, CacheEntry] = {}
        self._lock = threading.Lock()  # files finish concurrently; saves run on threads
        self._saved_at = -1e9
        self.root = dest
        self._recorded: set[str] = set()  # entries this run wrote: they win over the disk's
        self.entries = _load_entries(dest)

    def reload(self) -> None:
        """Take in what other fetches into this DEST saved since (another runner finished a
        file whose lock we waited for); entries this run recorded stay ours."""
        disk = _load_entries(self.root)
        with self._lock:
            self.entries = {**disk, **{k: self.entries[k] for k in self._recorded}}

    def is_current(self, rel: str, source: str, version: str, size: int, local: Path) -> bool:
        entry = self.entries.get(rel)
        if entry is None or (entry.source, entry.version, entry.size) != (source, version, size):
            return False
        st = self._lstat(local)
        # A link at the name is not the file we wrote, nor a file another user owns (the
        # size and mtime of theirs are theirs to choose: utimensat); root's may be (a fetch
        # as root, then a rerun or load as the server's user).
        return (
            st is not None
            and stat.S_ISREG(st.st_mode)
            and st.st_uid in (os.geteuid(), 0)
            and (st.st_size, st.st_mtime_ns) == (size, entry.mtime_ns)
        )

    def _lstat(self, local: Path) -> os.stat_result | None:
        """``local``'s lstat, resolved beneath the root with no link in any component when
        it lies beneath the root (a directory swapped for a link since the file was renamed
        into place names no file of ours); None when there is none."""
        rel = os.path.relpath(local, self.root)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            try:
                return local.lstat()
            except OSError:
                return None
        return safefs.stat_beneath(self.root, rel)

    def record(
        self,
        rel: str,
        source: str,
        version: str,
        size: int,
        local: Path,
        chunks: tuple[int, str, tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> None:
        """``chunks``: (chunk_bytes, crc algorithm, parts, per-chunk CRCs in plan order)."""
        chunk_bytes, crc, parts, crcs = chunks or (0, "", (), ())
        st = self._lstat(local)
        if st is None:
            return  # its name no longer leads to it (a parent swapped): fetched again next run
        entry = CacheEntry(
            source,
            version,
            size,
            st.st_mtime_ns,
            chunk_bytes,
            crc,
            parts,
            tuple(f"{c:x}" for c in crcs),
        )
        with self._lock:
            self.entries[rel] = entry
            self._recorded.add(rel)

    def save(self, min_interval_s: float = 0.0) -> None:
        """Write the index atomically; skipped when the last save is younger than
        ``min_interval_s`` (the caller saves once more at the end)."""
        now = time.monotonic()
        with self._lock:
            if min_interval_s and now - self._saved_at < min_interval_s:
                return
            self._saved_at = now
            # Created O_EXCL in our own state directory, renamed within it: no link planted
            # there (or at DEST/.spotstart itself) is ever written through.
            dirfd = safefs.private_dir_fd(self.root, INDEX_DIR, STATE_MODE)
            tmp = f"{INDEX_NAME}.{os.getpid()}.tmp"
            lock = -1
            try:
                # Fetches into one DEST at once each save the index: read, merge and replace
                # it under a lock, or one runner's save drops the files another recorded.
                lock = safefs.open_beneath(
                    dirfd, INDEX_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                )
                if not stat.S_ISREG(os.fstat(lock).st_mode):
                    raise OSError(errno.ELOOP, "not a regular file", INDEX_LOCK)
                fcntl.flock(lock, fcntl.LOCK_EX)  # held for one read and one write
                try:
                    disk = _load_entries(self.root)
                except LocalIOError:
                    disk = {}
                self.entries = {**disk, **{k: self.entries[k] for k in self._recorded}}
                body = {
                    "version": 1,
                    "files": {k: asdict(v) for k, v in sorted(self.entries.items())},
                }
                text = json.dumps(body, indent=1).encode()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dirfd)  # a leftover of a killed run with our pid
                mode = record_mode(e.source for e in self.entries.values())
                fd = safefs.create_exclusive(dirfd, tmp, mode)
                with os.fdopen(fd, "wb") as f:
                    f.write(text)
                safefs.rename_beneath(dirfd, tmp, dirfd, INDEX_NAME)
            except OSError as exc:
                raise local_error(self.path, exc, "saving the index") from exc
            finally:
                if lock >= 0:
                    os.close(lock)
                os.close(dirfd)


def _load_entries(root: Path) -> dict[str, CacheEntry]:
    """The entries of the index saved in ``root``; none where there is none or it is not
    one we can read (a link where it goes: never read, and saving refuses it)."""
    try:
        raw = json.loads(_read_index(root))
        return {
            k: CacheEntry(
                **{**v, "parts": tuple(v.get("parts", ())), "crcs": tuple(v.get("crcs", ()))}
            )
            for k, v in raw.get("files", {}).items()
        }
    except (FileNotFoundError, json.JSONDecodeError, TypeError, ValueError, AttributeError):
        return {}
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        return {}


def _read_index(root: Path) -> bytes:
    """The index's bytes, from a state directory that only we (or root) can write: one
    another user made (DEST was theirs first) could name their own files as the ones we
    fetched, so it is refused (UnsafePath), as saving into it would be. Root's is read (a
    fetch as root, then a rerun or load as the server's user, all files current)."""
    dirfd = safefs.open_beneath(root, INDEX_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.fstat(dirfd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            safefs.check_private(dirfd, str(root / INDEX_DIR))
        fd = safefs.open_beneath(dirfd, INDEX_NAME)
    finally:
        os.close(dirfd)
    with os.fdopen(fd, "rb") as f:
        return f.read()
