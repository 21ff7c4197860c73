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
from dataclasses import dataclass
from pathlib import Path

from spotstart.errors import DiskFull, LocalIOError
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
    return LocalIOError(f"{path}: {exc.strerror or exc} while {doing}")


class PartFile:
    """A destination file in progress. ``work``: its (part file, journal) paths; by default
    those of ``final`` in the state directory of its own directory."""

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
        self.header = header
        self.fsync = fsync
        self.fd = -1
        self._journal: int = -1
        self._direct = -1 if direct_io else -2  # O_DIRECT descriptor, opened on first use; -2: none
        self._refused = -1  # a direct descriptor writes were refused through, closed later
        self.done: dict[int, int] = {}  # chunk index -> crc32c, durable
        self._intact_bytes = 0  # journal length up to its last complete line

    def open(self) -> dict[int, int]:
        """Open (resuming when the journal matches) and preallocate. Returns finished chunks."""
        resumed = False
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.part.parent.mkdir(parents=True, exist_ok=True)
            resumed = self._load_journal()
            if not resumed:
                for p in (self.part, self.journal_path):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
            self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
            if not resumed:
                self._preallocate()
                self._journal = os.open(
                    self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644
                )
                head = self.header.to_json() + "\n"
                os.write(self._journal, head.encode())
            else:
                self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
                # Drop a line torn by a crash: appending after it would splice the next
                # record onto the fragment ("1" + "5 0badf00d" reads as chunk 15).
                os.ftruncate(self._journal, self._intact_bytes)
        except OSError as exc:
            # A fresh part file that could not be set up (ENOSPC while preallocating) must
            # not stay behind: a rerun would take it for reserved space.
            if resumed:
                self.close()
            else:
                self.discard()
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
            raw = self.journal_path.read_bytes()
            part_size = self.part.stat().st_size
        except FileNotFoundError:
            return False
        header, done, self._intact_bytes = read_journal(raw)
        if header != self.header or part_size != self.header.size:
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
        """Durable data, atomic rename to the final name, journal removed."""
        try:
            if self.fsync:
                os.fsync(self.fd)
            os.replace(self.part, self.final)
            if self.fsync:
                dfd = os.open(self.final.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            raise local_error(self.final, exc, "finishing the file") from exc
        finally:
            self.close()
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()

    def discard(self) -> None:
        """Remove every trace (integrity failure, disk full): nothing half-done remains."""
        self.close()
        for p in (self.part, self.journal_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def direct_fd(self) -> int | None:
        """A second descriptor on the part file that bypasses the page cache (``O_DIRECT``),
        or None where the platform or the filesystem has none (tmpfs, many FUSE mounts) or a
        write through it was refused. Opened on the event loop, never from reader threads."""
        flag = getattr(os, "O_DIRECT", 0)
        if self._direct == -1 and self.fd >= 0:
            try:
                self._direct = os.open(self.part, os.O_WRONLY | flag) if flag else -2
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
        for fd in (self.fd, self._journal, self._direct, self._refused):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self._journal = self._refused = -1
        if self._direct >= 0:
            self._direct = -1
