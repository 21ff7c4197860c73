"""Local files and directories (plain paths and file:// URLs): pread in a worker thread. The
version is size + mtime_ns, so a file rewritten in place is noticed."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import hashlib
import os
import secrets
from pathlib import Path

from spotstart import safefs
from spotstart.errors import (
    DiskFull,
    IntegrityError,
    LocalIOError,
    NotFound,
    ObjectChanged,
    UnsafePath,
)
from spotstart.store import _http
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

    async def create(self, key: str, path: Path, content_type: str) -> bool:
        """Copy the file at ``path`` to ``key`` only if no file is there. ``key`` is resolved
        beneath the root with no symlink followed (parents included) and no ``..``; missing
        directories are made. The bytes go to a fresh temporary name (``O_EXCL |
        O_NOFOLLOW``), are fsynced, and are linked to ``key`` with ``link(2)``, which never
        replaces a name (EEXIST -> False, whatever is there, a dangling link included)."""
        return await asyncio.to_thread(self._create_sync, key, path)

    def _create_sync(self, key: str, path: Path) -> bool:
        where = str(self._path(key))
        parent, _, name = key.rpartition("/")
        try:
            if not name or key.startswith("/"):
                raise OSError(errno.EINVAL, "not a relative file name", key)
            dirfd = (
                safefs.makedirs_beneath(self.root, parent)
                if parent
                else (safefs.open_root_dir(self.root))
            )
        except OSError as exc:
            raise _refused(where, exc) from None
        tmp = f".{name[:200]}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            expected = _http.digest_file(path, where)
            out = safefs.create_exclusive(dirfd, tmp, 0o644)
            try:
                try:
                    got = _copy(path, out)
                    os.fsync(out)
                finally:
                    os.close(out)
                if got != (expected.size, expected.sha256):
                    raise IntegrityError(f"{path}: changed while being copied; rerun")
                try:
                    os.link(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow_symlinks=False)
                except FileExistsError:
                    return False
                os.fsync(dirfd)
                return True
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dirfd)
        except OSError as exc:
            raise _refused(where, exc) from None
        finally:
            os.close(dirfd)

    async def close(self) -> None:
        return None


def _refused(where: str, exc: OSError) -> LocalIOError:
    """Our error for a create refused by the file system: UnsafePath for a name that would
    leave the root or pass through a link."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return UnsafePath(f"{where}: a symlink or a file in the path; refusing to follow it")
    if exc.errno in (errno.EXDEV, errno.EINVAL):
        return UnsafePath(f"{where}: not a name beneath {exc.filename or 'the root'} ({exc})")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{where}: no space left on device; free space and rerun")
    return LocalIOError(f"{where}: cannot write it ({exc.strerror or exc})")


def _copy(path: Path, out: int) -> tuple[int, bytes]:
    """Copy ``path`` into the fd ``out`` piece by piece: (bytes, SHA-256) of what was copied."""
    sha, total = hashlib.sha256(), 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while piece := os.read(fd, _http.UPLOAD_PIECE_BYTES):
            sha.update(piece)
            total += len(piece)
            view = memoryview(piece)
            while view:
                view = view[os.write(out, view) :]
    finally:
        os.close(fd)
    return total, sha.digest()
