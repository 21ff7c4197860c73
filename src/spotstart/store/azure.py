"""Azure Blob Storage through obstore's ``AzureStore`` (Rust object_store): stat, list and ranged
reads pinned to an ETag with If-Match. Credentials are found the way Azure tools find them
(account key, SAS token, client secret, workload identity, managed identity, Azure CLI); we
choose only the account, the endpoint and anonymity. Reads, and two writes (put, create-only
create); no retries of its own."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import AzureStore

from spotstart.errors import (
    AccessDenied,
    CredentialsNotFound,
    EndpointUnreachable,
    IntegrityError,
    NotFound,
    ObjectChanged,
    SpotstartError,
    StallDetected,
    TransientError,
    UsageError,
)
from spotstart.store import _http
from spotstart.store._http import RETRYABLE_STATUS, HttpOptions
from spotstart.store.base import ObjectInfo, Sink

if TYPE_CHECKING:
    from obstore import Attributes
    from obstore.store import ClientConfig

_CRED_HINT = (
    "; set AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, log in with `az login`, "
    "or run with a managed identity"
)
# obstore hands the body over in pieces of at least this size (the last one may be smaller).
# 2 MiB like the aiohttp backends' socket reads: few Python wake-ups, little memory per stream.
STREAM_PIECE_BYTES = 2 << 20
# A create up to this size is one Put Blob, its body in memory (obstore builds a create's body
# whole); above it, staged in blocks: memory about STAGE_BLOCK_BYTES * (STAGE_CONCURRENCY + 1)
# (measured on Azurite, tests/store/test_create.py: 8 MiB blocks 4 at a time grew the peak RSS
# by 37 MiB, 4 MiB 2 at a time by 12 MiB). 4 MiB: 5 GiB is 1,280 blocks of Azure's 50,000.
CREATE_IN_ONE_BYTES = 8 << 20
STAGE_BLOCK_BYTES = 4 << 20
STAGE_CONCURRENCY = 2
_STATUS = re.compile(r"status code: (\d{3})")
_AZURE_CODE = re.compile(r"<Code>([^<]+)</Code>")


def store_config(
    container: str,
    env: Mapping[str, str],
    *,
    endpoint: str | None = None,
    anonymous: bool = False,
) -> dict[str, Any]:
    """The ``AzureStore`` settings we decide; obstore reads every credential variable itself.

    Account: ``AZURE_STORAGE_ACCOUNT_NAME``, else ``AZURE_STORAGE_ACCOUNT`` (the az CLI's name).
    Endpoint: ``endpoint`` (``--endpoint``), else ``AZURE_STORAGE_ENDPOINT``/``AZURE_ENDPOINT``,
    else ``https://{account}.blob.core.windows.net``; for Azurite it ends in the account, e.g.
    ``http://127.0.0.1:10000/devstoreaccount1``. ``AZURE_STORAGE_USE_EMULATOR=true`` (with
    optional ``AZURITE_BLOB_STORAGE_URL``) selects Azurite with its well-known account.

    >>> store_config("models", {"AZURE_STORAGE_ACCOUNT": "acct"})["account_name"]
    'acct'
    """
    config: dict[str, Any] = {"container_name": container}
    account = env.get("AZURE_STORAGE_ACCOUNT_NAME") or env.get("AZURE_STORAGE_ACCOUNT")
    if account:
        config["account_name"] = account
    # az CLI spells the key AZURE_STORAGE_KEY; obstore knows AZURE_STORAGE_ACCOUNT_KEY and others
    if env.get("AZURE_STORAGE_KEY") and not env.get("AZURE_STORAGE_ACCOUNT_KEY"):
        config["account_key"] = env["AZURE_STORAGE_KEY"]
    url = endpoint or env.get("AZURE_STORAGE_ENDPOINT") or env.get("AZURE_ENDPOINT")
    if url:
        config["endpoint"] = url.rstrip("/")
    emulator = env.get("AZURE_STORAGE_USE_EMULATOR", "").lower() in ("1", "true", "yes")
    if not account and not emulator:
        raise UsageError(
            f"az://{container}: no storage account; set AZURE_STORAGE_ACCOUNT_NAME "
            "(and a credential such as AZURE_STORAGE_ACCOUNT_KEY)"
        )
    if anonymous:
        config["skip_signature"] = True
    return config


def client_options(config: Mapping[str, Any], env: Mapping[str, str], options: HttpOptions) -> Any:
    """obstore client settings: no whole-request timeout (a chunk may take minutes on a slow
    link; stalls are ours to detect), plain HTTP only where the endpoint says so."""
    url = str(config.get("endpoint") or env.get("AZURITE_BLOB_STORAGE_URL") or "")
    emulator = env.get("AZURE_STORAGE_USE_EMULATOR", "").lower() in ("1", "true", "yes")
    client: ClientConfig = {
        "connect_timeout": timedelta(seconds=options.connect_timeout_s),
        "timeout": timedelta(days=1),
        "allow_http": url.startswith("http://") or (emulator and not url),
    }
    if options.ca_bundle and Path(options.ca_bundle).is_file():
        client["root_certificate"] = Path(options.ca_bundle).read_bytes()
    return client


class AzureSource:
    """One Azure Blob Storage container."""

    def __init__(
        self,
        container: str,
        options: HttpOptions,
        *,
        endpoint: str | None = None,
        env: Mapping[str, str] | None = None,
        anonymous: bool = False,
    ) -> None:
        environ = os.environ if env is None else env
        self.container = container
        self._options = options
        self._anonymous = anonymous
        config = store_config(container, environ, endpoint=endpoint, anonymous=anonymous)
        try:
            self._store = AzureStore(
                config=config,  # type: ignore[arg-type]
                client_options=client_options(config, environ, options),
                # our fetch engine owns retrying (one policy, one budget, progress rollback)
                retry_config={"max_retries": 0},
            )
        except BaseError as exc:
            raise UsageError(
                f"{self.display}: invalid Azure configuration: {_first_line(exc)}"
            ) from exc

    @property
    def display(self) -> str:
        return f"az://{self.container}"

    def _what(self, key: str) -> str:
        return f"az://{self.container}/{key}"

    async def stat(self, key: str) -> ObjectInfo:
        try:
            meta = await obstore.head_async(self._store, key)
        except Exception as exc:
            raise translate_error(exc, self._what(key), self._hint()) from exc
        return _object_info(meta)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        # obstore matches prefixes by whole path segments ("p/s" finds nothing in "p/sub/x");
        # our contract is "key starts with", so list the enclosing "directory" and filter.
        parent = prefix[: prefix.rfind("/") + 1]
        out: list[ObjectInfo] = []
        try:
            async for page in obstore.list(self._store, prefix=parent or None, chunk_size=1000):
                out.extend(_object_info(m) for m in page if m["path"].startswith(prefix))
        except Exception as exc:
            raise translate_error(exc, self._what(prefix), self._hint()) from exc
        return out

    async def read(self, obj: ObjectInfo, start: int, length: int, sink: Sink) -> None:
        if length <= 0:
            return
        what = self._what(obj.key)
        stall_s = self._options.stall_timeout_s
        received = 0
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(stall_s) as deadline:
                result = await obstore.get_async(
                    self._store,
                    obj.key,
                    options={"range": (start, start + length), "if_match": obj.version},
                )
                _check_range(result.range, result.meta["size"], obj, start, length, what)
                # the stream yields ``bytes`` (obstore's ``Bytes`` from get_range is not
                # accepted by google_crc32c), copied once out of Rust memory
                async for piece in result.stream(min_chunk_size=STREAM_PIECE_BYTES):
                    deadline.reschedule(loop.time() + stall_s)
                    take = min(len(piece), length - received)
                    if take > 0:
                        await sink(piece if take == len(piece) else piece[:take])
                    received += len(piece)
        except TimeoutError as exc:
            raise StallDetected(
                f"{what}: no bytes for {stall_s:g}s at offset {start + received}"
            ) from exc
        except SpotstartError:
            raise
        except Exception as exc:
            raise translate_error(exc, what, self._hint()) from exc
        if received < length:
            raise TransientError(
                f"{what}: body ended after {received} of {length} bytes at offset {start}"
            )

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Put Blob (one request for a small object), through the same obstore client."""
        try:
            await obstore.put_async(
                self._store, key, data, attributes={"Content-Type": content_type}
            )
        except Exception as exc:
            raise translate_error(exc, self._what(key), self._hint()) from exc

    async def create(self, key: str, path: Path, content_type: str) -> bool:
        """Put Blob with ``If-None-Match: *`` (obstore ``mode="create"``; Azure answers 409
        BlobAlreadyExists, obstore ``AlreadyExistsError``) for a file up to
        :data:`CREATE_IN_ONE_BYTES`. obstore holds a create's whole body in memory, so a
        larger file is staged (Put Block pieces, bounded memory) under a fresh name beside
        ``key``, copied onto ``key`` with Copy Blob ``If-None-Match: *``, and the staged blob
        deleted. obstore sends no Content-MD5: the bytes are protected on the way by TLS,
        checked against the file as they are read, and the size of the result is checked."""
        what = self._what(key)
        sums = await asyncio.to_thread(_http.digest_file, path, what)
        attributes: Attributes = {"Content-Type": content_type}
        try:
            if sums.size <= CREATE_IN_ONE_BYTES:
                data = await asyncio.to_thread(Path(path).read_bytes)
                if hashlib.sha256(data).digest() != sums.sha256:
                    raise IntegrityError(f"{path}: changed while being uploaded; rerun")
                try:
                    await obstore.put_async(
                        self._store, key, data, attributes=attributes, mode="create"
                    )
                except (AlreadyExistsError, PreconditionError):
                    return False
            elif not await self._create_staged(key, path, sums, attributes):
                return False
            made = await obstore.head_async(self._store, key)
        except SpotstartError:
            raise
        except Exception as exc:
            raise translate_error(exc, what, self._hint()) from exc
        if int(made["size"]) != sums.size:
            raise IntegrityError(
                f"{what}: the store holds {made['size']} bytes, {sums.size} were sent"
            )
        return True

    async def _create_staged(
        self, key: str, path: Path, sums: _http.FileDigests, attributes: Attributes
    ) -> bool:
        staged = f"{key}.spotstart-upload-{secrets.token_hex(8)}"
        body = _http.FileBody(path, sums)
        try:
            try:
                await obstore.put_async(
                    self._store,
                    staged,
                    body.__aiter__(),
                    attributes=attributes,
                    chunk_size=STAGE_BLOCK_BYTES,
                    max_concurrency=STAGE_CONCURRENCY,
                )
            except Exception:
                if body.failure is not None:
                    raise body.failure from None
                raise
            if body.failure is not None:
                raise body.failure
            head = await obstore.head_async(self._store, staged)
            if int(head["size"]) != sums.size:
                raise IntegrityError(
                    f"{self._what(staged)}: staged {head['size']} bytes, {sums.size} were sent"
                )
            try:
                await obstore.copy_async(self._store, staged, key, overwrite=False)
            except (AlreadyExistsError, PreconditionError):
                return False
            return True
        finally:
            with contextlib.suppress(Exception):
                await obstore.delete_async(self._store, staged)

    def _hint(self) -> str:
        return "" if self._anonymous else _CRED_HINT

    async def close(self) -> None:
        return None  # obstore's connection pool goes with the store object


def _check_range(
    got: tuple[int, int], size: int, obj: ObjectInfo, start: int, length: int, what: str
) -> None:
    if size != obj.size:
        raise ObjectChanged(f"{what}: size changed from {obj.size} to {size} bytes; rerun")
    if got != (start, start + length):
        # obstore clips a range that runs past the end instead of failing
        raise TransientError(
            f"{what}: asked for bytes {start}-{start + length - 1}, got {got[0]}-{got[1] - 1}"
        )


def _object_info(meta: Mapping[str, Any]) -> ObjectInfo:
    # Content-MD5 (set for blobs written by one Put Blob) is not exposed by obstore's head,
    # list or get results, so Azure objects are verified by size only (and our own CRCs).
    etag = meta.get("e_tag") or ""
    # list answers 0x8D..., head answers "0x8D...": one spelling, so cache versions compare
    if etag and not etag.startswith(('"', "W/")):
        etag = f'"{etag}"'
    return ObjectInfo(key=str(meta["path"]), size=int(meta["size"]), version=etag)


def _first_line(exc: BaseException) -> str:
    # obstore appends a multi-line "Debug source:" dump; the first line names the cause
    text = str(exc).split("\n\nDebug source:", 1)[0]
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def translate_error(exc: BaseException, what: str, hint: str = "") -> SpotstartError:
    """The one place obstore's failures become ours. obstore raises typed errors for some
    answers and ``GenericError`` carrying the HTTP status in its text for the rest."""
    if isinstance(exc, SpotstartError):
        return exc
    text = str(exc)
    first = _first_line(exc)
    status_match = _STATUS.search(text)
    status = int(status_match.group(1)) if status_match else None
    code_match = _AZURE_CODE.search(text)
    code = f" ({code_match.group(1)})" if code_match else ""
    if "Error performing token request" in text or "Account must be specified" in text:
        return CredentialsNotFound(f"{what}: no usable Azure credentials: {first}{_CRED_HINT}")
    if isinstance(exc, PreconditionError) or status == 412:
        return ObjectChanged(
            f"{what}: the blob changed while being read (HTTP 412); rerun to fetch the new version"
        )
    if isinstance(exc, FileNotFoundError | NotFoundError) or status == 404:
        detail = code or " (blob or container)"
        return NotFound(f"{what}: not found (HTTP 404){detail}")
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or status in (401, 403):
        shown = status or (403 if isinstance(exc, PermissionDeniedError) else 401)
        return AccessDenied(f"{what}: access denied (HTTP {shown}){code}{hint}")
    if status is not None and (status in RETRYABLE_STATUS or status >= 500):
        return TransientError(f"{what}: HTTP {status}{code}", status=status)
    if status is not None:
        return SpotstartError(f"{what}: unexpected HTTP {status}{code}: {first}")
    if "kind: Connect" in text or "dns error" in text or "tcp connect error" in text:
        return EndpointUnreachable(f"{what}: cannot connect: {first}")
    if "certificate" in text.lower():
        return EndpointUnreachable(f"{what}: TLS failure: {first}")
    # resets, timeouts and broken bodies mid-stream
    return TransientError(f"{what}: {type(exc).__name__}: {first}")
