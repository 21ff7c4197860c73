"""Where one object's bytes land. The scheduler only knows this protocol: a local file
(``DiskTarget``: part file, journal, atomic rename) for ``fetch``, tensors in memory for
``load`` (spotstart.weights), or both at once for a write-through cache."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from pathlib import Path
from typing import Protocol

from spotstart.fetch.journal import JournalHeader, PartFile
from spotstart.fetch.writer import DiskWriter


class FileTarget(Protocol):
    """Receives the chunks of one object, in any order, and commits it when verified."""

    def open(self) -> dict[int, int]:
        """Prepare; return {chunk index: crc32c} of chunks already held (resume)."""
        ...

    @property
    def is_open(self) -> bool: ...

    async def write(self, offset: int, pieces: list[bytes]) -> asyncio.Future[None]:
        """Store consecutive ``pieces`` at object offset ``offset``; the future completes
        when they are stored. Awaiting the call itself is the backpressure."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Bytes already stored (for MD5 verification)."""
        ...

    def stored_size(self) -> int: ...

    def commit(self, chunks: dict[int, int]) -> None:
        """Record finished chunks (journal) so a rerun can resume."""
        ...

    def finish(self) -> None:
        """The object is verified: publish it (rename, hand tensors over)."""
        ...

    def discard(self) -> None:
        """Remove every trace: the bytes must never be mistaken for the object."""
        ...

    def close(self) -> None:
        """Release resources, keeping resumable state."""
        ...


class DiskTarget:
    """A local file: preallocated part file + journal, atomic rename on finish."""

    def __init__(
        self,
        final: Path,
        header: JournalHeader,
        writer: DiskWriter,
        *,
        fsync: bool,
        work: tuple[Path, Path] | None = None,
    ) -> None:
        self.part = PartFile(final, header, fsync=fsync, work=work)
        self.writer = writer
        self._map: mmap.mmap | None = None
        self._no_map = False

    def open(self) -> dict[int, int]:
        return self.part.open()

    @property
    def is_open(self) -> bool:
        return self.part.fd >= 0

    async def write(self, offset: int, pieces: list[bytes]) -> asyncio.Future[None]:
        return await self.writer.write(self.part.fd, offset, pieces)

    def view(self, offset: int, length: int) -> memoryview | None:
        """The part file's own pages for ``[offset, offset+length)`` (a shared mmap), for the
        direct reader to receive into; None where that is not safe: blocks not reserved
        (posix_fallocate unsupported: a full disk would then kill the process with SIGBUS on
        a page fault instead of raising ENOSPC) or an empty file."""
        if self._map is None and not self._no_map:
            size = self.part.header.size
            try:
                if size == 0:
                    raise OSError("empty")
                os.posix_fallocate(self.part.fd, 0, size)
                self._map = mmap.mmap(self.part.fd, size)
            except (OSError, ValueError):
                self._no_map = True
        if self._map is None:
            return None
        return memoryview(self._map)[offset : offset + length]

    def _unmap(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held: the GC unmaps it
                self._map.close()
            self._map = None

    def read(self, offset: int, length: int) -> bytes:
        first = os.pread(self.part.fd, length, offset)
        if len(first) == length:
            return first  # the usual case: no extra copy
        out = bytearray(first)
        while len(out) < length:
            data = os.pread(self.part.fd, length - len(out), offset + len(out))
            if not data:
                raise OSError(f"{self.part.part}: shorter than expected at {offset + len(out)}")
            out += data
        return bytes(out)

    def stored_size(self) -> int:
        return os.fstat(self.part.fd).st_size

    def commit(self, chunks: dict[int, int]) -> None:
        self.part.commit(chunks)

    def finish(self) -> None:
        self._unmap()
        self.part.finish()

    def discard(self) -> None:
        self._unmap()
        self.part.discard()

    def close(self) -> None:
        self._unmap()
        self.part.close()
