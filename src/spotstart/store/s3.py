"""Amazon S3 and S3-compatible stores: ListObjectsV2, HEAD with checksum mode, ranged GETs
pinned with If-Match. Credentials and region through botocore's own chain (env, shared
config/credentials profiles, SSO, container and instance metadata), signing with botocore's
SigV4; endpoint from --endpoint, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL as the AWS CLI does."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from spotstart.errors import (
    CredentialsNotFound,
    EndpointUnreachable,
    IntegrityError,
    NotFound,
    ProtocolError,
    SpotstartError,
    TransientError,
)
from spotstart.store import _http
from spotstart.store._direct import RangeRequest
from spotstart.store.base import Checksums, CrcScope, ObjectInfo, Sink

# S3 allows 10,000 parts; asking each part's size is one HEAD each: beyond this many parts the
# object is verified by size (and the other checksums) only.
MAX_PARTS_LOOKED_UP = 2000
_CRED_HINT = (
    "; no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or run on an instance with a role"
)
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def resolve_endpoint(explicit: str | None, region: str, env: Mapping[str, str]) -> tuple[str, bool]:
    """(base URL, path-style?) the way the AWS CLI resolves it."""
    custom = explicit or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if custom:
        return custom.rstrip("/"), True
    return f"https://s3.{region}.amazonaws.com", False


class S3Source:
    """One S3 bucket."""

    def __init__(
        self,
        bucket: str,
        options: _http.HttpOptions,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        env: Mapping[str, str] | None = None,
        anonymous: bool = False,
    ) -> None:
        import botocore.session

        self.bucket = bucket
        self._env = os.environ if env is None else env
        self._botocore = botocore.session.get_session()
        self._region = (
            region
            or self._env.get("AWS_REGION")
            or self._env.get("AWS_DEFAULT_REGION")
            or self._botocore.get_config_variable("region")
            or "us-east-1"
        )
        self._explicit_endpoint = endpoint
        self._base, self._path_style = resolve_endpoint(endpoint, self._region, self._env)
        ca = self._env.get("AWS_CA_BUNDLE") if self._base.startswith("https") else None
        self._options = options if options.ca_bundle or not ca else _with_ca(options, ca)
        self._session = _http.make_session(self._options)
        self._credentials: Any = None
        self._creds_checked = anonymous
        self._anonymous = anonymous
        self._creds_lock = asyncio.Lock()

    @property
    def display(self) -> str:
        return f"s3://{self.bucket}"

    def _url(self, key: str, query: str = "") -> str:
        q = f"?{query}" if query else ""
        k = quote(key, safe="/~")
        if self._path_style:
            return f"{self._base}/{self.bucket}/{k}{q}"
        scheme, host = self._base.split("://", 1)
        return f"{scheme}://{self.bucket}.{host}/{k}{q}"

    async def _signed(
        self, method: str, url: str, extra: Mapping[str, str], payload_sha256: str = EMPTY_SHA256
    ) -> dict[str, str]:
        async with self._creds_lock:
            if not self._creds_checked:
                self._credentials = await asyncio.to_thread(self._load_credentials)
                self._creds_checked = True
        headers = dict(extra)
        headers["x-amz-content-sha256"] = payload_sha256
        if self._credentials is None:
            return headers  # anonymous: public buckets work; 403 names the fix
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        frozen = await asyncio.to_thread(self._credentials.get_frozen_credentials)
        request = AWSRequest(method=method, url=url, headers=headers)
        S3SigV4Auth(frozen, "s3", self._region).add_auth(request)
        return dict(request.headers.items())

    def _load_credentials(self) -> Any:
        import botocore.exceptions

        try:
            return self._botocore.get_credentials()
        except botocore.exceptions.BotoCoreError as exc:  # e.g. a profile that doesn't exist
            raise CredentialsNotFound(f"{self.display}: {exc}") from exc

    def _hint(self) -> str:
        if self._anonymous:
            return "; the request was unsigned (--anonymous): drop it to use credentials"
        return _CRED_HINT if self._credentials is None else ""

    async def _request(
        self,
        method: str,
        url: str,
        what: str,
        extra: Mapping[str, str],
        data: bytes | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        digest = hashlib.sha256(data).hexdigest() if data is not None else EMPTY_SHA256
        headers = await self._signed(method, url, extra, digest)
        try:
            return await _http.request_json_or_text(
                self._session,
                method,
                url,
                headers,
                what,
                hint=self._hint(),
                data=data,
                stall_timeout_s=self._options.stall_timeout_s,
            )
        except SpotstartError as exc:
            if self._credentials is None and not self._anonymous and "access denied" in str(exc):
                raise CredentialsNotFound(str(exc)) from exc
            raise

    async def stat(self, key: str) -> ObjectInfo:
        what = f"s3://{self.bucket}/{key}"
        _, headers, _ = await self._request(
            "HEAD", self._url(key), what, {"x-amz-checksum-mode": "ENABLED"}
        )
        etag = headers.get("ETag", "")
        # One CRC per object (the uploader chose it); CRC-32C first, as Checksums.crc reads.
        algorithm = next((a for a in CRC_HEADERS if headers.get(f"x-amz-checksum-{a}")), "crc32c")
        sums, n_parts = _checksums(
            etag,
            headers.get(f"x-amz-checksum-{algorithm}"),
            headers.get("x-amz-checksum-type"),
            encrypted=_etag_not_md5(headers),
            algorithm=algorithm,
        )
        size = int(headers.get("Content-Length", "0"))
        parts: tuple[int, ...] = ()
        if n_parts > 1 and (sums.crc_scope != "object" or sums.md5_of_parts is not None):
            parts = await self._part_sizes(key, n_parts, size)
            sums = _without_part_checks(sums) if not parts else sums
        sha256 = _whole_sha256(
            headers.get("x-amz-checksum-sha256"), headers.get("x-amz-checksum-type"), n_parts
        )
        if sha256 is not None:
            sums = dataclasses.replace(sums, sha256=sha256)
        return ObjectInfo(key=key, size=size, version=etag, checksums=sums, parts=parts)

    async def _part_sizes(self, key: str, n_parts: int, size: int) -> tuple[int, ...]:
        """Each part's size from ``HEAD ?partNumber=N``; () when the server does not answer it
        or the sizes do not add up (then no per-part check). Not pinned with If-Match: servers
        differ on which ETag a part answers to; the reads themselves are pinned."""
        if n_parts > MAX_PARTS_LOOKED_UP:
            return ()
        sem = asyncio.Semaphore(16)
        what = f"s3://{self.bucket}/{key}"

        async def one(n: int) -> int:
            async with sem:
                _, headers, _ = await self._request(
                    "HEAD", self._url(key, f"partNumber={n}"), what, {}
                )
                return int(headers.get("Content-Length", "-1"))

        try:
            sizes = tuple(await asyncio.gather(*(one(n) for n in range(1, n_parts + 1))))
        except (TransientError, EndpointUnreachable):
            raise  # a passing failure: the whole stat is retried, the check is not dropped
        except (SpotstartError, ValueError):
            return ()  # the server does not answer partNumber (400, 501...)
        if any(p <= 0 for p in sizes) or sum(sizes) != size:
            return ()
        return sizes

    async def list(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        token: str | None = None
        what = f"s3://{self.bucket}/{prefix}"
        while True:
            params = {"list-type": "2", "prefix": prefix}
            if token:
                params["continuation-token"] = token
            query = urlencode(sorted(params.items()), quote_via=quote)
            try:
                _, _, body = await self._request("GET", self._url("", query), what, {})
            except NotFound as exc:
                raise NotFound(f"s3://{self.bucket}: bucket not found") from exc
            page, truncated, token = parse_list_page(body, what)
            out.extend(page)
            if not truncated or not token:
                return out

    async def range_request(self, obj: ObjectInfo, start: int, length: int) -> RangeRequest:
        """The ranged GET of ``obj``, signed (Range and If-Match included), for the direct
        reader, which sends the same Range it was signed with."""
        url = self._url(obj.key)
        extra = {"If-Match": obj.version} if obj.version else {}
        extra["Range"] = f"bytes={start}-{start + length - 1}"
        headers = await self._signed("GET", url, extra)
        return RangeRequest(url, headers, f"s3://{self.bucket}/{obj.key}", self._hint())

    async def read(self, obj: ObjectInfo, start: int, length: int, sink: Sink) -> None:
        url = self._url(obj.key)
        extra = {"If-Match": obj.version} if obj.version else {}
        extra["Range"] = f"bytes={start}-{start + length - 1}"
        headers = await self._signed("GET", url, extra)
        headers.pop("Range", None)  # stream_range sets the same value again
        await _http.stream_range(
            self._session,
            url,
            headers,
            start,
            length,
            obj.size,
            sink,
            f"s3://{self.bucket}/{obj.key}",
            self._options,
            hint=self._hint(),
        )

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """PutObject, its SHA-256 signed (x-amz-content-sha256: the store checks the body)
        and its MD5 sent (Content-MD5), so a body damaged on the way is refused."""
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        extra = {"Content-Type": content_type, "Content-MD5": md5}
        await self._request("PUT", self._url(key), f"s3://{self.bucket}/{key}", extra, data)

    async def create(self, key: str, path: Path, content_type: str) -> bool:
        """PutObject with ``If-None-Match: *`` (S3 answers 412 when the key exists), the body
        streamed from ``path``: its SHA-256 signed (x-amz-content-sha256) and sent as
        x-amz-checksum-sha256, its MD5 as Content-MD5, so the store refuses damaged bytes.
        A 409 ConditionalRequestConflict (a race with another write) is False only when an
        object is then there; otherwise a TransientError, to retry."""
        what = f"s3://{self.bucket}/{key}"
        sums = await asyncio.to_thread(_http.digest_file, path, what)
        url = self._url(key)
        extra = {
            "Content-Type": content_type,
            "Content-MD5": base64.b64encode(sums.md5).decode(),
            "Content-Length": str(sums.size),
            "If-None-Match": "*",
            "x-amz-checksum-sha256": base64.b64encode(sums.sha256).decode(),
        }
        headers = await self._signed("PUT", url, extra, sums.sha256.hex())
        status, answer, _ = await _http.upload(
            self._session,
            "PUT",
            url,
            headers,
            _http.FileBody(path, sums),
            what,
            hint=self._hint(),
            answered=frozenset({409, 412}),
            options=self._options,
        )
        if status == 412:
            return False
        if status == 409:
            try:
                await self.stat(key)
            except NotFound:
                raise TransientError(
                    f"{what}: HTTP 409 (a conflicting write raced this one) and no object is "
                    "there; retry",
                    status=409,
                ) from None
            return False
        etag = answer.get("ETag", "").strip('"')
        echoed = answer.get("x-amz-checksum-sha256")
        md5_bad = not _etag_not_md5(answer) and _hex_md5(etag) not in (None, sums.md5)
        if md5_bad or (echoed and echoed != extra["x-amz-checksum-sha256"]):
            with contextlib.suppress(SpotstartError):
                await self._request("DELETE", url, what, {})
            raise IntegrityError(
                f"{what}: the store kept other bytes than were sent (ETag {etag}); deleted it"
            )
        return True

    async def close(self) -> None:
        await self._session.close()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(el: ET.Element, name: str) -> str | None:
    for child in el:
        if _local(child.tag) == name:
            return child.text or ""
    return None


def parse_list_page(body: bytes, what: str) -> tuple[list[ObjectInfo], bool, str | None]:
    """One ListObjectsV2 page: (objects, IsTruncated, NextContinuationToken). Elements are
    matched by local name: S3-compatible servers vary (or omit) the XML namespace.

    No checksums from a listing: the ETag is an MD5 only when the object is not SSE-KMS/SSE-C
    encrypted, which only HEAD tells; every object is marked ``needs_stat``."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ProtocolError(f"{what}: the listing is not XML ({exc})") from exc
    if _local(root.tag) != "ListBucketResult":
        raise ProtocolError(f"{what}: expected a ListBucketResult, got <{_local(root.tag)}>")
    out = []
    for c in root:
        if _local(c.tag) != "Contents":
            continue
        key = _child_text(c, "Key")
        size = _child_text(c, "Size")
        if key is None or size is None or not size.isdigit():
            raise ProtocolError(f"{what}: a listed object lacks Key or Size")
        out.append(ObjectInfo(key, int(size), _child_text(c, "ETag") or "", needs_stat=True))
    truncated = (_child_text(root, "IsTruncated") or "false").strip().lower() == "true"
    return out, truncated, _child_text(root, "NextContinuationToken")


def _with_ca(options: _http.HttpOptions, ca: str) -> _http.HttpOptions:
    from dataclasses import replace

    return replace(options, ca_bundle=ca)


def _etag_not_md5(headers: Mapping[str, str]) -> bool:
    sse = headers.get("x-amz-server-side-encryption", "")
    return sse.startswith("aws:kms") or "x-amz-server-side-encryption-customer-algorithm" in {
        k.lower() for k in headers
    }


def _hex_md5(text: str) -> bytes | None:
    if len(text) == 32 and all(ch in "0123456789abcdef" for ch in text.lower()):
        return bytes.fromhex(text)
    return None


CRC_HEADERS = ("crc32c", "crc64nvme", "crc32")  # x-amz-checksum-<name>, with checksum mode


def _checksums(
    etag: str,
    crc_b64: str | None,
    crc_type: str | None = None,
    *,
    encrypted: bool = False,
    algorithm: str = "crc32c",
) -> tuple[Checksums, int]:
    """(checksums, number of parts) from HEAD's headers.

    An S3 ETag is the hex MD5 of the body for single-part, non-KMS uploads; ``"<hex>-N"`` for
    a multipart upload (the MD5 of the N parts' MD5s). ``x-amz-checksum-<algorithm>`` (CRC-32C,
    CRC-32: 4 bytes; CRC-64/NVME: 8) is of the whole object for ``x-amz-checksum-type:
    FULL_OBJECT``, of the parts' CRCs for ``COMPOSITE`` (AWS then writes it ``"<b64>-N"``);
    servers that send no type leave a multipart value ambiguous. CRC-64/NVME is only ever
    FULL_OBJECT (S3 user guide, "Checking object integrity"). A value of the wrong width is
    no checksum (moto without the CRT library labels a CRC-32 as CRC-64/NVME).
    """
    e = etag.strip('"').removeprefix("W/").strip('"')
    hex_part, dash, count = e.partition("-")
    n_parts = int(count) if dash and count.isdigit() else 0
    md5 = md5_parts = None
    if not encrypted:
        if not dash:
            md5 = _hex_md5(e)
        elif n_parts:
            md5_parts = _hex_md5(hex_part)
    crc: int | None = None
    scope: CrcScope = "object"
    if crc_b64:
        value, crc_dash, crc_count = crc_b64.strip().partition("-")
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError:
            raw = b""
        if len(raw) == (8 if algorithm == "crc64nvme" else 4):
            crc = int.from_bytes(raw, "big")
        kind = (crc_type or "").strip().upper()
        if algorithm == "crc64nvme":
            scope = "object"
        elif crc_dash or kind == "COMPOSITE":
            scope = "parts"
            if crc_count.isdigit():
                n_parts = n_parts or int(crc_count)
        elif kind == "FULL_OBJECT" or not n_parts:
            scope = "object"
        else:
            scope = "either"
    fields: dict[str, int | None] = {"crc32c": None, "crc32": None, "crc64nvme": None}
    fields[algorithm] = crc
    return (
        Checksums(
            fields["crc32c"],
            md5,
            scope,
            md5_parts,
            crc32=fields["crc32"],
            crc64nvme=fields["crc64nvme"],
        ),
        n_parts,
    )


def _whole_sha256(value: str | None, kind: str | None, n_parts: int) -> bytes | None:
    """The object's SHA-256 from ``x-amz-checksum-sha256``, only when it is of the whole
    body: a single-part upload, or ``x-amz-checksum-type: FULL_OBJECT``. A composite value
    (``"<b64>-N"``, the SHA-256 of the parts' SHA-256s) or anything not 32 bytes is None.

    >>> _whole_sha256("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", None, 0).hex()[:8]
    'e3b0c442'
    """
    if not value or "-" in value:
        return None
    kind = (kind or "").strip().upper()
    if (n_parts > 1 and kind != "FULL_OBJECT") or kind == "COMPOSITE":
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return None
    return raw if len(raw) == 32 else None


def _without_part_checks(sums: Checksums) -> Checksums:
    """What is left to check when the part sizes are unknown: an ambiguous multipart CRC is
    dropped too (taking it for a whole-object CRC would fail good bytes); a whole-object CRC
    (FULL_OBJECT, CRC-64/NVME) stays."""
    if sums.crc_scope == "object":
        return dataclasses.replace(sums, md5_of_parts=None)
    return Checksums(None, sums.md5)
