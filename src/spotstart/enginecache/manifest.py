"""The manifest published beside an archive: built from a pack, and checked (untrusted JSON,
bounded, key, format, HMAC, every field's type and bound) before a restore uses it. Pure: no
I/O."""

from __future__ import annotations

import hashlib
import hmac
import platform
import time
from typing import Any

from spotstart import untrusted_json
from spotstart.enginecache.archive import ArchiveRefused, FileEntry, Packed, check_name, is_sha256
from spotstart.enginecache.config import CacheKey, EngineCacheConfig
from spotstart.enginecache.key import canonical
from spotstart.errors import UsageError

FORMAT = "spotstart-engine-cache/1"
MAX_MANIFEST_BYTES = 16 << 20
MANIFEST_NAME = "manifest.json"
# The shortest HMAC key taken (the guard's CLI asks the same): b"" or a few bytes would be a
# check that whoever writes the bucket passes by guessing.
MIN_SECRET_BYTES = 16


def _usable(secret: bytes) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise UsageError(
            f"the engine cache secret is {len(secret)} bytes; at least {MIN_SECRET_BYTES} "
            "are needed (a short one is a guess away from a signed cache)"
        )
    return secret


def sign(doc: dict[str, Any], secret: bytes) -> str:
    """HMAC-SHA256 (hex) of the canonical manifest without its ``hmac``."""
    body = {k: v for k, v in doc.items() if k != "hmac"}
    return hmac.new(_usable(secret), canonical(body), hashlib.sha256).hexdigest()


def build(key: CacheKey, packed: Packed, secret: bytes | None) -> bytes:
    """The manifest of ``packed`` for ``key`` (signed when a secret is given)."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "key": key.digest,
        "key_parts": key.parts,
        "archive": {
            "name": f"{packed.sha256}.tar.zst",
            "size": packed.size,
            "sha256": packed.sha256,
        },
        "files": [
            {"path": f.path, "size": f.size, "sha256": f.sha256, "mode": f.mode}
            for f in packed.files
        ],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": platform.node()[:200],
    }
    if secret is not None:
        doc["hmac"] = sign(doc, secret)
    return canonical(doc)


def _int(value: object, what: str, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ArchiveRefused(f"manifest: {what} is not an integer in 0..{limit:,}")
    return value


def check(
    raw: bytes, key: CacheKey, config: EngineCacheConfig
) -> tuple[dict[str, Any], dict[str, FileEntry]]:
    """(the archive's {name, size, sha256}, its files by path) from manifest bytes, or
    :class:`ArchiveRefused` naming the first thing wrong."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArchiveRefused(f"manifest: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        doc = untrusted_json.parse(
            raw,
            what="manifest",
            max_values=max(untrusted_json.MAX_VALUES, 6 * config.max_files + 1000),
        )
    except untrusted_json.JSONRejected as exc:
        raise ArchiveRefused(str(exc)) from None
    if not isinstance(doc, dict):
        raise ArchiveRefused("manifest: not a JSON object")
    if doc.get("format") != FORMAT:
        raise ArchiveRefused(f"manifest: format {str(doc.get('format'))[:60]!r}, not {FORMAT!r}")
    if config.secret is not None:
        mac = doc.get("hmac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, sign(doc, config.secret)):
            raise ArchiveRefused(
                "manifest: no valid hmac for the configured secret (written by someone "
                "without it, or altered); refusing it"
            )
    if doc.get("key") != key.digest:
        raise ArchiveRefused(
            f"manifest: for key {str(doc.get('key'))[:64]!r}, not {key.digest}; refusing a "
            "cache of another engine, model or device"
        )
    archive = doc.get("archive")
    if not isinstance(archive, dict):
        raise ArchiveRefused("manifest: no archive")
    sha = archive.get("sha256")
    if not is_sha256(sha) or archive.get("name") != f"{sha}.tar.zst":
        raise ArchiveRefused("manifest: archive name/sha256 malformed")
    size = _int(archive.get("size"), "archive.size", config.max_bytes)
    files = doc.get("files")
    if not isinstance(files, list) or len(files) > config.max_files:
        raise ArchiveRefused(f"manifest: files missing or more than max_files {config.max_files:,}")
    out: dict[str, FileEntry] = {}
    dirs: set[str] = set()
    total = 0
    for f in files:
        if not isinstance(f, dict):
            raise ArchiveRefused("manifest: a file entry is not an object")
        path = check_name(f.get("path"))
        if path in out:
            raise ArchiveRefused(f"manifest: {ascii(path)[:120]} listed twice")
        # every directory a restore makes costs an inode and a block that max_bytes does not
        # count: no more of them than max_files (a file per directory 60 deep is refused)
        parent = path.rpartition("/")[0]
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
        if len(dirs) > config.max_files:
            raise ArchiveRefused(
                f"manifest: its files need more than max_files {config.max_files:,} directories"
            )
        fsize = _int(f.get("size"), f"{ascii(path)[:120]} size", config.max_bytes)
        total += fsize
        if total > config.max_bytes:
            raise ArchiveRefused(f"manifest: files total more than max_bytes {config.max_bytes:,}")
        if not is_sha256(f.get("sha256")):
            raise ArchiveRefused(f"manifest: {ascii(path)[:120]} sha256 malformed")
        mode = _int(f.get("mode"), f"{ascii(path)[:120]} mode", 0o7777)
        out[path] = FileEntry(path, fsize, str(f["sha256"]), mode)
    return {"name": archive["name"], "size": size, "sha256": sha}, out
