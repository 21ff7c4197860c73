"""The image's file system as its layers build it, with the bytes each layer pulls that the
final image no longer shows (pure; fed one tar member at a time).

The OCI image spec's layer rules, exactly (image-layer.md):
- ``.wh.NAME`` hides NAME (and all below it) of the layers beneath; ``.wh..wh..opq`` in a
  directory hides everything the layers beneath put there. Neither hides what its own layer
  adds, before or after it in the archive; neither is itself a file of the image.
- A member replaces what lies at its path: a file over anything, a directory over a
  non-directory; a directory over a directory merges.
- A hardlink is one more name for an inode: its bytes are wasted only when no name of it is
  left. Parent components that are symlinks are followed inside the root, as containerd's
  extraction does; ``..`` never climbs above the root.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from spotstart.errors import UnsupportedImage
from spotstart.image.tarscan import TarEntry

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_MAX_LINKS = 40  # Linux's MAXSYMLINKS
PATH_MAX = 4096  # Linux's: a longer name or link target cannot be extracted (ENAMETOOLONG)
# The tree holds about 450 bytes for each member it was fed (its node, its inode, the name):
# members are what bounds its memory, not bytes (a 60 MiB gzip layer of empty files holds
# 10 million of them: 4.5 GB). The largest images seen hold well under a million files.
MAX_MEMBERS = 3_000_000  # ~1.4 GB


class Unextractable(Exception):
    """A path the kernel would refuse (ELOOP, ENAMETOOLONG); internal to the tree."""


@dataclass(slots=True)
class Inode:
    """The bytes one file member stores. ``links``: names in the current view."""

    layer: int
    size: int
    path: str
    seq: int = 0  # the member's place in the whole image, in archive order
    links: int = 1


@dataclass(slots=True)
class Node:
    kind: str  # "file", "dir", "symlink", "other"
    layer: int  # the layer that last wrote this entry
    inode: Inode | None = None
    target: str = ""
    children: dict[str, Node] | None = None


@dataclass(frozen=True, slots=True)
class Wasted:
    """Bytes a layer pulls that a later layer hid: ``by`` which layer, ``how`` overwritten or
    deleted (or ``unreachable``: a member no runtime can extract, ``by`` its own layer)."""

    path: str
    layer: int
    size: int
    by: int
    how: str


@dataclass
class TreeNotes:
    escaped_names: int = 0  # members whose names climbed above the root with ".."
    dangling_hardlinks: int = 0
    hidden_whiteouts: int = 0  # whiteouts of things that did not exist (harmless)
    unextractable: int = 0  # members no runtime can extract: symlink loops, over PATH_MAX
    samples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.samples) < 20:
            self.samples.append(text)


def split(name: str) -> list[str]:
    """A member name as path segments under the root: ``./``, ``/`` and ``.`` dropped,
    ``..`` resolved without ever leaving the root."""
    out: list[str] = []
    for seg in name.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return out


class MergedTree:
    """Apply layers in order with :meth:`add`; read the result from :attr:`inodes` (every
    file's bytes as pulled, ``links == 0`` meaning hidden) and :attr:`wasted`."""

    def __init__(self) -> None:
        self.root = Node("dir", -1, children={})
        self.inodes: list[Inode] = []
        self.wasted: list[Wasted] = []
        self.notes = TreeNotes()
        self.members = 0

    # -- the view --------------------------------------------------------------------------

    def lookup(self, path: str, *, follow: bool = True) -> Node | None:
        """The node at an absolute or relative path of the final view, symlinks followed."""
        try:
            found = self._resolve(split(path), create=False, layer=-1, follow_last=follow)
        except Unextractable:
            return None
        return found[0] if found else None

    def walk(self) -> Iterator[tuple[str, Node]]:
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            prefix, node = stack.pop()
            for name, child in (node.children or {}).items():
                path = f"{prefix}/{name}"
                yield path, child
                if child.children is not None:
                    stack.append((path, child))

    # -- applying a layer ------------------------------------------------------------------

    def add(self, layer: int, entry: TarEntry) -> None:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise UnsupportedImage(
                f"layer {layer}: the image's layers hold over {MAX_MEMBERS:,} members; refused "
                "(the merged tree would need gigabytes of memory)"
            )
        if len(entry.name) > PATH_MAX or len(entry.linkname) > PATH_MAX:
            self.notes.unextractable += 1
            self._unreachable(layer, entry, f"its name or link target is over {PATH_MAX} bytes")
            return
        segs = split(entry.name)
        if ".." in entry.name.split("/"):
            self.notes.escaped_names += 1
            self.notes.note(f"layer {layer}: member {entry.name!r} uses '..'")
        if not segs:
            return  # the root itself ("./")
        base = segs[-1]
        try:
            parent_found = self._resolve(segs[:-1], create=True, layer=layer, follow_last=True)
        except Unextractable as exc:
            self.notes.unextractable += 1
            self._unreachable(layer, entry, str(exc))
            return
        assert parent_found is not None  # with create, every component exists
        parent, parent_path = parent_found
        assert parent.children is not None
        prefix = "/" + "/".join(parent_path) if parent_path else ""
        if base == OPAQUE:
            for name, child in list(parent.children.items()):
                self._hide(parent, name, child, f"{prefix}/{name}", layer, keep_layer=layer)
            return
        if base.startswith(WHITEOUT):
            if base.startswith(WHITEOUT + WHITEOUT):
                return  # other .wh..wh. names are reserved (AUFS metadata): not files
            name = base[len(WHITEOUT) :]
            hidden = parent.children.get(name)
            if hidden is None:
                self.notes.hidden_whiteouts += 1
                return
            self._hide(parent, name, hidden, f"{prefix}/{name}", layer, keep_layer=layer)
            return
        path = f"{prefix}/{base}"
        existing = parent.children.get(base)
        if entry.kind == "dir":
            if existing is not None and existing.kind == "dir":
                existing.layer = layer
                return
            if existing is not None:
                self._drop(existing, path, layer, "overwritten")
            parent.children[base] = Node("dir", layer, children={})
            return
        if existing is not None:
            self._drop(existing, path, layer, "overwritten")
        if entry.kind == "file":
            inode = Inode(layer, entry.size, path, len(self.inodes))
            self.inodes.append(inode)
            parent.children[base] = Node("file", layer, inode=inode)
        elif entry.kind == "symlink":
            parent.children[base] = Node("symlink", layer, target=entry.linkname)
        elif entry.kind == "hardlink":
            try:
                found = self._resolve(
                    split(entry.linkname), create=False, layer=layer, follow_last=False
                )
            except Unextractable:
                found = None
            target = found[0] if found else None
            if target is not None and target.kind == "file" and target.inode is not None:
                target.inode.links += 1
                parent.children[base] = Node("file", layer, inode=target.inode)
            elif target is not None and target.kind != "dir":
                parent.children[base] = Node(target.kind, layer, target=target.target)
            else:
                self.notes.dangling_hardlinks += 1
                self.notes.note(f"layer {layer}: hardlink {path} -> {entry.linkname!r} not found")
                inode = Inode(layer, 0, path)
                self.inodes.append(inode)
                parent.children[base] = Node("file", layer, inode=inode)
        else:
            parent.children[base] = Node("other", layer)

    def _unreachable(self, layer: int, entry: TarEntry, why: str) -> None:
        """A member no runtime can extract (containerd stops with ELOOP or ENAMETOOLONG):
        noted, and its bytes counted as pulled but never seen."""
        shown = entry.name if len(entry.name) <= 200 else entry.name[:200] + "..."
        self.notes.note(f"layer {layer}: member {shown!r}: {why}; a runtime cannot extract it")
        if entry.kind == "file":
            path = "/" + "/".join(split(shown))
            inode = Inode(layer, entry.size, path, len(self.inodes), links=0)
            self.inodes.append(inode)
            if entry.size:
                self.wasted.append(Wasted(path, layer, entry.size, layer, "unreachable"))

    def _hide(
        self, parent: Node, name: str, child: Node, path: str, layer: int, keep_layer: int
    ) -> None:
        """Whiteout/opaque semantics: what ``keep_layer`` itself wrote stays. Iterative: a
        layer may nest directories deeper than Python's recursion limit."""
        stack = [(parent, name, child, path)]
        while stack:
            parent, name, child, path = stack.pop()
            assert parent.children is not None
            if child.layer != keep_layer:
                self._drop(child, path, layer, "deleted")
                del parent.children[name]
            elif child.children is not None:  # a directory this layer wrote into: prune below
                stack.extend((child, k, g, f"{path}/{k}") for k, g in list(child.children.items()))

    def _drop(self, node: Node, path: str, by: int, how: str) -> None:
        stack = [(path, node)]
        while stack:
            p, n = stack.pop()
            if n.inode is not None:
                n.inode.links -= 1
                if n.inode.links == 0 and n.inode.size:
                    self.wasted.append(Wasted(n.inode.path, n.inode.layer, n.inode.size, by, how))
            if n.children:
                stack.extend((f"{p}/{k}", c) for k, c in n.children.items())

    def _resolve(
        self, segs: list[str], *, create: bool, layer: int, follow_last: bool
    ) -> tuple[Node, list[str]] | None:
        """Walk ``segs`` from the root, following symlinks in the root's terms. With
        ``create``, missing or non-directory parents become directories of ``layer`` (and
        the directories walked count as written by it). Raises :class:`Unextractable` where
        the kernel would stop: over ``_MAX_LINKS`` links (ELOOP), a resolved path over
        ``PATH_MAX`` (ENAMETOOLONG); the second also bounds the directories one call makes."""
        todo = list(reversed(segs))
        nodes: list[Node] = [self.root]  # the directories walked; nodes[-1] is where we are
        path: list[str] = []
        length = 0  # of "/" + "/".join(path)
        hops = 0
        while todo:
            seg = todo.pop()
            node = nodes[-1]
            if seg == "..":
                if path:
                    length -= len(path.pop()) + 1
                    nodes.pop()
                continue
            assert node.children is not None
            child = node.children.get(seg)
            last = not todo
            if child is not None and child.kind == "symlink" and (follow_last or not last):
                hops += 1
                if hops > _MAX_LINKS:
                    raise Unextractable(
                        f"its path loops through symlinks (over {_MAX_LINKS} links)"
                    )
                if child.target.startswith("/"):
                    nodes, path, length = [self.root], [], 0
                todo.extend(reversed([s for s in child.target.split("/") if s not in ("", ".")]))
                continue
            if length + len(seg) + 1 > PATH_MAX:
                raise Unextractable(f"its path resolves to over {PATH_MAX} bytes")
            if child is None or (child.children is None and (create or not last)):
                if not create:
                    return None if child is None or not last else (child, [*path, seg])
                if child is not None:
                    self._drop(child, "/" + "/".join([*path, seg]), layer, "overwritten")
                child = Node("dir", layer, children={})
                node.children[seg] = child
            elif create and child.children is not None:
                child.layer = layer
            nodes.append(child)
            path.append(seg)
            length += len(seg) + 1
        return nodes[-1], path
