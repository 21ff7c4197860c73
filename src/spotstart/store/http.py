"""Plain http(s):// sources: one object per URL. HEAD for size and validators (falling back to
a one-byte ranged GET where HEAD is refused), ranged GETs pinned with If-Range."""

from __future__ import annotations

import re

from spotstart.errors import SpotstartError
from spotstart.store import _http
from spotstart.store.base import Checksums, ObjectInfo, Sink


class HttpSource:
    """One URL. ``key`` is always the URL itself."""

    def __init__(self, url: str, options: _http.HttpOptions) -> None:
        self.url = url
        self._options = options
        self._session = _http.make_session(options)

    @property
    def display(self) -> str:
        return self.url

    async def stat(self, key: str) -> ObjectInfo:
        try:
            _, headers, _ = await _http.request_json_or_text(
                self._session, "HEAD", key, {"Accept-Encoding": "identity"}, key
            )
            size = headers.get("Content-Length")
            if size is None:
                raise SpotstartError(f"{key}: no Content-Length in HEAD")
        except SpotstartError as exc:
            if "not found" in str(exc) or "access denied" in str(exc):
                raise
            # Some servers (presigned GET-only URLs) refuse HEAD: ask for one byte instead.
            _, headers, _ = await _http.request_json_or_text(
                self._session,
                "GET",
                key,
                {"Range": "bytes=0-0", "Accept-Encoding": "identity"},
                key,
            )
            m = re.search(r"/(\d+)$", headers.get("Content-Range", ""))
            if not m:
                raise SpotstartError(f"{key}: cannot learn the object's size") from exc
            size = m.group(1)
        version = headers.get("ETag") or headers.get("Last-Modified") or ""
        checksums = Checksums()
        if "x-goog-hash" in headers:
            checksums = Checksums.from_goog_hash(headers["x-goog-hash"])
        # RFC 9110 14.3: a server that supports ranges may say so; one answering the probe
        # with 206 has shown it. Without either, ranged reads would be answered with 200.
        ranges = "bytes" in headers.get("Accept-Ranges", "").lower() or "Content-Range" in headers
        return ObjectInfo(
            key=key, size=int(size), version=version, checksums=checksums, ranges=ranges
        )

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return [await self.stat(self.url)]

    async def read(self, obj: ObjectInfo, start: int, length: int, sink: Sink) -> None:
        headers = {"If-Range": obj.version} if obj.version else {}
        await _http.stream_range(
            self._session,
            obj.key,
            headers,
            start,
            length,
            obj.size,
            sink,
            obj.key,
            self._options,
        )

    async def close(self) -> None:
        await self._session.close()
