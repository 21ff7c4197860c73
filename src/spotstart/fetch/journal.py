"""The on-disk state of one file in progress: a preallocated part file written at offsets, and a
journal of finished chunks with their CRC-32C, both in DEST's own state directory
(``DEST/.spotstart/parts/``, see layout.py) where no object name reaches. A chunk enters
the journal only after its bytes were written (and, with fsync on, made durable), so a rerun
after kill -9 or power loss resumes from it and never trusts bytes that were not written.
The final name appears only by atomic rename after verification."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from spotstart import safefs
from spotstart.errors import DiskFull, LocalIOError, UnsafePath
from spotstart.fetch.layout import work_paths


@dataclass(frozen=True)
class JournalHeader:
    """Identifies what a part file holds; a mismatch means start over."""

    source: str
    size: int
    version: str
    chunk_bytes: int
    crc: str = "crc32c"  # the algorithm of the chunk CRCs it lists
    parts: tuple[int, ...] = ()  # multipart sizes: chunks never straddle a part

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "parts": list(self.parts)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JournalHeader | None:
        """The header a journal's first line records, or None for one that is not ours."""
        try:
            raw = json.loads(text)
            header = cls(
                source=str(raw["source"]),
                size=int(raw["size"]),
                version=str(raw["version"]),
                chunk_bytes=int(raw["chunk_bytes"]),
                crc=str(raw.get("crc", "crc32c")),
                parts=tuple(int(p) for p in raw.get("parts", ())),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None
        if header.size < 0 or header.chunk_bytes <= 0 or any(p <= 0 for p in header.parts):
            return None
        return header


def read_journal(raw: bytes) -> tuple[JournalHeader | None, dict[int, int], int]:
    """Parse a journal: its header (None if unreadable), the finished chunks {index: crc},
    and the length up to its last complete line (a crash may tear the last one)."""
    intact = raw.rfind(b"\n") + 1
    try:
        lines = raw[:intact].decode().splitlines()
    except UnicodeDecodeError:
        return None, {}, intact
    if not lines:
        return None, {}, intact
    header = JournalHeader.from_json(lines[0])
    width = 16 if header is not None and header.crc == "crc64nvme" else 8  # "%08x" of a CRC
    done: dict[int, int] = {}
    for line in lines[1:]:
        fields = line.split()
        if len(fields) != 2 or len(fields[1]) != width:
            continue  # not a line we wrote: that chunk is simply fetched again
        try:
            done[int(fields[0])] = int(fields[1], 16)
        except ValueError:
            continue
    return header, done, intact


def local_error(path: Path | str, exc: OSError, doing: str) -> LocalIOError:
    """Translate an OSError on the destination into ours, naming the path and the fix."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            f"{path}: no space left on device while {doing}; free space and rerun "
            "(finished chunks are kept only when the file system still has room)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LocalIOError(f"{path}: cannot write ({os.strerror(exc.errno)}) while {doing}")
    if exc.errno == errno.ENAMETOOLONG:
        return LocalIOError(f"{path}: name too long for this file system while {doing}")
    if exc.errno in (errno.ELOOP, errno.EXDEV):
        return UnsafePath(
            f"{path}: a symlink in the path while {doing}; spotstart follows no link beneath "
            "DEST (remove it)"
        )
    return LocalIOError(f"{path}: {exc.strerror or exc} while {doing}")


# DEST/.spotstart and its parts directory: writable by us alone (a name planted there by
# someone else would be a link we write through), readable by all, as the files in DEST are,
# so a serve-peers under another uid can serve parts in progress.
STATE_MODE = 0o755


def record_mode(sources: Iterable[str]) -> int:
    """The mode of a state file (journal, cache index) naming ``sources``: readable by all, as
    the files in DEST are, unless a URL carries a query string, which may be a credential
    (a presigned S3/GCS URL, an Azure SAS): then ours alone (a serve-peers under another uid
    then cannot serve it; one under ours can)."""
    return 0o600 if any("?" in s for s in sources) else 0o644


class PartFile:
    """A destination file in progress. ``work``: its (part file, journal) paths; by default
    those of ``final`` in the state directory of its own directory.

    Every name is opened beneath ``root`` (the deepest directory ``final`` and ``work``
    share: DEST for fetch) with no symlink followed (:mod:`spotstart.safefs`): the part file
    and journal are created ``O_EXCL`` in a state directory only we can write, and the final
    rename goes from that directory's fd to the final directory's fd."""

    def __init__(
        self,
        final: Path,
        header: JournalHeader,
        *,
        fsync: bool,
        work: tuple[Path, Path] | None = None,
        direct_io: bool = True,
    ) -> None:
        self.final = final
        self.part, self.journal_path = work or work_paths(final.parent, final.name)
        if self.part.parent != self.journal_path.parent:
            raise ValueError("the part file and its journal share one directory")
        self.root = Path(os.path.commonpath([final, self.part, self.journal_path]))
        self._final_dir_rel = os.path.relpath(final.parent, self.root)
        self._work_rel = os.path.relpath(self.part.parent, self.root)
        self.header = header
        self.fsync = fsync
        self.fd = -1
        self._journal: int = -1
        self._direct = -1 if direct_io else -2  # O_DIRECT descriptor, opened on first use; -2: none
        self._refused = -1  # a direct descriptor writes were refused through, closed later
        self._dir = -1  # the state directory holding the part file and journal
        self._final_dir = -1  # the directory the file is renamed into
        self.done: dict[int, int] = {}  # chunk index -> crc32c, durable
        self._intact_bytes = 0  # journal length up to its last complete line

    def open(self) -> dict[int, int]:
        """Open (resuming when the journal matches) and preallocate. Returns finished chunks."""
        resumed = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)  # the caller's own: may be a link
            self._final_dir = _open_dir(self.root, self._final_dir_rel)
        except OSError as exc:
            raise local_error(self.final.parent, exc, "creating its directory") from exc
        try:
            self._dir = safefs.private_dir_fd(self.root, self._work_rel, STATE_MODE)
            resumed = self._load_journal()
            if not resumed:
                for p in (self.part, self.journal_path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p.name, dir_fd=self._dir)
                self.fd = safefs.create_exclusive(self._dir, self.part.name, 0o644, os.O_RDWR)
                self._preallocate()
                self._journal = safefs.create_exclusive(
                    self._dir, self.journal_path.name, record_mode([self.header.source])
                )
                head = self.header.to_json() + "\n"
                os.write(self._journal, head.encode())
            else:
                self.fd = safefs.open_beneath(self._dir, self.part.name, os.O_RDWR)
                self._journal = safefs.open_beneath(
                    self._dir, self.journal_path.name, os.O_WRONLY | os.O_APPEND
                )
                # Drop a line torn by a crash: appending after it would splice the next
                # record onto the fragment ("1" + "5 0badf00d" reads as chunk 15).
                os.ftruncate(self._journal, self._intact_bytes)
        except (OSError, LocalIOError) as exc:
            # A fresh part file that could not be set up (ENOSPC while preallocating) must
            # not stay behind: a rerun would take it for reserved space.
            if resumed:
                self.close()
            else:
                self.discard()
            if isinstance(exc, LocalIOError):
                raise
            raise local_error(self.part, exc, "creating the part file") from exc
        return dict(self.done)

    def _preallocate(self) -> None:
        size = self.header.size
        if size == 0:
            return
        try:
            # Reserve every block now: a full disk fails here, before any byte is fetched.
            os.posix_fallocate(self.fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                os.ftruncate(self.fd, size)
            else:
                raise

    def _load_journal(self) -> bool:
        try:
            fd = safefs.open_beneath(self._dir, self.journal_path.name, os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                journal = os.fstat(fd)
                raw = f.read() if _made_by_us(journal) else b""
            part = os.stat(self.part.name, dir_fd=self._dir, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return False  # a link in our own directory: never followed, made afresh
            raise
        # A resume writes into the part file and truncates and appends to the journal: only
        # files we made (ours, one link each) take those writes; a hard link to a file
        # elsewhere is replaced, never written to.
        if not (raw and _made_by_us(journal) and _made_by_us(part)):
            return False
        header, done, self._intact_bytes = read_journal(raw)
        if header != self.header or part.st_size != self.header.size:
            return False
        self.done.update(done)
        return True

    def commit(self, chunks: dict[int, int]) -> None:
        """Make written chunks durable, then record them (group commit)."""
        if not chunks:
            return
        try:
            if self.fsync:
                os.fdatasync(self.fd)
            os.write(self._journal, "".join(f"{i} {c:08x}\n" for i, c in chunks.items()).encode())
            if self.fsync:
                os.fsync(self._journal)
        except OSError as exc:
            raise local_error(self.part, exc, "recording progress") from exc
        self.done.update(chunks)

    def finish(self) -> None:
        """Durable data, atomic rename to the final name, journal removed. The rename is
        between the two directories held open since :meth:`open`: a name swapped for a link
        since cannot redirect it, and a link at the final name is replaced, not followed."""
        try:
            if self.fsync:
                os.fsync(self.fd)
            safefs.rename_beneath(self._dir, self.part.name, self._final_dir, self.final.name)
            if self.fsync:
                os.fsync(self._final_dir)
        except OSError as exc:
            self.close()
            raise local_error(self.final, exc, "finishing the file") from exc
        with contextlib.suppress(OSError):
            os.unlink(self.journal_path.name, dir_fd=self._dir)
        self.close()

    def discard(self) -> None:
        """Remove every trace (integrity failure, disk full): nothing half-done remains."""
        self._close_files()
        dirfd = self._dir
        if dirfd < 0:  # never opened: remove what an earlier run left, if it is ours
            with contextlib.suppress(OSError):
                dirfd = safefs.open_beneath(self.root, self._work_rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for p in (self.part, self.journal_path):
                with contextlib.suppress(FileNotFoundError):
                    if dirfd >= 0:
                        os.unlink(p.name, dir_fd=dirfd)
        finally:
            if dirfd >= 0 and dirfd != self._dir:
                os.close(dirfd)
            self._close_dirs()

    def direct_fd(self) -> int | None:
        """A second descriptor on the part file that bypasses the page cache (``O_DIRECT``),
        or None where the platform or the filesystem has none (tmpfs, many FUSE mounts) or a
        write through it was refused. Opened on the event loop, never from reader threads."""
        flag = getattr(os, "O_DIRECT", 0)
        if self._direct == -1 and self.fd >= 0:
            try:
                self._direct = (
                    safefs.open_beneath(self._dir, self.part.name, os.O_WRONLY | flag)
                    if flag
                    else -2
                )
            except OSError:
                self._direct = -2
        return self._direct if self._direct >= 0 else None

    def refuse_direct(self) -> None:
        """Writes through :meth:`direct_fd` failed with EINVAL (an alignment the device
        needs beyond ours): write through the page cache from now on. The descriptor stays
        open until :meth:`close` (other threads may be writing through it)."""
        if self._direct >= 0:
            self._refused = self._direct
        self._direct = -2

    def close(self) -> None:
        self._close_files()
        self._close_dirs()

    def _close_files(self) -> None:
        for fd in (self.fd, self._journal, self._direct, self._refused):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self._journal = self._refused = -1
        if self._direct >= 0:
            self._direct = -1

    def _close_dirs(self) -> None:
        for fd in (self._dir, self._final_dir):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._dir = self._final_dir = -1


def _made_by_us(st: os.stat_result) -> bool:
    """A regular file of ours with one link: one we created, not a hard link to another."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def _open_dir(root: Path, rel: str) -> int:
    """An O_RDONLY fd of ``root/rel``, missing levels made, no link beneath ``root`` followed
    (``root`` itself, the user's DEST, may be one)."""
    if rel == ".":
        return safefs.open_root_dir(root)
    return safefs.makedirs_beneath(root, rel)
