"""OCI image-spec and Docker manifest v2 documents: media types, descriptors, indexes,
manifests and configs, parsed and checked (pure; no I/O). Manifests are untrusted input: every
field used is type-checked and every digest is checked against the spec's grammar."""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from spotstart import untrusted_json
from spotstart.errors import InvalidImage, NotFound, UnsupportedImage, UsageError
from spotstart.image.digest import Digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
# Layer media types and the compression each names; the bytes' magic decides in the end.
LAYER_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"--platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(_platform.machine(), "amd64")
        return cls("linux", arch)

    def matches(self, other: Platform) -> bool:
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        # arm64 images usually carry variant v8 or none: an unset variant matches either.
        return not self.variant or not other.variant or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class HistoryEntry:
    created_by: str
    empty_layer: bool
    comment: str = ""


@dataclass(frozen=True)
class ImageConfig:
    diff_ids: tuple[Digest, ...]
    history: tuple[HistoryEntry, ...]
    platform: Platform
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""

    def layer_commands(self, count: int) -> list[str]:
        """The command that made each layer: history entries that are not ``empty_layer``, in
        order (image-spec config.md). Fewer entries than layers leaves the rest unknown."""
        made = [h.created_by or h.comment for h in self.history if not h.empty_layer]
        return [made[i] if i < len(made) else "" for i in range(count)]


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """A manifest, index or config as a JSON object; InvalidImage if it is malformed, nests
    absurdly deep or holds NaN (checked before it is parsed: :mod:`spotstart.untrusted_json`)."""
    if data[:3] == b"\xef\xbb\xbf":
        data = data[3:]  # a UTF-8 byte order mark, as json.loads(bytes) always allowed
    try:
        doc = untrusted_json.parse(data, what=what)
    except untrusted_json.JSONRejected as exc:
        raise InvalidImage(str(exc)) from None
    if not isinstance(doc, dict):
        raise InvalidImage(f"{what}: a JSON object was expected")
    return doc


def _str(obj: dict[str, Any], key: str, what: str, *, required: bool = True) -> str:
    value = obj.get(key, "" if not required else None)
    if not isinstance(value, str):
        raise InvalidImage(f"{what}: {key!r} missing or not a string")
    return value


def parse_descriptor(obj: object, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise InvalidImage(f"{what}: a descriptor must be an object")
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidImage(f"{what}: descriptor size missing or negative")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise InvalidImage(f"{what}: annotations must map strings to strings")
    plat = None
    if isinstance(obj.get("platform"), dict):
        p = obj["platform"]
        plat = Platform(
            str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant", ""))
        )
    urls = obj.get("urls") or []
    return Descriptor(
        media_type=_str(obj, "mediaType", what),
        digest=Digest.parse(obj.get("digest")),
        size=size,
        annotations=dict(annotations),
        platform=plat,
        urls=tuple(u for u in urls if isinstance(u, str)),
    )


def media_type_of(doc: dict[str, Any], declared: str) -> str:
    """A manifest's type: its own mediaType field, else the descriptor's or the response's
    when that names a manifest or index type, else its shape (OCI lets mediaType be absent,
    and static servers answer text/plain or octet-stream)."""
    own = doc.get("mediaType")
    if isinstance(own, str) and own:
        return own
    if declared in (*MANIFEST_TYPES, *INDEX_TYPES, *DOCKER_SCHEMA1):
        return declared
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    return declared or "unknown"


def parse_index(doc: dict[str, Any], what: str) -> list[Descriptor]:
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidImage(f"{what}: an index needs a 'manifests' list")
    return [parse_descriptor(m, f"{what} manifests[{i}]") for i, m in enumerate(manifests)]


def parse_manifest(doc: dict[str, Any], media_type: str, what: str) -> Manifest:
    if media_type in DOCKER_SCHEMA1:
        raise UnsupportedImage(
            f"{what}: Docker schema 1 manifest (deprecated since 2017); re-push the image"
        )
    if media_type not in MANIFEST_TYPES:
        raise UnsupportedImage(f"{what}: unknown manifest media type {media_type!r}")
    config = parse_descriptor(doc.get("config"), f"{what} config")
    if config.media_type not in CONFIG_TYPES:
        raise UnsupportedImage(
            f"{what}: config media type {config.media_type!r} is not an image config "
            "(an artifact, not a container image)"
        )
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidImage(f"{what}: a manifest needs a 'layers' list")
    parsed = tuple(parse_descriptor(x, f"{what} layers[{i}]") for i, x in enumerate(layers))
    for layer in parsed:
        if layer.media_type not in LAYER_TYPES:
            raise UnsupportedImage(
                f"{what}: layer {layer.digest.short} has media type {layer.media_type!r} "
                "(not a tar, tar+gzip or tar+zstd layer; encrypted layers are not read)"
            )
    return Manifest(media_type, config, parsed)


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def parse_config(doc: dict[str, Any], what: str) -> ImageConfig:
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise InvalidImage(f"{what}: config has no rootfs.diff_ids")
    diff_ids = tuple(Digest.parse(d) for d in rootfs["diff_ids"])
    history = []
    entries = doc.get("history")
    for h in entries if isinstance(entries, list) else []:  # a number was a TypeError
        if isinstance(h, dict):
            history.append(
                HistoryEntry(
                    str(h.get("created_by", "")),
                    bool(h.get("empty_layer", False)),
                    str(h.get("comment", "")),
                )
            )
    cfg = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    assert isinstance(cfg, dict)
    return ImageConfig(
        diff_ids=diff_ids,
        history=tuple(history),
        platform=Platform(
            str(doc.get("os", "")), str(doc.get("architecture", "")), str(doc.get("variant", ""))
        ),
        entrypoint=_strings(cfg.get("Entrypoint")),
        cmd=_strings(cfg.get("Cmd")),
        env=_strings(cfg.get("Env")),
        working_dir=str(cfg.get("WorkingDir") or ""),
    )


def names_of(desc: Descriptor) -> set[str]:
    names = {desc.annotations.get(REF_NAME, ""), desc.annotations.get(CONTAINERD_NAME, "")}
    return {n for n in names if n}


def select(
    candidates: list[Descriptor], platform: Platform, what: str, ref: str = ""
) -> Descriptor:
    """The descriptor to follow in an index: by ref name when one is asked for, then by
    platform among image manifests (nested indexes are followed by the caller)."""
    if ref:
        named = [
            d
            for d in candidates
            if ref in names_of(d) or any(n.endswith((":" + ref, "/" + ref)) for n in names_of(d))
        ]
        if not named:
            known = sorted(n for d in candidates for n in names_of(d))
            raise NotFound(f"{what}: no image named {ref!r} (it has: {', '.join(known) or 'none'})")
        candidates = named
    if len(candidates) == 1 and (
        candidates[0].platform is None or candidates[0].media_type in INDEX_TYPES
    ):
        return candidates[0]
    fitting = [
        d
        for d in candidates
        if d.media_type in INDEX_TYPES
        or (d.platform is not None and platform.matches(d.platform))
        or (d.platform is None and d.media_type in MANIFEST_TYPES)
    ]
    # Attestation manifests (buildx) say platform unknown/unknown: never an image to audit.
    fitting = [d for d in fitting if d.platform is None or d.platform.os != "unknown"]
    if not fitting:
        have = sorted({str(d.platform) for d in candidates if d.platform is not None})
        raise NotFound(
            f"{what}: no image for platform {platform} (it has: {', '.join(have) or 'none'}); "
            "pick one with --platform"
        )
    return fitting[0]
