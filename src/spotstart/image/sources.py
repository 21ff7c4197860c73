"""Where an image's bytes come from: an OCI image layout (a directory or a tar of one), a
`docker save` archive (legacy layout, skopeo's layer symlinks, and the OCI layout Docker >= 25
adds), or a registry (``registry.py``). Each is a :class:`BlobStore`; :func:`resolve` walks
index -> manifest -> config the same way for all and hands back the layers to stream.

Names inside archives and digests in manifests are untrusted: blobs are found by a checked
digest, archive members by their exact name, and nothing here ever writes a file."""

from __future__ import annotations

import functools
import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from spotstart import untrusted_json
from spotstart.errors import IntegrityError, InvalidImage, NotFound, UsageError
from spotstart.image import oci
from spotstart.image.digest import Digest

# The distribution spec lets registries refuse manifests over 4 MiB; configs of images with
# long histories run to a few MiB. Anything over 64 MiB is not a real JSON document.
JSON_LIMIT = 64 << 20


class BlobStore(Protocol):
    display: str

    def open_blob(self, digest: Digest, size: int | None) -> BinaryIO:
        """The blob's bytes as stored (compressed layers stay compressed). NotFound if absent."""
        ...

    def read_manifest(self, desc: oci.Descriptor) -> bytes:
        """A manifest or index named by a descriptor, its size and digest checked."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LayerRef:
    """One layer to stream. ``digest``/``size``: of the blob as stored (``size_compressed``
    is None for `docker save`'s legacy layers, stored uncompressed); ``diff_id``: of the tar."""

    index: int
    digest: Digest | None
    size_stored: int
    size_compressed: int | None
    media_type: str
    diff_id: Digest | None
    command: str
    open: Callable[[], BinaryIO]


@dataclass(frozen=True)
class ResolvedImage:
    name: str
    kind: str  # "oci-layout", "oci-archive", "docker-archive", "registry"
    manifest_digest: str
    config: oci.ImageConfig
    layers: tuple[LayerRef, ...]
    transport: str = ""  # the same image as skopeo names it (docker-archive:F, oci:D:N, ...)


def read_verified(store: BlobStore, desc: oci.Descriptor, what: str) -> bytes:
    """A small JSON blob, its size and digest checked before it is parsed."""
    if desc.size > JSON_LIMIT:
        raise InvalidImage(f"{what} {desc.digest.short}: {desc.size} bytes is not a manifest")
    with store.open_blob(desc.digest, desc.size) as f:
        data = f.read(desc.size + 1)
    check_bytes(data, desc.digest, desc.size, f"{what} {desc.digest}")
    return data


def check_bytes(data: bytes, digest: Digest, size: int | None, what: str) -> None:
    if size is not None and len(data) != size:
        raise IntegrityError(f"{what}: {len(data)} bytes, the descriptor says {size}")
    h = digest.hasher()
    h.update(data)
    if h.hexdigest() != digest.encoded:
        raise IntegrityError(f"{what}: content does not match its digest (corrupt or tampered)")


class _Slice(io.RawIOBase):
    """``length`` bytes of an open file from ``offset``: one tar member, read in place."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._f.seek(offset)
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            return 0
        view = memoryview(buf)[: min(len(buf), self._left)]
        n = self._f.readinto(view)
        if not n:
            raise InvalidImage("the archive is truncated: a member ends before its stated size")
        self._left -= n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def open_regular(path: Path, what: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (after links): a FIFO would block
    the open and a device (a link to /dev/zero) never end; both are InvalidImage."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise InvalidImage(f"{what}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidImage(f"{what}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class OciDir:
    """An OCI image layout directory: ``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``.
    Every file must be a regular one; JSON files are read to ``JSON_LIMIT`` at most."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.display = str(root)

    def read_file(self, name: str) -> bytes:
        try:
            with open_regular(self.root / name, f"{self.display}: {name}") as f:
                data = f.read(JSON_LIMIT + 1)
        except FileNotFoundError:
            raise NotFound(f"{self.display}: no {name}: not an OCI image layout") from None
        if len(data) > JSON_LIMIT:
            raise InvalidImage(f"{self.display}: {name} is over {JSON_LIMIT} bytes, not JSON")
        return data

    def open_blob(self, digest: Digest, size: int | None) -> BinaryIO:
        path = self.root / "blobs" / digest.algorithm / digest.encoded
        try:
            return open_regular(path, f"{self.display}: blob {digest}")
        except FileNotFoundError:
            raise NotFound(f"{self.display}: blob {digest} is missing from blobs/") from None

    def read_manifest(self, desc: oci.Descriptor) -> bytes:
        return read_verified(self, desc, "manifest")

    def close(self) -> None:
        pass


# An image archive holds a few files per layer; tarfile keeps every member's header in memory.
MAX_MEMBERS = 100_000
_META_LIMIT = 1 << 20  # a pax header or GNU long name over 1 MiB is not a real one


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax header or GNU long name whole into memory, whatever size its
    header claims: refuse one over ``_META_LIMIT`` before it is read (tarfile's documented
    hook for TarInfo subclasses: ``_proc_member``)."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > _META_LIMIT:
            raise InvalidImage(f"a tar extended header of {self.size} bytes")
        return super()._proc_member(archive)  # type: ignore[misc,no-any-return]


_META_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class TarArchive:
    """A tar holding an OCI layout, a `docker save` archive, or both (Docker >= 25). Members
    are read in place by offset; symlinked members (skopeo's ``<id>/layer.tar``) are followed
    inside the archive only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.display = str(path)
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic[:2] == b"\x1f\x8b" or magic[:4] == b"\x28\xb5\x2f\xfd" or magic[:3] == b"BZh":
            raise UsageError(
                f"{path}: the archive itself is compressed; decompress it first "
                "(members are read in place, which needs a plain tar)"
            )
        try:
            with tarfile.open(path, "r:", tarinfo=_BoundedTarInfo) as tf:
                members = []
                for m in tf:
                    members.append(m)
                    if len(members) > MAX_MEMBERS:
                        raise InvalidImage(f"over {MAX_MEMBERS} members: not an image archive")
        except InvalidImage as exc:
            raise InvalidImage(f"{path}: {exc}") from None
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidImage(f"{path}: not a readable tar archive ({exc})") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            self._members[posixpath.normpath(m.name.lstrip("/")).removeprefix("./")] = m
        size = os.path.getsize(path)
        for m in members:
            if m.isfile() and m.offset_data + m.size > size:
                raise InvalidImage(f"{path}: truncated: member {m.name!r} runs past the end")

    def has(self, name: str) -> bool:
        return name in self._members

    def _member(self, name: str) -> tarfile.TarInfo:
        seen = 0
        current = posixpath.normpath(name).removeprefix("./")
        while True:
            m = self._members.get(current)
            if m is None:
                raise NotFound(f"{self.display}: no member {name!r} in the archive")
            if not (m.issym() or m.islnk()):
                return m
            seen += 1
            if seen > 16:
                raise InvalidImage(f"{self.display}: member {name!r}: too many levels of links")
            base = posixpath.dirname(current) if m.issym() else ""
            target = posixpath.normpath(posixpath.join(base, m.linkname))
            if target.startswith("../") or target == ".." or posixpath.isabs(m.linkname):
                raise InvalidImage(f"{self.display}: member {name!r} links outside the archive")
            current = target

    def read_file(self, name: str) -> bytes:
        m = self._member(name)
        if m.size > JSON_LIMIT:
            raise InvalidImage(f"{self.display}: {name} is {m.size} bytes, not a manifest")
        with _Slice(str(self.path), m.offset_data, m.size) as f:
            return f.read()

    def open_member(self, name: str) -> tuple[BinaryIO, int]:
        m = self._member(name)
        raw = _Slice(str(self.path), m.offset_data, m.size)
        return io.BufferedReader(raw, 1 << 20), m.size

    def open_blob(self, digest: Digest, size: int | None) -> BinaryIO:
        name = f"blobs/{digest.algorithm}/{digest.encoded}"
        if name not in self._members:
            raise NotFound(f"{self.display}: blob {digest} is missing from the archive")
        return self.open_member(name)[0]

    def read_manifest(self, desc: oci.Descriptor) -> bytes:
        return read_verified(self, desc, "manifest")

    def close(self) -> None:
        pass


def layers_from_manifest(
    store: BlobStore, manifest: oci.Manifest, config: oci.ImageConfig, what: str
) -> tuple[LayerRef, ...]:
    if len(config.diff_ids) != len(manifest.layers):
        raise InvalidImage(
            f"{what}: {len(manifest.layers)} layers but {len(config.diff_ids)} diff_ids"
        )
    commands = config.layer_commands(len(manifest.layers))
    out = []
    for i, (desc, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True)):
        out.append(
            LayerRef(
                index=i,
                digest=desc.digest,
                size_stored=desc.size,
                size_compressed=desc.size,
                media_type=desc.media_type,
                diff_id=diff_id,
                command=commands[i],
                open=functools.partial(store.open_blob, desc.digest, desc.size),
            )
        )
    return tuple(out)


def resolve_index(
    store: BlobStore,
    index: dict[str, object],
    *,
    ref: str,
    platform: oci.Platform,
    what: str,
) -> tuple[oci.Descriptor, oci.Manifest]:
    """Follow an index (nested indexes included) to the one image manifest asked for."""
    candidates = oci.parse_index(index, what)
    if not ref:
        named = {n for d in candidates for n in oci.names_of(d) if n}
        if len(named) > 1 and all(d.platform is None for d in candidates):
            raise UsageError(
                f"{what} holds several images ({', '.join(sorted(named))}); name one as {what}:NAME"
            )
    desc = oci.select(candidates, platform, what, ref)
    for _ in range(4):
        data = store.read_manifest(desc)
        doc = oci.load_json(data, f"{what} manifest {desc.digest.short}")
        media_type = oci.media_type_of(doc, desc.media_type)
        if media_type not in oci.INDEX_TYPES:
            return desc, oci.parse_manifest(doc, media_type, f"{what} manifest {desc.digest.short}")
        desc = oci.select(oci.parse_index(doc, what), platform, what)
    raise InvalidImage(f"{what}: indexes nested more than 4 deep")


def resolve_oci(
    store: OciDir | TarArchive, *, ref: str, platform: oci.Platform, kind: str
) -> ResolvedImage:
    what = store.display
    layout = oci.load_json(store.read_file("oci-layout"), f"{what} oci-layout")
    if not isinstance(layout.get("imageLayoutVersion"), str):
        raise InvalidImage(f"{what}: oci-layout has no imageLayoutVersion")
    index = oci.load_json(store.read_file("index.json"), f"{what} index.json")
    desc, manifest = resolve_index(store, index, ref=ref, platform=platform, what=what)
    config = _config(store, manifest, what)
    prefix = "oci" if kind == "oci-layout" else "oci-archive"
    return ResolvedImage(
        name=f"{what}{':' + ref if ref else ''}",
        kind=kind,
        manifest_digest=str(desc.digest),
        config=config,
        layers=layers_from_manifest(store, manifest, config, what),
        transport=f"{prefix}:{what}{':' + ref if ref else ''}",
    )


def _config(store: BlobStore, manifest: oci.Manifest, what: str) -> oci.ImageConfig:
    data = read_verified(store, manifest.config, "config")
    return oci.parse_config(oci.load_json(data, f"{what} config"), f"{what} config")


def resolve_docker_archive(archive: TarArchive, *, ref: str) -> ResolvedImage:
    what = archive.display
    try:
        entries = untrusted_json.parse(
            archive.read_file("manifest.json"), what=f"{what}: manifest.json"
        )
    except untrusted_json.JSONRejected as exc:
        raise InvalidImage(str(exc)) from None
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise InvalidImage(f"{what}: manifest.json must be a non-empty list of images")
    repo_tags = [_repo_tags(e, what) for e in entries]
    if ref:
        chosen = [e for e, tags in zip(entries, repo_tags, strict=True) if ref in tags]
        if not chosen:
            tags = sorted(t for ts in repo_tags for t in ts)
            raise NotFound(f"{what}: no image tagged {ref!r} (it has: {', '.join(tags)})")
        entry = chosen[0]
    elif len(entries) > 1:
        tags = sorted(t for ts in repo_tags for t in ts)
        raise UsageError(f"{what} holds {len(entries)} images ({', '.join(tags)}); name one")
    else:
        entry = entries[0]
    config_name, layers = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layers, list):
        raise InvalidImage(f"{what}: manifest.json entry needs Config and Layers")
    config_bytes = archive.read_file(config_name)
    config = oci.parse_config(oci.load_json(config_bytes, f"{what} config"), f"{what} config")
    if len(config.diff_ids) != len(layers):
        raise InvalidImage(f"{what}: {len(layers)} layers but {len(config.diff_ids)} diff_ids")
    commands = config.layer_commands(len(layers))
    refs = []
    for i, (name, diff_id) in enumerate(zip(layers, config.diff_ids, strict=True)):
        if not isinstance(name, str):
            raise InvalidImage(f"{what}: manifest.json layer {i} is not a path")
        _, size = archive.open_member(name)
        # Docker >= 25 stores layers as blobs named by their digest (possibly compressed);
        # the legacy layout stores the uncompressed tar, whose digest is the diff_id.
        blob = _blob_digest(name)
        refs.append(
            LayerRef(
                index=i,
                digest=blob if blob is not None else diff_id,
                size_stored=size,
                size_compressed=None,
                media_type="",
                diff_id=diff_id,
                command=commands[i],
                open=functools.partial(_member_stream, archive, name),
            )
        )
    tags = _repo_tags(entry, what)
    return ResolvedImage(
        name=f"{what}{':' + str(tags[0]) if tags else ''}",
        kind="docker-archive",
        manifest_digest="",
        config=config,
        layers=tuple(refs),
        transport=f"docker-archive:{what}{':' + ref if ref else ''}",
    )


def _repo_tags(entry: dict[str, object], what: str) -> list[str]:
    """An entry's ``RepoTags``: a list of strings (null or absent: none). A string would
    match a tag by substring, numbers would crash the sort of the tags shown."""
    tags = entry.get("RepoTags")
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidImage(f"{what}: manifest.json RepoTags must be a list of strings")
    return tags


def _member_stream(archive: TarArchive, name: str) -> BinaryIO:
    return archive.open_member(name)[0]


def _blob_digest(name: str) -> Digest | None:
    parts = posixpath.normpath(name).split("/")
    if len(parts) == 3 and parts[0] == "blobs":
        return Digest.parse(f"{parts[1]}:{parts[2]}")
    return None
