"""Local files and directories (plain paths and file:// URLs): pread in a worker thread. The
version is size + mtime_ns, so a file rewritten in place is noticed."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import secrets
from pathlib import Path

from spotstart.errors import LocalIOError, NotFound, ObjectChanged
from spotstart.store.base import ObjectInfo, Sink

_PIECE = 8 << 20


class LocalSource:
    """A directory tree rooted at ``root`` (``key`` is a path relative to it)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    @property
    def display(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    async def stat(self, key: str) -> ObjectInfo:
        return await asyncio.to_thread(self._stat_sync, key)

    def _stat_sync(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise NotFound(f"{path}: no such file or directory") from exc
        except PermissionError as exc:
            raise LocalIOError(f"{path}: permission denied") from exc
        if path.is_dir():
            raise NotFound(f"{path}: is a directory")
        return ObjectInfo(key=key, size=st.st_size, version=f"{st.st_size}-{st.st_mtime_ns}")

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return await asyncio.to_thread(self._list_sync, prefix)

    def _list_sync(self, prefix: str) -> builtins.list[ObjectInfo]:
        base = self._path(prefix)
        if not base.exists():
            raise NotFound(f"{base}: no such file or directory")
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = Path(dirpath) / name
                out.append(self._stat_sync(str(full.relative_to(self.root))))
        return sorted(out, key=lambda o: o.key)

    async def read(self, obj: ObjectInfo, start: int, length: int, sink: Sink) -> None:
        path = self._path(obj.key)
        try:
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ObjectChanged(f"{path}: removed while being read") from exc
        try:
            st = os.fstat(fd)
            if f"{st.st_size}-{st.st_mtime_ns}" != obj.version:
                raise ObjectChanged(f"{path}: changed while being read; rerun")
            done = 0
            while done < length:
                piece = await asyncio.to_thread(
                    os.pread, fd, min(_PIECE, length - done), start + done
                )
                if not piece:
                    raise ObjectChanged(f"{path}: shorter than expected; changed while read")
                await sink(piece)
                done += len(piece)
        finally:
            os.close(fd)

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write ``data`` to a fresh temporary name beside ``key`` (``O_EXCL | O_NOFOLLOW``:
        never through a planted file or link), then rename it into place."""
        await asyncio.to_thread(self._put_sync, key, data)

    def _put_sync(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise LocalIOError(f"{path}: cannot write: {exc.strerror or exc}") from exc

    async def close(self) -> None:
        return None
