"""What the engine cache is told (:class:`EngineCacheConfig`) and what it answers
(:class:`CacheKey`, :class:`Outcome`): plain frozen data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30
STATUSES = ("hit", "miss", "failed", "published", "exists", "skipped")


@dataclass(frozen=True)
class EngineCacheConfig:
    """Where the engine's compile caches live and travel.

    - ``url``: the bucket prefix (``s3://b/engine-cache``, ``gs://``, ``az://``, ``file://``;
      ``http(s)://`` restores only). Caches sit at ``url/<key>/manifest.json`` and
      ``url/<key>/<archive sha256>.tar.zst``.
    - ``root``: the local directory that holds every cache directory the engine is pointed at
      (``root/vllm``, ``root/inductor``, ...), the archives (``root/archives``) and the
      staging of a restore. Must be ours and writable by nobody else.
    - ``publish``: pack and publish after a miss (False: restore only).
    - ``key_extra``: strings the user adds to the key (what we cannot see: a model revision
      behind a path, a generic engine's setting in a file).
    - ``peers``/``peer_token``: as ``spotstart fetch --peers``/``--peer-token``.
    - ``secret``: HMAC key; when set, a manifest without a valid ``hmac`` is refused and every
      manifest we publish carries one.
    - ``max_bytes``/``max_files``: the most a cache may hold (pack refuses more; a restore
      refuses an archive or manifest that says more, and stops decompressing past it).
    """

    url: str
    root: Path
    publish: bool = True
    key_extra: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    peer_token: str | None = field(default=None, repr=False)
    secret: bytes | None = field(default=None, repr=False)
    max_bytes: int = 32 * GIB
    max_files: int = 200_000


@dataclass(frozen=True)
class CacheKey:
    """``digest``: SHA-256 (hex) of the canonical JSON of ``parts``; ``parts``: everything that
    can change what the engine compiles, readable (:func:`spotstart.enginecache.explain`)."""

    digest: str
    parts: dict[str, object]


@dataclass(frozen=True)
class Outcome:
    """What a restore or publish did. ``status``: ``hit`` (restored), ``miss`` (no cache for
    the key), ``failed`` (``reason`` says why; the cache directories are left empty),
    ``published``, ``exists`` (someone published this key first: theirs is kept),
    ``skipped`` (``reason`` says why: publish off, http(s) URL, too large...)."""

    status: str
    reason: str = ""
    bytes: int = 0
    files: int = 0
    seconds: float = 0.0
