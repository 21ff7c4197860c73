"""The disk writer: a separate role from the network readers, with a bounded queue between
them (like s3transfer's IO executor). Readers hand it (fd, offset, bytes); it pwrites them on
worker threads. ``write`` waits while ``queue_bytes`` are already queued: that wait is the
backpressure that keeps memory bounded when the disk is slower than the network."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future, ThreadPoolExecutor


class DiskWriter:
    def __init__(self, queue_bytes: int, threads: int = 2) -> None:
        self._limit = queue_bytes
        self._queued = 0
        self._cond = asyncio.Condition()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="spotstart-writer")

    async def write(self, fd: int, offset: int, data: bytes) -> asyncio.Future[None]:
        """Queue a write; returns a future that completes when the bytes are in the file."""
        n = len(data)
        async with self._cond:
            # A single piece larger than the limit still goes through, alone.
            await self._cond.wait_for(lambda: self._queued == 0 or self._queued + n <= self._limit)
            self._queued += n
        loop = asyncio.get_running_loop()
        inner: Future[None] = self._pool.submit(_pwrite_all, fd, data, offset)
        outer = asyncio.wrap_future(inner, loop=loop)
        outer.add_done_callback(lambda _f: loop.create_task(self._release(n)))
        return outer

    async def _release(self, n: int) -> None:
        async with self._cond:
            self._queued -= n
            self._cond.notify_all()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
