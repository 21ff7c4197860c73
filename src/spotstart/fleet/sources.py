"""Where `spotstart plan` reads its traces from: a local folder, or any URL `spotstart fetch`
reads (gs://, s3://, az://, http(s)://, file://), each trace fetched into spotstart's cache by
`spotstart.fetch` and read from there. The config loader asks this module for a trace's bytes;
the simulator never sees a path or a URL.

The attacker is whoever controls the URL's server (or wrote the config). Whatever they send,
plan reads at most ``MAX_TRACE_BYTES`` of a trace (an object that says it is larger is not
fetched; a file that is larger is not read), parses it as untrusted JSON, resolves every trace
beneath ``traces_dir`` (no absolute path, no ``..``, each URL path component quoted, no link
followed beneath a folder), and never reads a half-written file (fetch lands a file under its
final name only whole and checked). Fetch itself is held to one object of that size
(``FetchConfig.max_bytes``): a server that answers a small size to plan's stat and a large one
to fetch's is refused before the cache is written. The cache (and its ``traces/``) must be
ours and writable by nobody else. A ``sha256`` in the config pins a trace's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from spotstart import safefs
from spotstart.errors import (
    EndpointUnreachable,
    IntegrityError,
    LocalIOError,
    RetriesExceeded,
    SpotstartError,
    UsageError,
)
from spotstart.fleet.errors import ConfigError
from spotstart.fleet.traces import MAX_TRACE_BYTES, read_bounded

CACHE_ENV = "SPOTSTART_CACHE_DIR"
_LOG = logging.getLogger("spotstart.plan")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Offline, a trace fetched before is used as it is; unreachable is what makes us try that.
_OFFLINE = (EndpointUnreachable, RetriesExceeded)


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """spotstart's cache: ``$SPOTSTART_CACHE_DIR``, else ``$XDG_CACHE_HOME/spotstart``, else
    ``~/.cache/spotstart``."""
    e = os.environ if env is None else env
    if e.get(CACHE_ENV):
        return Path(e[CACHE_ENV]).expanduser()
    xdg = e.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path("~/.cache").expanduser()) / "spotstart"


def trace_relpath(rel: object, where: str) -> str:
    """``rel`` as a relative path beneath traces_dir, or :class:`ConfigError`: no absolute
    path, no ``..`` or ``.`` or empty component, no backslash or NUL, no ``.spotstart``
    (fetch's own files in a folder it fetched into: a trace named there would overwrite the
    cache index of the traces beside it)."""
    if not isinstance(rel, str) or not rel:
        raise ConfigError(f"{where}.trace: give the trace's path relative to traces_dir")
    parts = rel.split("/")
    if (
        rel.startswith("/")
        or "\\" in rel
        or "\0" in rel
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ConfigError(
            f"{where}.trace {rel!r}: must be a relative path beneath traces_dir (no leading "
            "'/', no '..', '.' or empty component, no backslash)"
        )
    if ".spotstart" in parts:
        raise ConfigError(
            f"{where}.trace {rel!r}: '.spotstart' is where spotstart keeps its own files (a "
            "fetched folder's cache index and parts); name a trace elsewhere"
        )
    return rel


def check_sha256(value: object, where: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ConfigError(f"{where}.sha256: expected 64 lowercase hex digits, got {value!r}")
    return value


@dataclass
class TraceSource:
    """``traces_dir`` resolved once for one config: a local folder (``root``) or a URL prefix
    (``url``) whose traces land in ``cache/traces/<hash of the URL>/``.

    Example::

        src = TraceSource.at("https://raw.githubusercontent.com/o/r/main/", Path("."))
        data = src.read("availability/x.json", "zones[0]")
    """

    root: Path | None = None
    url: str | None = None
    cache: Path | None = None
    # set when the URL could not be reached: the rest is read from what was fetched before
    unreachable: SpotstartError | None = field(default=None, init=False)

    @classmethod
    def at(
        cls, location: str | os.PathLike[str], base_dir: Path, cache: Path | None = None
    ) -> TraceSource:
        """``location``: a path (relative: to ``base_dir``), ``file://...``, or a URL fetch
        reads."""
        text = os.fspath(location)
        if "://" not in text:
            return cls(root=(base_dir / Path(text).expanduser()).absolute())
        from spotstart.store import parse_url

        try:
            parsed = parse_url(text)
        except UsageError as exc:
            raise ConfigError(f"traces_dir: {exc}") from None
        if parsed.scheme == "file":
            return cls(root=Path(parsed.key))
        if parsed.scheme in ("http", "https") and ("?" in text or "#" in text):
            raise ConfigError(f"traces_dir {text}: a folder URL has no query or fragment")
        return cls(url=text.rstrip("/") + "/", cache=cache)

    @property
    def display(self) -> str:
        return self.url if self.url is not None else str(self.root)

    def read(self, rel: str, where: str, sha256: str | None = None) -> tuple[bytes, str]:
        """(the bytes of trace ``rel``, what to call it in messages); fetched first when
        traces_dir is a URL. With ``sha256``, bytes that differ are an IntegrityError."""
        rel = trace_relpath(rel, where)
        if self.url is None:
            assert self.root is not None
            what = str(self.root / rel)
            data = _read_beneath(self.root, rel, what, where)
        else:
            data, what = self._fetched(rel, where)
        if sha256 is not None:
            got = hashlib.sha256(data).hexdigest()
            if got != sha256:
                raise IntegrityError(
                    f"{where}: {what}: sha256 {got} differs from the config's {sha256}; "
                    "the trace changed at its source (or in transit): check the source, or "
                    "update the config's sha256 if the change is expected"
                )
        return data, what

    def _url_of(self, rel: str, where: str) -> str:
        assert self.url is not None
        if self.url.split("://", 1)[0].lower() in ("http", "https"):
            # each component quoted: '%2e%2e', '?' or '#' in a name cannot leave the folder
            return self.url + "/".join(quote(p, safe="") for p in rel.split("/"))
        if "?" in rel or "#" in rel:
            # a bucket URL ends its key there: 'a.json?x' would fetch 'a.json' under another name
            raise ConfigError(
                f"{where}.trace {rel!r}: a '?' or '#' cannot be part of a {self.url} object's "
                "name; rename the trace"
            )
        return self.url + rel

    def _fetched(self, rel: str, where: str) -> tuple[bytes, str]:
        url = self._url_of(rel, where)
        key = hashlib.sha256(self.url.encode() if self.url else b"").hexdigest()[:16]
        root = self.cache or cache_root()
        folder = root / "traces" / key
        parent, _, _ = rel.rpartition("/")
        name = url.rsplit("/", 1)[-1]
        here = f"{parent}/{name}" if parent else name
        with _cache_lock(root, key, where):
            if self.unreachable is None:
                try:
                    asyncio.run(_fetch_one(url, folder / parent if parent else folder))
                except _OFFLINE as exc:
                    if safefs.stat_beneath(folder, here) is None:
                        raise _with_context(exc, where) from None
                    self.unreachable = exc
                    _LOG.warning(
                        "plan: %s unreachable (%s); using the traces fetched from it before, in %s",
                        self.url,
                        str(exc).split(";")[0],
                        folder,
                    )
                except SpotstartError as exc:
                    if isinstance(exc, ConfigError):
                        raise
                    raise _with_context(exc, where) from None
            elif safefs.stat_beneath(folder, here) is None:
                gone = self.unreachable
                raise _with_context(
                    type(gone)(
                        f"{url}: not fetched before, and {self.url} is unreachable ({gone})"
                    ),
                    where,
                ) from None
            return _read_beneath(folder, here, url, where), url


@contextlib.contextmanager
def _cache_lock(root: Path, key: str, where: str) -> Iterator[None]:
    """Hold ``traces/<key>.lock`` in the cache while fetching into and reading from
    ``traces/<key>/``. The cache itself and its traces/ must be ours alone: a user who may
    write the cache (or who made it, in /tmp) could swap traces/ for a link between this check
    and fetch's own resolving of DEST, and a root plan would write through it. The lock: two
    plans fetching the same trace at once (parallel CI jobs, a sweep beside the demo) raced
    in fetch's part files: exit 8 for some, and one read a trace of other bytes."""
    try:
        safefs.private_dir(root)
        traces = safefs.private_dir_fd(root, "traces")
        try:
            fd = safefs.open_beneath(
                traces, f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
            )
        finally:
            os.close(traces)
    except SpotstartError as exc:
        raise _with_context(exc, where) from None
    except OSError as exc:
        raise _with_context(
            LocalIOError(f"{root / 'traces' / key}.lock: cannot open it ({exc.strerror})"), where
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _with_context(
                LocalIOError(f"{root / 'traces' / key}.lock: not a regular file; remove it"),
                where,
            )
        fcntl.flock(fd, fcntl.LOCK_EX)  # a fetch of one trace: a second or so at most
        yield
    finally:
        os.close(fd)


def _with_context(exc: SpotstartError, where: str) -> SpotstartError:
    """The same kind of error (the same exit code), its message prefixed by the zone."""
    hint = (
        f"the cache: set ${CACHE_ENV} to a folder of yours"
        if isinstance(exc, LocalIOError)
        else "traces_dir / --traces-dir"
    )
    try:
        return type(exc)(f"{where}: {exc}; check {hint}")
    except TypeError:  # a constructor that wants more than a message: keep it as it is
        return exc


async def _fetch_one(url: str, dest: Path) -> None:
    """Stat ``url`` (refused when it says it is larger than a trace may be), then fetch it
    into ``dest`` with the ordinary fetch: checked as fetch checks everything, cached (a
    rerun whose object is unchanged copies nothing), a file under its name only whole."""
    from spotstart.fetch import FetchConfig, Retry, fetch_async
    from spotstart.store import HttpOptions, open_source, parse_url

    parsed = parse_url(url)
    source = open_source(parsed, HttpOptions())
    try:
        info = await source.stat(parsed.key)
    finally:
        await source.close()
    if info.size > MAX_TRACE_BYTES:
        raise ConfigError(
            f"{url}: {info.size:,} bytes, more than the {MAX_TRACE_BYTES >> 20} MiB a trace may "
            "hold; is it a trace file?"
        )
    # fetch holds its own stat to the limit too: a server that answered the stat above with
    # a small size and fetch's with a large one is refused before the cache is written
    config = FetchConfig(retry=Retry(max_attempts=3), max_bytes=MAX_TRACE_BYTES, max_objects=1)
    report = await fetch_async(url, dest, config)
    if report.files_total != 1:
        raise ConfigError(f"{url}: names {report.files_total} objects, not one trace file")


def _read_beneath(root: Path, rel: str, what: str, where: str) -> bytes:
    """The bytes of ``rel`` beneath ``root``, no link followed in any component, bounded."""
    try:
        fd = safefs.open_beneath(root, rel, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        if not root.is_dir():
            raise ConfigError(
                f"{where}: traces_dir {root}: folder not found; check traces_dir / --traces-dir"
            ) from None
        raise ConfigError(
            f"{where}: {what}: trace file not found; check traces_dir / --traces-dir"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{where}: {what}: cannot read beneath traces_dir ({exc.strerror}; traces are read "
            "with no symbolic link followed)"
        ) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{where}: {what}: not a regular file")
        return read_bounded(f, what)
