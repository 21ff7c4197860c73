"""`spotstart image audit`: stream every layer of an image once, build its file system as the
layers do, and report per layer and per rule what the pull moves that serving does not need.

Example::

    report = audit("docker-archive:server.tar", options=AuditOptions())
    print(report.bytes_waste, [f.rule for f in report.findings])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from spotstart import untrusted_json
from spotstart.errors import NotFound, UsageError
from spotstart.image import oci, pull, rules
from spotstart.image.layer import LayerStats, layer_members, prefetched
from spotstart.image.sources import (
    BlobStore,
    OciDir,
    ResolvedImage,
    TarArchive,
    resolve_docker_archive,
    resolve_oci,
)
from spotstart.image.tree import MergedTree, Wasted


@dataclass(frozen=True)
class AuditOptions:
    platform: oci.Platform = field(default_factory=lambda: oci.Platform("linux", "amd64"))
    rules: rules.RuleOptions = field(default_factory=rules.RuleOptions)
    pull: pull.PullModel = field(default_factory=pull.PullModel)
    startup_paths: tuple[str, ...] = ()  # from a startup profile, in first-read order
    insecure_registry: bool = False  # plain http for a registry (127.0.0.1 is always allowed)


@dataclass(frozen=True)
class LayerReport:
    index: int
    digest: str
    compression: str
    bytes_compressed: int | None
    bytes_uncompressed: int
    bytes_wasted: int
    files: int
    command: str


@dataclass(frozen=True)
class StartupShare:
    files: int
    files_missing: int
    bytes_read: int
    bytes_read_compressed: int
    share_of_image: float
    lazy_pull_seconds: float


@dataclass(frozen=True)
class AuditReport:
    image: str
    kind: str
    platform: str
    manifest_digest: str
    layers: tuple[LayerReport, ...]
    findings: tuple[rules.Finding, ...]
    bytes_compressed: int
    bytes_uncompressed: int
    bytes_waste: int  # hidden by a later layer, or counted by a rule; each byte once
    bytes_waste_compressed: int  # the same, at each layer's compression ratio
    bytes_hidden: int  # overwritten or deleted by a later layer
    waste_ratio: float
    pull_seconds: float
    pull_seconds_without_waste: float
    startup: StartupShare | None
    top_wasted: tuple[Wasted, ...]
    notes: tuple[str, ...]
    model: pull.PullModel

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[int, int, int], None]  # layer index, layers, bytes read so far


@contextmanager
def open_image(ref: str, options: AuditOptions) -> Iterator[ResolvedImage]:
    """``ref``: ``docker-archive:FILE``, ``oci:DIR_OR_TAR[:NAME]``, ``oci-archive:FILE[:NAME]``,
    ``docker://HOST/REPO[:TAG|@DIGEST]``, a path (its kind found from its contents), or a
    registry reference."""
    store: BlobStore | None = None
    try:
        transport, _, rest = ref.partition(":")
        if transport == "docker" and rest.startswith("//"):
            store, image = _registry(rest[2:], options)
        elif transport in ("docker-archive", "oci-archive", "oci") and rest:
            path, name = _split_name(rest)
            store, image = _local(path, name, options, forced=transport)
        else:
            path, name = _split_name(ref)
            if path.exists():
                store, image = _local(path, name, options, forced="")
            elif "/" in ref or "." in ref.split("/")[0] or ":" not in ref:
                store, image = _registry(ref, options)
            else:
                raise NotFound(f"{ref}: no such file, and not a registry reference")
        yield image
    finally:
        if store is not None:
            store.close()


def _split_name(text: str) -> tuple[Path, str]:
    if Path(text).exists() or ":" not in text:
        return Path(text), ""
    path, _, name = text.rpartition(":")
    return Path(path), name


def _local(
    path: Path, name: str, options: AuditOptions, forced: str
) -> tuple[BlobStore, ResolvedImage]:
    if not path.exists():
        raise NotFound(f"{path}: no such file or directory")
    if path.is_dir():
        if forced in ("docker-archive", "oci-archive"):
            raise UsageError(f"{path} is a directory; {forced}: takes a tar file")
        store: OciDir | TarArchive = OciDir(path)
        return store, resolve_oci(store, ref=name, platform=options.platform, kind="oci-layout")
    archive = TarArchive(path)
    oci_inside = archive.has("oci-layout") and archive.has("index.json")
    docker_inside = archive.has("manifest.json")
    if forced == "docker-archive" or (not forced and docker_inside and not oci_inside):
        if not docker_inside:
            raise NotFound(f"{path}: no manifest.json: not a docker save archive")
        return archive, resolve_docker_archive(archive, ref=name)
    if not oci_inside:
        raise NotFound(
            f"{path}: neither an OCI layout (oci-layout, index.json) nor a docker save "
            "archive (manifest.json)"
        )
    return archive, resolve_oci(archive, ref=name, platform=options.platform, kind="oci-archive")


def _registry(ref: str, options: AuditOptions) -> tuple[BlobStore, ResolvedImage]:
    from spotstart.image.registry import open_registry_image

    return open_registry_image(ref, platform=options.platform, insecure=options.insecure_registry)


def audit(
    ref: str, options: AuditOptions | None = None, progress: ProgressFn | None = None
) -> AuditReport:
    """Audit one image; see the module docstring."""
    options = options or AuditOptions()
    with open_image(ref, options) as image:
        return audit_resolved(image, options, progress)


def scan(
    image: ResolvedImage, progress: ProgressFn | None = None
) -> tuple[MergedTree, list[LayerStats], list[int]]:
    """Stream every layer once into the merged tree: the tree, each layer's stats and file
    count."""
    tree = MergedTree()
    stats: list[LayerStats] = []
    files: list[int] = []
    read = 0
    for layer in image.layers:
        st = LayerStats()
        count = 0
        what = f"{image.name} layer {layer.index} ({layer.digest.short if layer.digest else '?'})"
        members = layer_members(
            layer.open,
            digest=layer.digest,
            size=layer.size_stored,
            diff_id=layer.diff_id,
            what=what,
            stats=st,
        )
        for entry in prefetched(members):
            tree.add(layer.index, entry)
            if entry.kind == "file":
                count += 1
        stats.append(st)
        files.append(count)
        read += st.bytes_stored
        if progress is not None:
            progress(layer.index, len(image.layers), read)
    return tree, stats, files


def compressed_sizes(image: ResolvedImage, stats: list[LayerStats]) -> list[int | None]:
    """Each layer's compressed size: the manifest's, or the stored blob's if it is
    compressed, else None (docker save's uncompressed layers)."""
    return [
        layer.size_compressed
        if layer.size_compressed is not None
        else (st.bytes_stored if st.compression != "none" else None)
        for layer, st in zip(image.layers, stats, strict=True)
    ]


def audit_resolved(
    image: ResolvedImage, options: AuditOptions, progress: ProgressFn | None = None
) -> AuditReport:
    tree, stats, files = scan(image, progress)
    return _report(image, tree, stats, files, options)


def _report(
    image: ResolvedImage,
    tree: MergedTree,
    stats: list[LayerStats],
    files: list[int],
    options: AuditOptions,
) -> AuditReport:
    compressed = compressed_sizes(image, stats)
    uncompressed = [st.bytes_uncompressed for st in stats]
    ratio = [
        (c / u if c is not None and u else 1.0)
        for c, u in zip(compressed, uncompressed, strict=True)
    ]
    findings, claimed = rules.evaluate(tree, options.rules, options.startup_paths)
    wasted_by_layer = [0] * len(image.layers)
    hidden_ids: set[int] = set()
    for inode in tree.inodes:
        if inode.links == 0 and inode.size:
            wasted_by_layer[inode.layer] += inode.size
            hidden_ids.add(id(inode))
    waste = waste_c = hidden = 0
    weights_c = weights_u = 0
    waste_by_layer = [0] * len(image.layers)  # hidden or counted: what a lean image drops
    for inode in tree.inodes:
        key = id(inode)
        if inode.links == 0:
            hidden += inode.size
        if key in hidden_ids or key in claimed:
            waste += inode.size
            waste_c += round(inode.size * ratio[inode.layer])
            waste_by_layer[inode.layer] += inode.size
        if claimed.get(key) == "baked-weights":
            weights_u += inode.size
            weights_c += round(inode.size * ratio[inode.layer])
    findings = [_with_weights_note(f, weights_c, weights_u, options.pull) for f in findings]
    total_c = sum(c if c is not None else u for c, u in zip(compressed, uncompressed, strict=True))
    total_u = sum(uncompressed)
    sizes_c = [c if c is not None else u for c, u in zip(compressed, uncompressed, strict=True)]
    lean_c = [
        max(0, c - round(w * r)) for c, w, r in zip(sizes_c, waste_by_layer, ratio, strict=True)
    ]
    lean_u = [max(0, u - w) for u, w in zip(uncompressed, waste_by_layer, strict=True)]
    layer_reports = tuple(
        LayerReport(
            index=layer.index,
            digest=str(layer.digest) if layer.digest else "",
            compression=st.compression,
            bytes_compressed=c,
            bytes_uncompressed=st.bytes_uncompressed,
            bytes_wasted=wasted_by_layer[layer.index],
            files=files[layer.index],
            command=layer.command,
        )
        for layer, st, c in zip(image.layers, stats, compressed, strict=True)
    )
    notes = list(tree.notes.samples)
    if tree.notes.unextractable:
        notes.append(
            f"{tree.notes.unextractable} member(s) no runtime can extract (a path looping "
            "through symlinks, or over PATH_MAX): unpacking this image fails; their bytes "
            "count as hidden waste"
        )
    if any(c is None for c in compressed):
        notes.append(
            "docker save stores layers uncompressed: compressed sizes (and pull times) are "
            "estimated as uncompressed; audit the registry copy for real figures"
        )
    return AuditReport(
        image=image.name,
        kind=image.kind,
        platform=str(image.config.platform),
        manifest_digest=image.manifest_digest,
        layers=layer_reports,
        findings=tuple(findings),
        bytes_compressed=total_c,
        bytes_uncompressed=total_u,
        bytes_waste=waste,
        bytes_waste_compressed=waste_c,
        bytes_hidden=hidden,
        waste_ratio=waste / total_u if total_u else 0.0,
        pull_seconds=pull.pull_seconds(sizes_c, uncompressed, options.pull),
        pull_seconds_without_waste=pull.pull_seconds(lean_c, lean_u, options.pull),
        startup=_startup(tree, options, ratio, total_u),
        top_wasted=tuple(sorted(tree.wasted, key=lambda w: -w.size)[:10]),
        notes=tuple(notes),
        model=options.pull,
    )


def _with_weights_note(
    f: rules.Finding, size_c: int, size_u: int, model: pull.PullModel
) -> rules.Finding:
    if f.rule != "baked-weights" or not size_u:
        return f
    as_layer = pull.pull_seconds([size_c], [size_u], model)
    fetched = pull.fetch_seconds(size_u, model)
    note = (
        f"as a layer: ~{as_layer:.1f} s to pull and unpack (one stream at {model.stream_mb_s:g} "
        f"MB/s, unpacked at {model.unpack_mb_s:g} MB/s); spotstart fetch: ~{fetched:.1f} s at "
        f"{model.bandwidth_mb_s:g} MB/s ({as_layer / fetched if fetched else 0:.1f}x faster)"
    )
    return replace(f, note=note)


def _startup(
    tree: MergedTree, options: AuditOptions, ratio: list[float], total_u: int
) -> StartupShare | None:
    if not options.startup_paths:
        return None
    seen: set[int] = set()
    read_u = read_c = missing = 0
    for path in options.startup_paths:
        node = tree.lookup(path)
        if node is None or node.inode is None:
            missing += node is None
            continue
        if id(node.inode) in seen:
            continue
        seen.add(id(node.inode))
        read_u += node.inode.size
        read_c += round(node.inode.size * ratio[node.inode.layer])
    return StartupShare(
        files=len(seen),
        files_missing=missing,
        bytes_read=read_u,
        bytes_read_compressed=read_c,
        share_of_image=read_u / total_u if total_u else 0.0,
        lazy_pull_seconds=pull.lazy_seconds(read_c, options.pull),
    )


@dataclass(frozen=True)
class RuleDelta:
    rule: str
    bytes_before: int
    bytes_after: int

    @property
    def bytes_delta(self) -> int:
        return self.bytes_after - self.bytes_before


@dataclass(frozen=True)
class Comparison:
    before: AuditReport
    after: AuditReport
    rules: tuple[RuleDelta, ...]
    layers_shared: int

    def to_json(self) -> dict[str, Any]:
        return {
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "rules": [{**asdict(r), "bytes_delta": r.bytes_delta} for r in self.rules],
            "layers_shared": self.layers_shared,
            "bytes_compressed_delta": self.after.bytes_compressed - self.before.bytes_compressed,
            "bytes_waste_delta": self.after.bytes_waste - self.before.bytes_waste,
            "pull_seconds_delta": self.after.pull_seconds - self.before.pull_seconds,
        }


def compare(before: AuditReport, after: AuditReport) -> Comparison:
    """What changed between two audits, per rule (``--against``)."""
    a = {f.rule: f.bytes for f in before.findings}
    b = {f.rule: f.bytes for f in after.findings}
    order = [f.rule for f in before.findings] + [f.rule for f in after.findings if f.rule not in a]
    digests = {layer.digest for layer in before.layers if layer.digest}
    shared = sum(1 for layer in after.layers if layer.digest in digests)
    return Comparison(
        before, after, tuple(RuleDelta(r, a.get(r, 0), b.get(r, 0)) for r in order), shared
    )


def read_profile_paths(path: str) -> tuple[str, ...]:
    """The startup paths of a profile written by `spotstart image profile` (its JSON)."""
    try:
        doc = untrusted_json.parse(Path(path).read_bytes(), what=path)
        return tuple(str(f["path"]) for f in doc["files"])
    except FileNotFoundError:
        raise NotFound(f"{path}: no such profile") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a spotstart image profile ({exc})") from None
