"""Opening and creating files beneath a root with no symlink followed, parent or last: the one
place spotstart resolves a name inside a directory that someone else might also write.

The threat: a user (or another tenant of a shared node) who can write a directory spotstart
writes to plants a symlink (``DEST/.spotstart/doctor-<pid>.tmp -> /etc/passwd``, a model
subdirectory -> ``/``), and spotstart, often running as root, writes through it. Everything here
resolves every component beneath a directory file descriptor: Linux ``openat2(2)`` with
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`` where the kernel has it (5.6+,
and not blocked by a seccomp filter), else one ``openat(O_NOFOLLOW)`` per component. Files a
user names (``--out``, ``--metrics-textfile``, ``--events``) go through :func:`write_output`
and :func:`open_append`: no link at the name is followed. Not a path library: callers still
build names; this module only opens, creates and checks them.

    fd = private_dir_fd(dest, ".spotstart")          # ours, not a link, not writable by others
    out = create_exclusive(fd, "doctor-123.tmp")      # O_CREAT | O_EXCL | O_NOFOLLOW
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from spotstart.errors import DiskFull, LocalIOError, UnsafePath, UsageError

__all__ = [
    "check_private",
    "create_exclusive",
    "makedirs_beneath",
    "open_append",
    "open_beneath",
    "open_root_dir",
    "pinned_root",
    "private_dir",
    "private_dir_fd",
    "rename_beneath",
    "resolver",
    "stat_beneath",
    "write_output",
]

# From linux/openat2.h; the syscall number is 437 on every architecture (the 5.1+ unified table).
_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_AT_FDCWD = -100
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

Root = str | os.PathLike[str] | int
OpenAt2 = Callable[[int, str, int, int, int], int]


@functools.cache
def _libc_openat2() -> tuple[Callable[..., int], type[Any]]:
    import ctypes  # here: most commands never open anything beneath a root

    class OpenHow(ctypes.Structure):
        _fields_ = [
            ("flags", ctypes.c_uint64),
            ("mode", ctypes.c_uint64),
            ("resolve", ctypes.c_uint64),
        ]

    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    syscall.argtypes = [
        ctypes.c_long,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.POINTER(OpenHow),
        ctypes.c_size_t,
    ]
    return syscall, OpenHow


def _openat2_ctypes(dirfd: int, rel: str, flags: int, mode: int, resolve: int) -> int:
    """``openat2(dirfd, rel, &{flags, mode, resolve}, 24)`` through libc's ``syscall``."""
    import ctypes

    syscall, open_how = _libc_openat2()
    how = open_how(flags, mode, resolve)
    fd = int(syscall(_SYS_OPENAT2, dirfd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return fd


# The seam tests use to force the component walk (a kernel without openat2 or a seccomp filter
# that refuses it): replace ``_openat2`` with a function raising ENOSYS and reset ``_have``.
_openat2: OpenAt2 = _openat2_ctypes
_have: bool | None = None  # None: not probed yet


def resolver() -> str:
    """``"openat2"`` or ``"walk"``: which mechanism this process uses (for doctor and tests)."""
    return "openat2" if _openat2_usable() else "walk"


def _openat2_usable() -> bool:
    global _have
    if _have is None:
        try:
            os.close(_openat2(_AT_FDCWD, ".", os.O_PATH | os.O_CLOEXEC, 0, 0))
            _have = True
        except OSError as exc:
            # ENOSYS: an old kernel; EPERM: a container's seccomp profile that predates it.
            # Any other answer means the call itself exists.
            _have = exc.errno not in (errno.ENOSYS, errno.EPERM)
    return _have


def _components(rel: str) -> list[str]:
    """The names in ``rel``; absolute paths, ``..``, ``.`` and empty components are refused
    (both mechanisms refuse the same names, so a test on one holds for the other), and so is
    a name no file can hold: a NUL (openat2's C string would end there and open another
    name, the walk raised ValueError) or text with no bytes (a lone surrogate)."""
    if not rel or rel.startswith("/"):
        raise OSError(errno.EINVAL, "not a relative path", rel)
    try:
        encoded = os.fsencode(rel)
    except UnicodeError:
        raise OSError(errno.EINVAL, "a name with no file-system bytes", ascii(rel)) from None
    if b"\0" in encoded:
        raise OSError(errno.EINVAL, "a NUL in the name", ascii(rel))
    parts = rel.split("/")
    for part in parts:
        if part == "..":
            raise OSError(errno.EXDEV, "'..' leaves the root", rel)
        if part in ("", "."):
            raise OSError(errno.EINVAL, "empty or '.' path component", rel)
    return parts


# Roots held open for a run (:func:`pinned_root`): path -> [fd, or -1 until first opened; users]
_pins: dict[str, list[int]] = {}
_pins_lock = threading.Lock()


@contextlib.contextmanager
def pinned_root(path: str | os.PathLike[str]) -> Iterator[None]:
    """Within the block, ``path`` (a directory the caller resolved once: fetch's DEST after
    ``realpath``) names the directory it named when first opened here, for every safefs call
    given that path: it is opened once (O_NOFOLLOW: by then no longer a link) and held. A
    user who can write its parent and swaps it for a link mid-run (to ``/etc/cron.d``) then
    redirects nothing: without the pin each file opened the path again and followed the link.
    """
    key = os.fspath(path)
    with _pins_lock:
        entry = _pins.setdefault(key, [-1, 0])
        entry[1] += 1
    try:
        yield
    finally:
        with _pins_lock:
            entry[1] -= 1
            if entry[1] == 0:
                del _pins[key]
                if entry[0] >= 0:
                    os.close(entry[0])


def _open_root(root: Root) -> tuple[int, bool]:
    """(a directory fd for ``root``, whether we opened it). The root itself is the caller's
    choice and may be a symlink (``/nvme/models -> /mnt/disk1``); only names beneath it are
    resolved without following. A pinned root is the directory held for it."""
    if isinstance(root, int):
        return root, False
    key = os.fspath(root)
    with _pins_lock:
        entry = _pins.get(key)
        if entry is not None:
            if entry[0] < 0:
                entry[0] = os.open(key, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            return entry[0], False
    return os.open(key, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), True


def open_root_dir(root: Root) -> int:
    """An O_RDONLY fd of ``root`` itself (the directory held for it when pinned)."""
    dirfd, owned = _open_root(root)
    try:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    finally:
        if owned:
            os.close(dirfd)


def open_beneath(root: Root, rel: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """Open ``rel`` beneath ``root`` (a path or a directory fd) with every component, parents
    and last, resolved beneath it and no symlink followed; the fd is always close-on-exec.

    Raises OSError: ELOOP for a symlink anywhere (ENOTDIR where a parent is one and the kernel
    says so), EXDEV for ``..``, ENOENT, EEXIST with O_EXCL, ... ::

        fd = open_beneath("/nvme/models", "llama/model.safetensors")
    """
    parts = _components(rel)
    flags |= os.O_CLOEXEC
    dirfd, owned = _open_root(root)
    try:
        if _openat2_usable():
            # openat2 refuses a mode without O_CREAT or O_TMPFILE (which includes O_DIRECTORY).
            creating = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
            for _ in range(8):  # EAGAIN: a concurrent rename raced the lookup; try again
                try:
                    fd = _openat2(dirfd, rel, flags, mode if creating else 0, _RESOLVE)
                except OSError as exc:
                    if exc.errno != errno.EAGAIN:
                        raise OSError(exc.errno, exc.strerror, rel) from None
                    continue
                return _not_a_link(fd, rel)
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), rel)
        return _walk(dirfd, parts, rel, flags, mode)
    finally:
        if owned:
            os.close(dirfd)


def _walk(dirfd: int, parts: list[str], rel: str, flags: int, mode: int) -> int:
    """The fallback: one ``openat(O_NOFOLLOW)`` per component from ``dirfd``."""
    cur = dirfd
    try:
        for i, name in enumerate(parts[:-1]):
            try:
                nxt = os.open(
                    name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur
                )
            except OSError as exc:
                if exc.errno == errno.ENOTDIR and _is_link(cur, name):
                    exc = OSError(errno.ELOOP, "a symlink in the path")
                raise OSError(exc.errno, exc.strerror, "/".join(parts[: i + 1])) from None
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=cur)
        except OSError as exc:
            if exc.errno == errno.ENOTDIR and _is_link(cur, parts[-1]):
                exc = OSError(errno.ELOOP, "a symlink in the path")
            raise OSError(exc.errno, exc.strerror, rel) from None
        return _not_a_link(fd, rel)
    finally:
        if cur != dirfd:
            os.close(cur)


def _is_link(dirfd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _not_a_link(fd: int, rel: str) -> int:
    """O_PATH | O_NOFOLLOW opens a symlink itself rather than failing: refuse that fd too."""
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.ELOOP, "a symlink in the path", rel)
    return fd


def stat_beneath(root: Root, rel: str) -> os.stat_result | None:
    """What ``rel`` beneath ``root`` is (the file itself, never a link's target), or None when
    no such name can be reached with no link in any component."""
    try:
        fd = open_beneath(root, rel, os.O_PATH)
    except OSError:
        return None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def create_exclusive(root: Root, rel: str, mode: int = 0o600, flags: int = os.O_WRONLY) -> int:
    """Create ``rel`` beneath ``root``: a new file, never an existing one nor a link's target
    (``O_CREAT | O_EXCL | O_NOFOLLOW``; EEXIST when the name is taken, even by a dangling link).
    """
    return open_beneath(root, rel, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)


def makedirs_beneath(root: Root, rel: str, mode: int = 0o777) -> int:
    """Create each directory of ``rel`` beneath ``root`` that is missing (``mode`` less the
    umask, as ``mkdir -p``) and return an O_RDONLY fd of the last; a symlink anywhere is
    refused (ELOOP), a file in the way is ENOTDIR."""
    parts = _components(rel)
    dirfd, owned = _open_root(root)
    cur = dirfd
    try:
        for name in parts:
            # An existing name may be a directory or a link: the open below refuses a link.
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=cur)
            nxt = open_beneath(cur, name, os.O_RDONLY | os.O_DIRECTORY)
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        result, cur = cur, dirfd  # handed to the caller: not closed below
        return result
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, rel) from None
    finally:
        if cur != dirfd:
            os.close(cur)
        if owned:
            os.close(dirfd)


def private_dir_fd(root: Root, rel: str, mode: int = 0o700) -> int:
    """An O_RDONLY fd of the directory ``rel`` beneath ``root``, each level of it created
    (``mode``) if missing. Every level must be a real directory (not a link), owned by our
    effective uid and writable by nobody else: otherwise someone else could plant names in
    it, and :class:`~spotstart.errors.UnsafePath` says so (exit 8). ``root`` itself is the
    caller's (a user's DEST) and is not judged."""
    parts = _components(rel)
    dirfd, owned = _open_root(root)
    cur = dirfd
    try:
        for i, name in enumerate(parts):
            where = _describe(root, "/".join(parts[: i + 1]))
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, mode, dir_fd=cur)
                nxt = open_beneath(cur, name, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                raise _refused(where, exc) from None
            if cur != dirfd:
                os.close(cur)
            cur = nxt
            check_private(cur, where)
        result, cur = cur, dirfd  # handed to the caller: not closed below
        return result
    finally:
        if cur != dirfd:
            os.close(cur)
        if owned:
            os.close(dirfd)


def check_private(fd: int, where: str) -> None:
    """Refuse a directory fd that is not ours or that others may write (UnsafePath)."""
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise UnsafePath(
            f"{where}: owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); someone else "
            "could plant links in it: remove it or chown it to this user"
        )
    if st.st_mode & 0o022:
        raise UnsafePath(
            f"{where}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            "another user could plant links in it: chmod go-w it"
        )


def private_dir(path: str | os.PathLike[str], mode: int = 0o700) -> Path:
    """Create ``path`` (and its missing parents, which are the caller's own choice and may be
    links) as a private directory, or check an existing one as :func:`private_dir_fd` does."""
    p = Path(os.path.abspath(path))
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _refused(str(p.parent), exc) from None
    os.close(private_dir_fd(p.parent, p.name, mode))
    return p


def rename_beneath(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """``renameat(src_dir, src, dst_dir, dst)``: single names in directories held open, so a
    parent swapped for a link after they were opened cannot redirect the rename (rename never
    follows a link in its last component)."""
    for name in (src, dst):
        if len(_components(name)) != 1:
            raise OSError(errno.EINVAL, "a single name is expected", name)
    os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)


def write_output(
    path: str | os.PathLike[str],
    data: bytes | str | BinaryIO,
    mode: int = 0o644,
    *,
    label: str = "",
) -> None:
    """Write a file the user named (``--out report.json``, a metrics textfile), atomically and
    never through a link. The directory is the user's choice, taken as given (links and all);
    the name itself must not be a symlink: refused (:class:`UnsafePath`) rather than replaced,
    since it may be the user's own arrangement, and never followed. The bytes go to a
    temporary sibling created ``O_EXCL | O_NOFOLLOW`` and renamed onto the name within the
    directory's fd, so a reader sees the old file or the new one, and a name swapped for a
    link meanwhile is replaced, not written through. ``label`` names the file in errors
    (``--metrics-textfile m.prom``); other failures are LocalIOError/DiskFull. ``data``: the
    bytes, a text, or a binary file copied as a stream (a server's log)."""
    p = Path(os.path.abspath(path))
    where = label or str(p)
    tmp = f".{p.name[:200]}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        dirfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _refused(where, exc) from None
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISLNK(os.stat(p.name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                raise UnsafePath(
                    f"{where}: is a symlink; spotstart writes no output through a link "
                    "(remove it, or name its target)"
                )
        fd = create_exclusive(dirfd, tmp, mode)
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes | str):
                    f.write(data.encode() if isinstance(data, str) else data)
                else:
                    shutil.copyfileobj(data, f)
            rename_beneath(dirfd, tmp, dirfd, p.name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dirfd)
            raise
    except OSError as exc:
        raise _refused(where, exc, "cannot write it") from None
    finally:
        os.close(dirfd)


def open_append(path: str | os.PathLike[str], mode: int = 0o644) -> int:
    """An O_APPEND fd of a log several processes share (``--events FILE``), created if
    missing. The name must be a regular file with one link: not a symlink (O_NOFOLLOW), not a
    hard link to another file, not a FIFO or device (opened O_NONBLOCK, so a FIFO without
    a reader fails at once instead of hanging). Raises OSError (ELOOP for those)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise OSError(errno.ELOOP, "not a regular file with one link", os.fspath(path))
    return fd


def _describe(root: Root, rel: str) -> str:
    base = f"<fd {root}>" if isinstance(root, int) else os.fspath(root)
    return os.path.join(base, rel) if rel else base


def _refused(where: str, exc: OSError, doing: str = "cannot create it") -> LocalIOError:
    """Our error for an OSError met making or opening ``where``: UnsafePath for a link."""
    if exc.errno == errno.ELOOP:
        return UnsafePath(f"{where}: a symlink in the path; refusing to follow it (remove it)")
    if exc.errno == errno.ENOTDIR:
        return UnsafePath(f"{where}: a file or a symlink where a directory should be (remove it)")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{where}: no space left on device; free space and rerun")
    return LocalIOError(f"{where}: {doing} ({exc.strerror or exc})")


def read_owner_only(path: Path, where: str, limit: int, make: str, exposed: str) -> bytes:
    """The bytes of a secret file (a token, a key): a regular file only its owner may read,
    at most ``limit`` bytes. Links are followed (a Kubernetes Secret volume is a chain of
    them); O_NONBLOCK: a FIFO given by mistake does not hang the start. Each refusal is a
    UsageError naming ``where``; ``make`` is the command that makes one, ``exposed`` what a
    reader of a file others may read could do (``"read the token (anyone who...)"``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{where}: {exc.strerror}; make one with: {make}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{where}: not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(
                f"{where}: mode {stat.S_IMODE(st.st_mode):o} lets other users {exposed}"
            )
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)
