"""Google Cloud Storage through its JSON API: listing and metadata with crc32c/md5/generation,
media downloads pinned to a generation. Credentials the way Google's own libraries find them
(google.auth.default: GOOGLE_APPLICATION_CREDENTIALS, gcloud ADC, GCE metadata server);
``STORAGE_EMULATOR_HOST`` points at an emulator and implies anonymous access, as in
google-cloud-storage."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from spotstart.errors import (
    CredentialsNotFound,
    IntegrityError,
    NotFound,
    ProtocolError,
    SpotstartError,
)
from spotstart.store import _http
from spotstart.store._direct import RangeRequest
from spotstart.store.base import Checksums, ObjectInfo, Sink

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
READ_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
WRITE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"  # put only
_CRED_HINT = (
    "; set GOOGLE_APPLICATION_CREDENTIALS to a service-account JSON or run "
    "`gcloud auth application-default login`"
)


def resolve_endpoint(explicit: str | None, env: Mapping[str, str]) -> tuple[str, bool]:
    """(base URL, anonymous?) from --endpoint, STORAGE_EMULATOR_HOST or the default."""
    if explicit:
        return explicit.rstrip("/"), False
    emu = env.get("STORAGE_EMULATOR_HOST")
    if emu:
        base = emu if "://" in emu else f"http://{emu}"
        return base.rstrip("/"), True
    return DEFAULT_ENDPOINT, False


class _Token:
    """Bearer tokens from google-auth, refreshed off the event loop before they expire."""

    def __init__(self, credentials: Any) -> None:
        self._creds = credentials
        self._lock = asyncio.Lock()

    async def header(self) -> dict[str, str]:
        async with self._lock:
            expiry = getattr(self._creds, "expiry", None)
            fresh = self._creds.token and (expiry is None or expiry.timestamp() - time.time() > 300)
            if not fresh:
                import google.auth.transport.requests

                request = google.auth.transport.requests.Request()
                await asyncio.to_thread(self._creds.refresh, request)
        return {"Authorization": f"Bearer {self._creds.token}"}


def _load_credentials(scope: str = READ_SCOPE) -> Any | None:
    import google.auth
    import google.auth.exceptions

    try:
        creds, _project = google.auth.default(scopes=[scope])
    except google.auth.exceptions.DefaultCredentialsError as exc:
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            # Asked for explicitly and broken: say so rather than silently go anonymous.
            raise CredentialsNotFound(f"GOOGLE_APPLICATION_CREDENTIALS: {exc}") from exc
        return None
    return creds


class GCSSource:
    """One GCS bucket."""

    def __init__(
        self,
        bucket: str,
        options: _http.HttpOptions,
        *,
        endpoint: str | None = None,
        env: Mapping[str, str] | None = None,
        anonymous: bool | None = None,
    ) -> None:
        self.bucket = bucket
        self._options = options
        self._base, emulator = resolve_endpoint(endpoint, os.environ if env is None else env)
        self._anonymous = emulator if anonymous is None else anonymous
        self._token: _Token | None = None
        self._write_token: _Token | None = None
        self._creds_checked = False
        self._session = _http.make_session(options)

    @property
    def display(self) -> str:
        return f"gs://{self.bucket}"

    async def _auth(self) -> dict[str, str]:
        if self._anonymous:
            return {}
        if not self._creds_checked:
            creds = await asyncio.to_thread(_load_credentials)
            self._creds_checked = True
            self._token = _Token(creds) if creds is not None else None
        if self._token is None:
            return {}  # anonymous: works for public buckets; a 401/403 names the fix
        try:
            return await self._token.header()
        except Exception as exc:  # google-auth raises many types; all mean "no usable token"
            raise CredentialsNotFound(
                f"{self.display}: cannot get a token: {exc}{_CRED_HINT}"
            ) from exc

    def _hint(self) -> str:
        return _CRED_HINT if (self._token is None and not self._anonymous) else ""

    def _object_url(self, key: str) -> str:
        return f"{self._base}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(key, safe='')}"

    async def stat(self, key: str) -> ObjectInfo:
        what = f"gs://{self.bucket}/{key}"
        _, _, body = await _http.request_json_or_text(
            self._session,
            "GET",
            self._object_url(key),
            await self._auth(),
            what,
            hint=self._hint(),
            stall_timeout_s=self._options.stall_timeout_s,
        )
        return _object_info(json.loads(body))

    async def list(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        token: str | None = None
        what = f"gs://{self.bucket}/{prefix}"
        while True:
            params = {
                "prefix": prefix,
                "maxResults": "1000",
                "fields": "items(name,size,generation,crc32c,md5Hash),nextPageToken",
            }
            if token:
                params["pageToken"] = token
            url = f"{self._base}/storage/v1/b/{quote(self.bucket, safe='')}/o?{urlencode(params)}"
            try:
                _, _, body = await _http.request_json_or_text(
                    self._session,
                    "GET",
                    url,
                    await self._auth(),
                    what,
                    hint=self._hint(),
                    stall_timeout_s=self._options.stall_timeout_s,
                )
            except NotFound as exc:
                raise NotFound(f"gs://{self.bucket}: bucket not found") from exc
            page = json.loads(body)
            out.extend(_object_info(item) for item in page.get("items", []))
            token = page.get("nextPageToken")
            if not token:
                return out

    async def range_request(self, obj: ObjectInfo, start: int, length: int) -> RangeRequest:
        """The ranged media GET of ``obj``'s generation, authorised, for the direct reader."""
        url = f"{self._object_url(obj.key)}?alt=media&generation={obj.version}"
        return RangeRequest(url, await self._auth(), f"gs://{self.bucket}/{obj.key}", self._hint())

    async def read(self, obj: ObjectInfo, start: int, length: int, sink: Sink) -> None:
        url = f"{self._object_url(obj.key)}?alt=media&generation={obj.version}"
        await _http.stream_range(
            self._session,
            url,
            await self._auth(),
            start,
            length,
            obj.size,
            sink,
            f"gs://{self.bucket}/{obj.key}",
            self._options,
            hint=self._hint(),
        )

    async def _write_auth(self) -> dict[str, str]:
        """Headers for a write: a read-write token, asked for only when writing."""
        if self._anonymous:
            return {}
        if self._write_token is None:
            creds = await asyncio.to_thread(_load_credentials, WRITE_SCOPE)
            if creds is None:
                raise CredentialsNotFound(f"{self.display}: no credentials to write{_CRED_HINT}")
            self._write_token = _Token(creds)
        try:
            return await self._write_token.header()
        except Exception as exc:  # google-auth raises many types
            raise CredentialsNotFound(f"{self.display}: cannot get a token: {exc}") from exc

    def _upload_url(self, params: Mapping[str, str]) -> str:
        query = urlencode(dict(params))
        return f"{self._base}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o?{query}"

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """A media upload (JSON API ``uploadType=media``, as GCS and its emulators take it),
        with a read-write token asked for only now."""
        headers = {"Content-Type": content_type, **(await self._write_auth())}
        url = self._upload_url({"uploadType": "media", "name": key})
        await _http.request_json_or_text(
            self._session,
            "POST",
            url,
            headers,
            f"gs://{self.bucket}/{key}",
            data=data,
            stall_timeout_s=self._options.stall_timeout_s,
        )

    async def create(self, key: str, path: Path, content_type: str) -> bool:
        """A multipart upload (JSON API ``uploadType=multipart``: metadata, then the body
        streamed from ``path``) with ``ifGenerationMatch=0``: GCS answers 412 when the object
        exists. The metadata carries the file's md5Hash and crc32c, which GCS checks against
        the bytes it received (400 when they differ); the object it answers with is checked
        too (an emulator that ignores them), and deleted when it holds other bytes."""
        what = f"gs://{self.bucket}/{key}"
        sums = await asyncio.to_thread(_http.digest_file, path, what)
        metadata = {
            "name": key,
            "contentType": content_type,
            "md5Hash": base64.b64encode(sums.md5).decode(),
            "crc32c": base64.b64encode(sums.crc32c.to_bytes(4, "big")).decode(),
        }
        boundary = f"spotstart-{secrets.token_hex(16)}"
        prefix = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps(metadata)}\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\r\n"
        ).encode()
        suffix = f"\r\n--{boundary}--\r\n".encode()
        headers = {
            "Content-Type": f"multipart/related; boundary={boundary}",
            **(await self._write_auth()),
        }
        url = self._upload_url({"uploadType": "multipart", "ifGenerationMatch": "0"})
        status, _, answer = await _http.upload(
            self._session,
            "POST",
            url,
            headers,
            _http.FileBody(path, sums, prefix, suffix),
            what,
            hint=self._hint(),
            answered=frozenset({412}),
            options=self._options,
        )
        if status == 412:
            return False
        try:
            made = _object_info(json.loads(answer))
        except ValueError as exc:
            raise ProtocolError(f"{what}: the upload's answer is not JSON ({exc})") from exc
        got = made.checksums
        if (
            made.key != key
            or made.size != sums.size
            or got.md5 not in (None, sums.md5)
            or got.crc32c not in (None, sums.crc32c)
        ):
            delete = f"{self._object_url(made.key)}?ifGenerationMatch={made.version}"
            with contextlib.suppress(SpotstartError):
                await _http.request_json_or_text(
                    self._session,
                    "DELETE",
                    delete,
                    await self._write_auth(),
                    what,
                    stall_timeout_s=self._options.stall_timeout_s,
                )
            md5 = base64.b64encode(got.md5 or b"").decode() or "none"
            raise IntegrityError(
                f"{what}: the store kept other bytes than were sent ({made.size} bytes, md5 "
                f"{md5}; sent {sums.size} bytes, md5 {metadata['md5Hash']}); deleted it"
            )
        return True

    async def close(self) -> None:
        await self._session.close()


def _object_info(item: Mapping[str, Any]) -> ObjectInfo:
    try:
        crc = item.get("crc32c")
        md5 = item.get("md5Hash")
        header = ",".join(
            p for p in (f"crc32c={crc}" if crc else "", f"md5={md5}" if md5 else "") if p
        )
        return ObjectInfo(
            key=str(item["name"]),
            size=int(item["size"]),
            version=str(item.get("generation", "")),
            checksums=Checksums.from_goog_hash(header) if header else Checksums(),
        )
    except (KeyError, ValueError) as exc:
        raise SpotstartError(f"malformed GCS object metadata: {exc}") from exc
