"""Where things go under DEST: which local path each object name maps to, and where spotstart
keeps its own working files (``DEST/.spotstart/``: part files, journals, the cache index), out
of reach of every object name. Object names are untrusted: a set of them either maps one to
one onto paths inside DEST, or is refused whole, before any byte moves. Pure, except
:func:`check_against_disk`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from spotstart.errors import LocalIOError, UsageError
from spotstart.store import ObjectInfo

STATE_DIR = ".spotstart"  # DEST/.spotstart: ours alone; no object may land there
PARTS_DIR = "parts"
PART_SUFFIX = ".part"
JOURNAL_SUFFIX = ".journal"
LOCK_SUFFIX = ".lock"  # beside them: held while one fetch writes the file (fetch/lock.py)
# Linux: a name is at most 255 bytes (NAME_MAX), a path at most 4095 (PATH_MAX less the NUL).
NAME_MAX_BYTES = 255
PATH_MAX_BYTES = 4095


class UnsafeNames(ValueError):
    """Object names that cannot each get a path of their own inside DEST; ``problems`` names
    each (key, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        first_key, first_why = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"object {first_key!r} {first_why}{more}")


def normalize(rel: str) -> str:
    """The local relative path of an object name: empty and ``.`` segments dropped. Raises
    ``ValueError`` for a name that no path inside DEST can hold."""
    if "\x00" in rel:
        raise ValueError("contains a NUL byte, which no file name can hold")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError("names no file (empty or only '/' and '.')")
    if any(p == ".." for p in parts):
        raise ValueError("has a '..' segment and would escape DEST")
    if parts[0] == STATE_DIR:
        raise ValueError(f"starts with {STATE_DIR}/, where spotstart keeps its own files")
    for p in parts:
        if len(p.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
            raise ValueError(f"has a segment longer than {NAME_MAX_BYTES} bytes")
    path = "/".join(parts)
    if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX_BYTES:
        raise ValueError(f"is longer than {PATH_MAX_BYTES} bytes as a path")
    return path


@dataclass(frozen=True)
class Placement:
    """One object's place: ``key`` as the store names it, ``rel`` its path under DEST."""

    key: str
    rel: str


def place(names: Iterable[tuple[str, str]]) -> list[Placement]:
    """Map (key, relative name) pairs to distinct local paths, or raise :class:`UnsafeNames`
    listing every name that cannot have one: unrepresentable names (see :func:`normalize`),
    two names on one path (``m/a`` and ``m//a``), and a name that is both a file and a
    directory (``x`` and ``x/y``).

    >>> [p.rel for p in place([("k/a", "a"), ("k/b/c", "b/c")])]
    ['a', 'b/c']
    """
    problems: list[tuple[str, str]] = []
    out: list[Placement] = []
    owner: dict[str, str] = {}
    for key, rel in names:
        try:
            path = normalize(rel)
        except ValueError as exc:
            problems.append((key, str(exc)))
            continue
        if path in owner:
            problems.append((key, f"lands on the same path as {owner[path]!r} ({path})"))
            continue
        owner[path] = key
        out.append(Placement(key, path))
    dirs: dict[str, str] = {}
    for p in out:
        segs = p.rel.split("/")
        for i in range(1, len(segs)):
            dirs.setdefault("/".join(segs[:i]), p.key)
    for p in out:
        if p.rel in dirs:
            problems.append(
                (p.key, f"is a file, but {dirs[p.rel]!r} needs {p.rel}/ to be a directory")
            )
    if problems:
        raise UnsafeNames(problems)
    return out


def check_against_disk(dest: Path, rels: Iterable[str]) -> list[tuple[str, str]]:
    """(rel, reason) for each path that what is already in DEST blocks: a directory where the
    file goes, or a file (or link) where one of its directories goes."""
    problems: list[tuple[str, str]] = []
    checked: dict[str, bool] = {}  # parent path -> usable as a directory
    for rel in rels:
        segs = rel.split("/")
        for i in range(1, len(segs)):
            parent = "/".join(segs[:i])
            if parent not in checked:
                p = dest / parent
                checked[parent] = not (p.is_symlink() or (p.exists() and not p.is_dir()))
            if not checked[parent]:
                problems.append((rel, f"{dest / parent} exists and is not a directory"))
                break
        else:
            final = dest / rel
            if final.is_dir() and not final.is_symlink():
                problems.append((rel, f"{final} exists and is a directory"))
    return problems


def work_paths(dest: Path, rel: str) -> tuple[Path, Path]:
    """(part file, journal) of the object that lands at ``dest/rel``: named by a hash of the
    path in DEST's own state directory, so no object name can collide with them and a long
    name does not grow past NAME_MAX with a suffix."""
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    base = dest / STATE_DIR / PARTS_DIR / digest
    return base.with_name(digest + PART_SUFFIX), base.with_name(digest + JOURNAL_SUFFIX)


def place_objects(
    objects: list[tuple[ObjectInfo, str]], root: Path, what: str
) -> list[tuple[ObjectInfo, str]]:
    """(object, local path under ``root``) for each object, before any byte moves:
    :class:`UsageError` when the names cannot each have a path of their own (see
    :func:`place`), :class:`LocalIOError` when something already in ``root`` is in the way.
    Fetch places into DEST, load into its cache directory; ``what`` names the source."""
    try:
        placements = place((info.key, rel) for info, rel in objects)
    except UnsafeNames as exc:
        raise UsageError(
            f"{what}: {exc}; nothing was fetched (leave such objects out with --exclude)"
        ) from exc
    blocked = check_against_disk(root, [p.rel for p in placements])
    if blocked:
        rel, why = blocked[0]
        more = f" (and {len(blocked) - 1} more)" if len(blocked) > 1 else ""
        raise LocalIOError(
            f"{root}: cannot place {rel}: {why}{more}; move it away or choose another "
            "directory (nothing was fetched)"
        )
    return [(info, p.rel) for (info, _), p in zip(objects, placements, strict=True)]
