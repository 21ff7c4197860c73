"""Plain http(s):// sources: one object per URL. HEAD gives the size, validators and checksums;
a one-byte ranged GET proves that the server honours ranges (and gives the size where HEAD is
refused). Ranged GETs are pinned with If-Range. URLs are sent byte for byte as given."""

from __future__ import annotations

import re
from collections.abc import Mapping

from spotstart.errors import AccessDenied, NotFound, ObjectChanged, SpotstartError, TransientError
from spotstart.store import _http
from spotstart.store._direct import RangeRequest
from spotstart.store.base import Checksums, ObjectInfo, Sink

_TOTAL = re.compile(r"bytes \d+-\d+/(\d+)")


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
        head: Mapping[str, str] | None = None
        try:
            _, head, _ = await _http.request_json_or_text(
                self._session,
                "HEAD",
                key,
                {"Accept-Encoding": "identity"},
                key,
                stall_timeout_s=self._options.stall_timeout_s,
            )
        except (NotFound, AccessDenied, TransientError):
            raise  # transient: the caller retries the whole stat (HEAD carries the checksums)
        except SpotstartError:
            head = None  # some servers (presigned GET-only URLs) refuse HEAD
        # A server may advertise Accept-Ranges and still answer a ranged GET with 200 (some
        # CDNs and proxies): only a 206 to a real ranged GET shows that ranges work.
        pinned = _validator(head) if head is not None else ""
        try:
            status, probe = await _http.probe_range(
                self._session, key, key, pinned, stall_timeout_s=self._options.stall_timeout_s
            )
        except (NotFound, AccessDenied, TransientError):
            raise  # a transient failure: the caller retries the whole stat
        except SpotstartError:
            if head is None:
                raise
            status, probe = 0, {}  # refused (405), or 416 for an empty object
        now = probe.get("ETag") or probe.get("Last-Modified") or ""
        if status == 200 and pinned and now and now.removeprefix("W/") != pinned:
            raise ObjectChanged(
                f"{key}: the object changed while being read (now {now}, was {pinned}); rerun"
            )
        size: int | None = None
        if head is not None and head.get("Content-Length", "").isdigit():
            size = int(head["Content-Length"])
        elif status == 206 and (m := _TOTAL.fullmatch(probe.get("Content-Range", "").strip())):
            size = int(m.group(1))
        elif status == 200 and probe.get("Content-Length", "").isdigit():
            size = int(probe["Content-Length"])
        if size is None:
            raise SpotstartError(f"{key}: cannot learn the object's size (no Content-Length)")
        ranges = status == 206
        return _info(key, size, head if head is not None else probe, ranges=ranges)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return [await self.stat(self.url)]

    async def range_request(self, obj: ObjectInfo, start: int, length: int) -> RangeRequest:
        """The ranged GET of the URL pinned with If-Range, for the direct reader."""
        headers = {"If-Range": obj.version} if obj.version else {}
        return RangeRequest(obj.key, headers, obj.key, pinned=obj.version or None)

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


def _validator(headers: Mapping[str, str]) -> str:
    # A weak ETag cannot pin ranges (RFC 9110 13.1.5: If-Range needs a strong validator).
    etag = headers.get("ETag", "")
    return etag if etag and not etag.startswith("W/") else headers.get("Last-Modified", "")


def _info(key: str, size: int, headers: Mapping[str, str], *, ranges: bool) -> ObjectInfo:
    version = _validator(headers)
    checksums = Checksums()
    if "x-goog-hash" in headers:
        checksums = Checksums.from_goog_hash(headers["x-goog-hash"])
    return ObjectInfo(key=key, size=size, version=version, checksums=checksums, ranges=ranges)
