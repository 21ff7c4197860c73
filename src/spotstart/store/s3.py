"""Amazon S3 and S3-compatible stores: ListObjectsV2, HEAD with checksum mode, ranged GETs
pinned with If-Match. Credentials and region through botocore's own chain (env, shared
config/credentials profiles, SSO, container and instance metadata), signing with botocore's
SigV4; endpoint from --endpoint, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL as the AWS CLI does."""

from __future__ import annotations

import asyncio
import base64
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from spotstart.errors import CredentialsNotFound, NotFound, SpotstartError
from spotstart.store import _http
from spotstart.store.base import Checksums, ObjectInfo, Sink

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
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

    async def _signed(self, method: str, url: str, extra: Mapping[str, str]) -> dict[str, str]:
        async with self._creds_lock:
            if not self._creds_checked:
                self._credentials = await asyncio.to_thread(self._load_credentials)
                self._creds_checked = True
        headers = dict(extra)
        headers["x-amz-content-sha256"] = EMPTY_SHA256
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
        self, method: str, url: str, what: str, extra: Mapping[str, str]
    ) -> tuple[int, Mapping[str, str], bytes]:
        headers = await self._signed(method, url, extra)
        try:
            return await _http.request_json_or_text(
                self._session, method, url, headers, what, hint=self._hint()
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
        return ObjectInfo(
            key=key,
            size=int(headers.get("Content-Length", "0")),
            version=headers.get("ETag", ""),
            checksums=_checksums(
                headers.get("ETag", ""),
                headers.get("x-amz-checksum-crc32c"),
                encrypted=_etag_not_md5(headers),
            ),
        )

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
            root = ET.fromstring(body)
            for c in root.iter(f"{_NS}Contents"):
                key = c.findtext(f"{_NS}Key", "")
                etag = c.findtext(f"{_NS}ETag", "")
                # No checksums from a listing: the ETag is an MD5 only when the object is
                # not SSE-KMS/SSE-C encrypted, which only HEAD tells (see stat).
                out.append(ObjectInfo(key, int(c.findtext(f"{_NS}Size", "0")), etag))
            truncated = root.findtext(f"{_NS}IsTruncated", "false") == "true"
            token = root.findtext(f"{_NS}NextContinuationToken")
            if not truncated or not token:
                return out

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

    async def close(self) -> None:
        await self._session.close()


def _with_ca(options: _http.HttpOptions, ca: str) -> _http.HttpOptions:
    from dataclasses import replace

    return replace(options, ca_bundle=ca)


def _etag_not_md5(headers: Mapping[str, str]) -> bool:
    sse = headers.get("x-amz-server-side-encryption", "")
    return sse.startswith("aws:kms") or "x-amz-server-side-encryption-customer-algorithm" in {
        k.lower() for k in headers
    }


def _checksums(etag: str, crc_b64: str | None, *, encrypted: bool = False) -> Checksums:
    """An S3 ETag is the hex MD5 of the body only for single-part, non-KMS uploads: 32 hex
    digits with no '-N' suffix. x-amz-checksum-crc32c is whole-object unless it has '-N'."""
    md5: bytes | None = None
    e = etag.strip('"')
    if not encrypted and len(e) == 32 and all(ch in "0123456789abcdef" for ch in e.lower()):
        md5 = bytes.fromhex(e)
    crc: int | None = None
    if crc_b64 and "-" not in crc_b64:
        try:
            crc = int.from_bytes(base64.b64decode(crc_b64), "big")
        except ValueError:
            crc = None
    return Checksums(crc, md5)
