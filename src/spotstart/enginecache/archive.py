"""Packing the cache directories into one deterministic ``.tar.zst`` and extracting one safely:
tarfile is used only as a parser; every member is checked against the manifest before a byte
of it lands, and lands only in a fresh staging directory.

Pack: regular files only, sorted, uid/gid 0, no names, mtime 0, mode at most 0755; symlinks,
sockets, FIFOs, devices, lock files and half-written temp files are skipped and counted.
Extract (the attacker: whoever can write the bucket, when no secret is set; the archive's
bytes themselves are already checked against the manifest's SHA-256, so a peer can change
nothing): decompression stops past a bound (a zip bomb); a member must be a plain regular
file (no link, hard link, device, FIFO, sparse or continuation file), its name a normalized
relative path beneath one of the cache directories (no ``..``, no absolute path, no NUL or
backslash, bounded depth and length), listed in the manifest once, of the size it lists, with
the SHA-256 it lists; the set of members must be the manifest's set. Files are created
``O_EXCL | O_NOFOLLOW`` beneath a staging directory no one else could have made, modes
masked (no setuid, setgid or sticky bit; 0755 at most), owned by us (no chown: root restores
files as root, never as an archive's uid).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from spotstart import safefs
from spotstart.enginecache.dirs import ARCHIVED_TMP, PACKED_DIR, packed_dirs, tmp_inductor
from spotstart.errors import IntegrityError, LocalIOError

PIECE = 1 << 20
MAX_DEPTH = 64
MAX_PATH = 4096
MAX_NAME = 255
ZSTD_LEVEL = 3
# Tar's own bytes around the members: headers (one, plus a pax header and its data for a long
# name) and padding; what a decompressed archive may hold beyond the files' sizes.
TAR_OVERHEAD_PER_FILE = 3 * 512 + MAX_PATH + 512
TAR_OVERHEAD = 1 << 20
# The most a pax header's or GNU long name's data may hold (a 4096-byte path and a few
# records fit many times over): tarfile reads such data whole into memory before any member
# is seen, so the decompression bound (the manifest's total) is no bound for it.
MAX_META_BYTES = 64 << 10
_META_TYPES = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME}
)
_REGTYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Inductor writes "<name>.tmp" beside a file then renames it; Triton "<name>.tmp.pid_<pid>_<n>";
# locks are filelock's "*.lock". None of them is a cache entry.
_TEMP = re.compile(r"(\.tmp(\.pid_.*)?|\.lock|\.partial)$|^\.[0-9]+\.[0-9]+\.tmp$")


class ArchiveRefused(IntegrityError):
    """An archive (or manifest) we will not extract; the message says which member and why."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    mode: int


@dataclass
class Packed:
    """An archive written beneath root: ``path`` (``root/packed/<sha256>.tar.zst``)."""

    path: Path
    size: int
    sha256: str
    files: list[FileEntry]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)


def check_name(name: object) -> str:
    """``name`` when it is a path an archive may hold, else :class:`ArchiveRefused`."""
    if not isinstance(name, str) or not name:
        raise ArchiveRefused(f"{name!r}: not a path")
    shown = ascii(name)[:120]
    if "\0" in name or "\\" in name or name.startswith("/"):
        raise ArchiveRefused(f"{shown}: absolute, or holds a NUL or backslash")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        # a name that is not UTF-8 (a lone surrogate): a manifest's JSON could not carry it
        raise ArchiveRefused(f"{shown}: not UTF-8") from None
    if len(encoded) > MAX_PATH:
        raise ArchiveRefused(f"{shown}: longer than {MAX_PATH} bytes")
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        raise ArchiveRefused(f"{shown}: deeper than {MAX_DEPTH} levels")
    for p in parts:
        if p in ("", ".", ".."):
            raise ArchiveRefused(f"{shown}: not a normalized relative path ('..', '.', '//')")
        if len(p.encode("utf-8")) > MAX_NAME:
            raise ArchiveRefused(f"{shown}: a name longer than {MAX_NAME} bytes")
    if not any(name.startswith(arch + "/") for _, arch in packed_dirs()):
        raise ArchiveRefused(f"{shown}: not beneath a cache directory")
    return name


def local_path(archived: str) -> str:
    """Where an archived path lands beneath root (``tmp/torchinductor/x`` ->
    ``tmp/torchinductor_<our user>/x``)."""
    if archived.startswith(ARCHIVED_TMP + "/"):
        return tmp_inductor() + archived[len(ARCHIVED_TMP) :]
    return archived


def _scan(
    root_fd: int, local: str, arch: str, out: list[tuple[str, str]], skipped: dict[str, int]
) -> None:
    try:
        dfd = safefs.open_beneath(root_fd, local, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    except OSError:
        skipped["unreadable"] = skipped.get("unreadable", 0) + 1
        return
    try:
        with os.scandir(dfd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            lp, ap = f"{local}/{e.name}", f"{arch}/{e.name}"
            if e.is_symlink():
                skipped["symlinks"] = skipped.get("symlinks", 0) + 1
            elif e.is_dir(follow_symlinks=False):
                _scan(root_fd, lp, ap, out, skipped)
            elif not e.is_file(follow_symlinks=False):
                skipped["special"] = skipped.get("special", 0) + 1
            elif _TEMP.search(e.name):
                skipped["temp_or_lock"] = skipped.get("temp_or_lock", 0) + 1
            else:
                try:
                    check_name(ap)
                except ArchiveRefused:
                    skipped["bad_name"] = skipped.get("bad_name", 0) + 1
                    continue
                out.append((lp, ap))
    finally:
        os.close(dfd)


class _HashingWriter:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.h.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


class _ExactReader:
    """``size`` bytes of a file, hashed; a file that shrank while read is an error."""

    def __init__(self, fd: int, size: int, name: str) -> None:
        self.fd, self.left, self.name = fd, size, name
        self.h = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        if want <= 0:
            return b""
        data = os.read(self.fd, want)
        if not data:
            raise LocalIOError(f"{self.name}: shrank while packed; the engine is still writing it")
        self.left -= len(data)
        self.h.update(data)
        return data


def pack(root: Path, *, max_bytes: int, max_files: int) -> Packed:
    """Pack the cache directories beneath ``root`` into ``root/packed/<sha256>.tar.zst``.
    More than ``max_bytes`` or ``max_files``: :class:`LocalIOError`, nothing left behind."""
    root_fd = safefs.open_root_dir(root)
    try:
        found: list[tuple[str, str]] = []
        skipped: dict[str, int] = {}
        for local, arch in packed_dirs():
            _scan(root_fd, local, arch, found, skipped)
        found.sort(key=lambda t: t[1])
        if len(found) > max_files:
            raise LocalIOError(
                f"{root}: {len(found):,} cache files, more than max_files {max_files:,}"
            )
        packed_fd = safefs.private_dir_fd(root_fd, PACKED_DIR)
        tmp = f".{secrets.token_hex(8)}.tmp"
        out_fd = safefs.create_exclusive(packed_fd, tmp, 0o600)
        try:
            files, writer = _write_tar(root_fd, found, out_fd, max_bytes, root)
            digest = writer.h.hexdigest()
            name = f"{digest}.tar.zst"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=packed_fd)  # the same bytes packed before
            safefs.rename_beneath(packed_fd, tmp, packed_fd, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=packed_fd)
            raise
        finally:
            os.close(out_fd)
            os.close(packed_fd)
        return Packed(root / PACKED_DIR / name, writer.size, digest, files, skipped)
    finally:
        os.close(root_fd)


def _write_tar(
    root_fd: int, found: list[tuple[str, str]], out_fd: int, max_bytes: int, root: Path
) -> tuple[list[FileEntry], _HashingWriter]:
    writer = _HashingWriter(out_fd)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    files: list[FileEntry] = []
    total = 0
    with (
        cctx.stream_writer(writer, closefd=False) as zw,  # type: ignore[arg-type]
        tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for local, arch in found:
            try:
                fd = safefs.open_beneath(root_fd, local, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue  # removed since the scan (an engine's temp file)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                total += st.st_size
                if total > max_bytes:
                    raise LocalIOError(
                        f"{root}: the cache holds more than max_bytes ({max_bytes:,}); "
                        "raise the limit or leave it unpublished"
                    )
                mode = stat.S_IMODE(st.st_mode) & 0o755
                info = tarfile.TarInfo(arch)
                info.size, info.mode, info.mtime = st.st_size, mode, 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                reader = _ExactReader(fd, st.st_size, str(root / local))
                tar.addfile(info, reader)
                files.append(FileEntry(arch, st.st_size, reader.h.hexdigest(), mode))
            finally:
                os.close(fd)
    return files, writer


class _BoundedReader:
    """A decompressed stream that fails once more than ``limit`` bytes came out of it."""

    def __init__(self, inner: BinaryIO, limit: int) -> None:
        self.inner, self.limit, self.count = inner, limit, 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n if n >= 0 else PIECE)
        self.count += len(data)
        if self.count > self.limit:
            raise ArchiveRefused(
                f"decompresses to more than {self.limit:,} bytes, more than its manifest "
                "lists (a zip bomb?)"
            )
        return data


class _CheckedInfo(tarfile.TarInfo):
    """A tar header checked before tarfile reads the data that follows it: a pax header or
    GNU long name of at most MAX_META_BYTES; nothing but those and regular files (a GNU long
    link name, an old GNU sparse file's extension headers, ... are refused unread)."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES:
            if self.size > MAX_META_BYTES:
                raise ArchiveRefused(
                    f"a tar header of {self.size:,} bytes (type {self.type!r}), more than "
                    f"{MAX_META_BYTES:,}: refused unread (a zip bomb?)"
                )
        elif self.type not in _REGTYPES:
            shown = ascii(self.name)[:120]
            raise ArchiveRefused(f"{shown}: not a regular file (tar type {self.type!r})")
        out: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return out


def extract(
    archive: BinaryIO, manifest_files: Mapping[str, FileEntry], root: Path, staging: str
) -> tuple[int, int]:
    """Extract ``archive`` (an open file, read from where it stands) into ``root/staging``
    (which must not exist: created here, 0700), every member checked against
    ``manifest_files`` (archived path -> entry). Returns (bytes, files); raises
    :class:`ArchiveRefused` (the staging directory is left for the caller to remove)."""
    total_declared = sum(e.size for e in manifest_files.values())
    limit = total_declared + TAR_OVERHEAD_PER_FILE * len(manifest_files) + TAR_OVERHEAD
    root_fd = safefs.open_root_dir(root)
    try:
        os.mkdir(staging, 0o700, dir_fd=root_fd)  # EEXIST when anyone made it first
        stage_fd = safefs.open_beneath(root_fd, staging, os.O_RDONLY | os.O_DIRECTORY)
        safefs.check_private(stage_fd, str(root / staging))
    finally:
        os.close(root_fd)
    seen: set[str] = set()
    written = 0
    try:
        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(archive, read_across_frames=True, closefd=False) as zr:
            bounded = _BoundedReader(zr, limit)
            try:
                tar = tarfile.open(fileobj=bounded, mode="r|", tarinfo=_CheckedInfo)  # type: ignore[call-overload]  # noqa: SIM115
            except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
                raise ArchiveRefused(f"not a tar archive ({exc})") from None
            with tar:
                try:
                    for member in tar:
                        written += _extract_member(tar, member, manifest_files, seen, stage_fd)
                except (tarfile.TarError, zstandard.ZstdError, EOFError, ValueError) as exc:
                    raise ArchiveRefused(f"damaged archive ({exc})") from None
    finally:
        os.close(stage_fd)
    missing = set(manifest_files) - seen
    if missing:
        raise ArchiveRefused(
            f"{len(missing)} file(s) the manifest lists are not in the archive "
            f"(first: {ascii(sorted(missing)[0])[:120]})"
        )
    return written, len(seen)


def _extract_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    manifest_files: Mapping[str, FileEntry],
    seen: set[str],
    stage_fd: int,
) -> int:
    name = check_name(member.name)
    shown = ascii(name)[:120]
    if member.type not in _REGTYPES:
        raise ArchiveRefused(f"{shown}: not a regular file (tar type {member.type!r})")
    if member.sparse is not None:  # holes tarfile fills with zeros nobody decompressed
        raise ArchiveRefused(f"{shown}: a sparse file (pack never writes one)")
    entry = manifest_files.get(name)
    if entry is None:
        raise ArchiveRefused(f"{shown}: in the archive, not in the manifest")
    if name in seen:
        raise ArchiveRefused(f"{shown}: in the archive twice")
    seen.add(name)
    if member.size != entry.size:
        raise ArchiveRefused(f"{shown}: {member.size:,} bytes, the manifest says {entry.size:,}")
    src = tar.extractfile(member)
    if src is None:
        raise ArchiveRefused(f"{shown}: no data")
    local = local_path(name)
    parent, _, _ = local.rpartition("/")
    pfd = safefs.makedirs_beneath(stage_fd, parent, 0o700)
    os.close(pfd)
    mode = (entry.mode & 0o755) | 0o600
    fd = safefs.create_exclusive(stage_fd, local, mode)
    h = hashlib.sha256()
    got = 0
    try:
        while chunk := src.read(PIECE):
            got += len(chunk)
            if got > entry.size:
                raise ArchiveRefused(f"{shown}: more bytes than its header says")
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)  # the umask took bits the mask allows; nothing beyond 0755
    finally:
        os.close(fd)
    if got != entry.size:
        raise ArchiveRefused(f"{shown}: {got:,} bytes, the manifest says {entry.size:,}")
    if h.hexdigest() != entry.sha256:
        raise ArchiveRefused(f"{shown}: sha256 differs from the manifest's")
    return got


def file_sha256(path: Path, fd: int | None = None) -> str:
    """SHA-256 of a whole file (``fd`` when given, read from its start)."""
    h = hashlib.sha256()
    own = fd is None
    f = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC) if fd is None else fd
    try:
        off = 0
        while chunk := os.pread(f, PIECE, off):
            h.update(chunk)
            off += len(chunk)
    finally:
        if own:
            os.close(f)
    return h.hexdigest()


def is_sha256(text: object) -> bool:
    return isinstance(text, str) and _HEX64.fullmatch(text) is not None
