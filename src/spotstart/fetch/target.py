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


class Window:
    """Memory the direct reader receives one chunk into; ``close`` unmaps it (a window over
    other memory, a tensor's, closes nothing)."""

    def __init__(self, owner: mmap.mmap | None, view: memoryview) -> None:
        self._owner = owner
        self.view = view

    def close(self) -> None:
        # A reader thread still writing (its task was cancelled) holds slices: then the GC
        # releases and unmaps once it is done, never under it.
        with contextlib.suppress(BufferError):
            self.view.release()
        if self._owner is not None:
            with contextlib.suppress(BufferError):  # a slice still held: the GC unmaps it
                self._owner.close()


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
        self._reserved = False
        self._no_map = False

    def open(self) -> dict[int, int]:
        return self.part.open()

    @property
    def is_open(self) -> bool:
        return self.part.fd >= 0

    async def write(self, offset: int, pieces: list[bytes]) -> asyncio.Future[None]:
        return await self.writer.write(self.part.fd, offset, pieces)

    def window(self, offset: int, length: int) -> Window | None:
        """The part file's own pages for ``[offset, offset+length)`` (a shared mmap of just
        that range, unmapped when the window closes, so resident memory stays a chunk a
        stream), for the direct reader to receive into; None where that is not safe: blocks
        not reserved (posix_fallocate unsupported: a full disk would then kill the process
        with SIGBUS on a page fault instead of raising ENOSPC) or nothing to map."""
        if not self._reserved and not self._no_map:
            try:
                if self.part.header.size == 0:
                    raise OSError("empty")
                os.posix_fallocate(self.part.fd, 0, self.part.header.size)
                self._reserved = True
            except OSError:
                self._no_map = True
        if not self._reserved or length <= 0:
            return None
        lead = offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are page-aligned
        mapped = mmap.mmap(self.part.fd, length + lead, offset=offset - lead)
        return Window(mapped, memoryview(mapped)[lead : lead + length])

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
        self.part.finish()

    def discard(self) -> None:
        self.part.discard()

    def close(self) -> None:
        self.part.close()
