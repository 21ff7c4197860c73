"""The HTTP transport shared by the gs, s3 and http backends: one aiohttp session, ranged
streaming reads with stall detection, and the single place where HTTP and socket failures are
translated into spotstart errors. Knows nothing about signing or listing."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import yarl

from spotstart.errors import (
    AccessDenied,
    EndpointUnreachable,
    IntegrityError,
    LocalIOError,
    NotFound,
    ObjectChanged,
    ProtocolError,
    SpotstartError,
    StallDetected,
    TransientError,
    UsageError,
)
from spotstart.store.base import Sink

# 2 MiB socket reads: at 50 MB/s per stream that is ~25 wake-ups/s per stream, cheap on 2 cores.
READ_BUFSIZE = 2 << 20
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class HttpOptions:
    """Transport knobs. ``stall_timeout_s``: a stream that yields no byte for this long is
    abandoned and retried (default 20 s: far above a 30 ms first byte, far below a human's
    patience). ``ca_bundle``: extra CA file for private endpoints."""

    stall_timeout_s: float = 20.0
    connect_timeout_s: float = 10.0
    # An upload's answer: how long the store may take to answer once the last byte has been
    # handed to the kernel (bytes still in socket buffers, then the store's own commit).
    answer_timeout_s: float = 60.0
    ca_bundle: str | None = None
    # Ranged bodies received straight into the destination's memory from threads where the
    # store and the target allow it (store/_direct.py); False keeps every read on aiohttp.
    direct_reads: bool = True


# RFC 3986 section 2: what may stand in a URL as it is sent (unreserved, reserved, '%').
_URL_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/?#[]@!$&'()*+,;=%"
)


def wire_url(url: str) -> yarl.URL:
    """``url`` exactly as it must go on the wire. yarl would otherwise normalise it (decode
    ``%2F`` in query strings, collapse ``/./`` and ``/../``), which breaks SigV4 signatures and
    asks for another key. A URL that is not already encoded (a space, non-ASCII) is encoded."""
    if _URL_CHARS.issuperset(url):
        return yarl.URL(url, encoded=True)
    return yarl.URL(url)


def ssl_context(options: HttpOptions) -> ssl.SSLContext:
    # A context of our own per source (not aiohttp's, made at import): SSL_CERT_FILE and
    # SSL_CERT_DIR are read when the source opens, as OpenSSL's default paths are.
    if options.ca_bundle and os.path.exists(options.ca_bundle):
        return ssl.create_default_context(cafile=options.ca_bundle)
    return ssl.create_default_context()


def make_session(options: HttpOptions) -> aiohttp.ClientSession:
    ssl_ctx = ssl_context(options)
    connector = aiohttp.TCPConnector(limit=0, ssl=ssl_ctx, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=options.connect_timeout_s, sock_connect=options.connect_timeout_s
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        read_bufsize=READ_BUFSIZE,
        raise_for_status=False,
    )


async def raise_for_status(resp: aiohttp.ClientResponse, what: str, *, hint: str = "") -> None:
    """Translate a non-2xx answer into our exception for ``what`` (an object's display URL)."""
    if resp.status < 300:
        return
    try:
        body = (await resp.content.read(2048)).decode("utf-8", "replace")
    except (TimeoutError, aiohttp.ClientError):
        body = ""
    raise error_for_status(resp.status, resp.reason or "", resp.headers, body, what, hint=hint)


def error_for_status(
    status: int,
    reason: str,
    headers: Mapping[str, str],
    body: str,
    what: str,
    *,
    hint: str = "",
) -> SpotstartError:
    """The exception for a non-2xx answer (pure: shared by every HTTP transport)."""
    detail = _error_detail(body)
    suffix = f" ({detail})" if detail else ""
    if status in RETRYABLE_STATUS:
        return TransientError(
            f"{what}: HTTP {status} {reason}{suffix}",
            retry_after_s=_retry_after_value(headers.get("Retry-After")),
            status=status,
        )
    if status == 404:
        return NotFound(f"{what}: not found (HTTP 404){suffix}")
    if status in (401, 403):
        return AccessDenied(f"{what}: access denied (HTTP {status}){suffix}{hint}")
    if status in (412, 416):
        return ObjectChanged(
            f"{what}: the object changed while being read (HTTP {status}); rerun to fetch the "
            "new version"
        )
    return SpotstartError(f"{what}: unexpected HTTP {status} {reason}{suffix}")


def _retry_after_value(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_detail(body: str) -> str:
    # S3 XML <Code>/<Message>, GCS JSON "message": enough to name the cause in one line.
    for pattern in (r"<Code>([^<]+)</Code>", r'"message"\s*:\s*"([^"]+)"', r"<Message>([^<]+)<"):
        m = re.search(pattern, body)
        if m:
            return m.group(1)[:200]
    return body.strip().splitlines()[0][:200] if body.strip() else ""


def translate_client_error(exc: BaseException, what: str) -> SpotstartError:
    """Map an aiohttp/socket failure to ours: unreachable endpoints are fatal-after-retries,
    everything mid-stream is transient."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return EndpointUnreachable(f"{what}: TLS failure: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return EndpointUnreachable(f"{what}: cannot connect: {exc.os_error or exc}")
    if isinstance(exc, aiohttp.InvalidURL):
        return SpotstartError(f"{what}: invalid URL: {exc}")
    return TransientError(f"{what}: {type(exc).__name__}: {exc}")


async def request_json_or_text(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: Mapping[str, str],
    what: str,
    *,
    hint: str = "",
    data: bytes | None = None,
    stall_timeout_s: float = HttpOptions.stall_timeout_s,
) -> tuple[int, Mapping[str, str], bytes]:
    """A small request whose whole body is wanted (listing, stat; ``data``: an upload's
    body). Raises our errors; a server that sends nothing for ``stall_timeout_s`` (before
    its answer's head or between two pieces of its body) is a StallDetected."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(stall_timeout_s) as deadline:
            async with session.request(
                method, wire_url(url), headers=dict(headers), data=data
            ) as resp:
                await raise_for_status(resp, what, hint=hint)
                pieces: list[bytes] = []
                while piece := await resp.content.readany():
                    deadline.reschedule(loop.time() + stall_timeout_s)
                    pieces.append(piece)
                return resp.status, resp.headers, b"".join(pieces)
    except TimeoutError as exc:
        if isinstance(exc, aiohttp.ClientError):  # aiohttp's own (connect) timeouts
            raise translate_client_error(exc, what) from exc
        raise StallDetected(f"{what}: no answer for {stall_timeout_s:g}s") from exc
    except SpotstartError:
        raise
    except (aiohttp.ClientError, OSError) as exc:
        raise translate_client_error(exc, what) from exc


async def probe_range(
    session: aiohttp.ClientSession,
    url: str,
    what: str,
    validator: str = "",
    *,
    stall_timeout_s: float = HttpOptions.stall_timeout_s,
) -> tuple[int, Mapping[str, str]]:
    """GET the first byte with a Range header (pinned with If-Range to ``validator`` when
    given): (status, headers). 206 means the server honours ranges; a 200 is the whole body,
    which is not read (the connection is dropped)."""
    headers = {"Range": "bytes=0-0", "Accept-Encoding": "identity"}
    if validator:
        headers["If-Range"] = validator
    try:
        async with asyncio.timeout(stall_timeout_s):
            async with session.get(wire_url(url), headers=headers) as resp:
                await raise_for_status(resp, what)
                if resp.status == 206:
                    await resp.content.read(16)
                return resp.status, resp.headers
    except TimeoutError as exc:
        if isinstance(exc, aiohttp.ClientError):  # aiohttp's own (connect) timeouts
            raise translate_client_error(exc, what) from exc
        raise StallDetected(f"{what}: no answer for {stall_timeout_s:g}s") from exc
    except SpotstartError:
        raise
    except (aiohttp.ClientError, OSError) as exc:
        raise translate_client_error(exc, what) from exc


async def stream_range(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    start: int,
    length: int,
    total_size: int,
    sink: Sink,
    what: str,
    options: HttpOptions,
    *,
    hint: str = "",
) -> None:
    """GET ``url`` for bytes ``[start, start+length)`` of an object of ``total_size`` bytes,
    feeding ``sink``. A 200 is accepted only when it is exactly the whole object we asked for
    (a server that ignores Range must not make us write the wrong bytes at an offset)."""
    hdrs = dict(headers)
    hdrs["Range"] = f"bytes={start}-{start + length - 1}"
    hdrs.setdefault("Accept-Encoding", "identity")
    received = 0
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(options.stall_timeout_s) as deadline:
            async with session.get(wire_url(url), headers=hdrs) as resp:
                await raise_for_status(resp, what, hint=hint)
                _check_range_answer(resp, start, length, total_size, what, hdrs.get("If-Range"))
                while True:
                    piece = await resp.content.readany()
                    if not piece:
                        break
                    deadline.reschedule(loop.time() + options.stall_timeout_s)
                    take = min(len(piece), length - received)
                    if take > 0:
                        await sink(piece if take == len(piece) else piece[:take])
                    received += len(piece)
                    if received >= length:
                        break
    except TimeoutError as exc:
        raise StallDetected(
            f"{what}: no bytes for {options.stall_timeout_s:g}s at offset {start + received}"
        ) from exc
    except SpotstartError:
        raise
    except (aiohttp.ClientError, OSError) as exc:
        raise translate_client_error(exc, what) from exc
    if received < length:
        raise TransientError(
            f"{what}: body ended after {received} of {length} bytes at offset {start}"
        )


def _check_range_answer(
    resp: aiohttp.ClientResponse,
    start: int,
    length: int,
    total_size: int,
    what: str,
    pinned: str | None = None,
) -> None:
    check_range_answer(resp.status, resp.headers, start, length, total_size, what, pinned)


def check_range_answer(
    status: int,
    headers: Mapping[str, str],
    start: int,
    length: int,
    total_size: int,
    what: str,
    pinned: str | None = None,
) -> None:
    """Is this 2xx the ranged answer asked for? (pure: shared by every HTTP transport)"""
    if status == 206:
        m = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
        if not m:
            raise TransientError(f"{what}: 206 without a valid Content-Range")
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if total != "*" and int(total) != total_size:
            raise ObjectChanged(
                f"{what}: size changed from {total_size} to {total} bytes while reading; rerun"
            )
        if first != start or last != start + length - 1:
            raise TransientError(
                f"{what}: asked for bytes {start}-{start + length - 1}, got {first}-{last}"
            )
        return
    if status == 200:
        # If-Range answered with a whole body of another version: the object was replaced,
        # which is not the same as a server that ignores Range.
        now = headers.get("ETag") or headers.get("Last-Modified")
        if pinned and now and now.removeprefix("W/") != pinned.removeprefix("W/"):
            raise ObjectChanged(
                f"{what}: the object changed while being read (now {now}, was {pinned}); "
                "rerun to fetch the new version"
            )
        if start == 0 and length == total_size:
            return
        raise ProtocolError(
            f"{what}: the server answered a ranged read with the whole body (HTTP 200) although "
            "it honoured ranges before; nothing was kept, rerun (or report the server)"
        )
    raise ProtocolError(f"{what}: unexpected HTTP {status} for a ranged read")


# --------------------------------------------------------------------------------------------
# Create-only uploads of a local file (ObjectCreator): the digests first, then the body
# streamed from the file with the same bytes checked again on the way.
# --------------------------------------------------------------------------------------------

# One request of S3 PutObject takes at most 5 GiB; GCS, Azure and local files are held to the
# same bound so every source behaves alike (what publishes to a directory publishes to a bucket).
MAX_CREATE_BYTES = 5 << 30
# 1 MiB file reads: memory per upload is two pieces (one held back, see file_body) plus
# aiohttp's socket buffer, whatever the file's size.
UPLOAD_PIECE_BYTES = 1 << 20
# A 400 that says the body did not match the checksums sent with it (S3 BadDigest,
# XAmzContentSHA256Mismatch, checksum errors; GCS "Provided MD5/CRC32C ... doesn't match").
_DIGEST_REFUSED = re.compile(
    r"BadDigest|InvalidDigest|SHA256Mismatch|Provided (MD5|CRC32C)|checksum", re.IGNORECASE
)


@dataclass(frozen=True)
class FileDigests:
    """What a file held when it was first read: the figures the store is asked to check."""

    size: int
    sha256: bytes
    md5: bytes
    crc32c: int


def digest_file(path: os.PathLike[str] | str, what: str) -> FileDigests:
    """Size, SHA-256, MD5 and CRC-32C of ``path`` in one streaming pass (blocking: run it in a
    thread). Over :data:`MAX_CREATE_BYTES` is refused before any byte is read."""
    import hashlib

    import google_crc32c

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalIOError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        size = os.fstat(fd).st_size
        if size > MAX_CREATE_BYTES:
            raise UsageError(
                f"{what}: {path} is {size} bytes; one upload takes at most {MAX_CREATE_BYTES} "
                "(5 GiB): make it smaller"
            )
        sha, md5, crc, total = hashlib.sha256(), hashlib.md5(), 0, 0
        while piece := os.read(fd, UPLOAD_PIECE_BYTES):
            sha.update(piece)
            md5.update(piece)
            crc = google_crc32c.extend(crc, piece)
            total += len(piece)
    except OSError as exc:
        raise LocalIOError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if total != size:
        raise IntegrityError(f"{path}: changed while being read ({size} then {total} bytes)")
    return FileDigests(size, sha.digest(), md5.digest(), crc)


class FileBody:
    """The body of one upload: ``prefix``, the file's bytes, ``suffix``. The file is read
    again piece by piece and its SHA-256 recomputed; the last piece is held back until the
    end of the file shows the bytes are the ones digested, so a file changed meanwhile (by
    us, or by someone who can write it) never completes a request: the connection is dropped
    short of its Content-Length and the store keeps nothing. ``failure`` then says why."""

    def __init__(
        self,
        path: os.PathLike[str] | str,
        expected: FileDigests,
        prefix: bytes = b"",
        suffix: bytes = b"",
    ) -> None:
        self.path = path
        self.expected = expected
        self.prefix = prefix
        self.suffix = suffix
        self.failure: IntegrityError | None = None
        # bytes the transport has taken, and a call each time it takes the next piece
        self.sent = 0
        self.on_progress: Callable[[], None] = lambda: None

    @property
    def length(self) -> int:
        return len(self.prefix) + self.expected.size + len(self.suffix)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for piece in self._pieces():
            yield piece
            # the transport asks for the next piece once this one is written (and drained)
            self.sent += len(piece)
            self.on_progress()

    async def _pieces(self) -> AsyncIterator[bytes]:
        import hashlib

        if self.prefix:
            yield self.prefix
        fd = await asyncio.to_thread(os.open, self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sha, total, held = hashlib.sha256(), 0, b""
            while True:
                piece = await asyncio.to_thread(os.read, fd, UPLOAD_PIECE_BYTES)
                if not piece:
                    break
                sha.update(piece)
                total += len(piece)
                if total > self.expected.size:
                    break
                if held:
                    yield held
                held = piece
            if total != self.expected.size or sha.digest() != self.expected.sha256:
                self.failure = IntegrityError(
                    f"{self.path}: changed while being uploaded (size or SHA-256 differ from "
                    "the first read); nothing was written, rerun"
                )
                raise self.failure
            if held:
                yield held
        finally:
            os.close(fd)
        if self.suffix:
            yield self.suffix


async def upload(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: FileBody,
    what: str,
    *,
    hint: str = "",
    answered: frozenset[int] = frozenset(),
    options: HttpOptions,
) -> tuple[int, Mapping[str, str], bytes]:
    """Send ``body`` (its exact length declared: no chunked encoding, which S3 refuses) and
    return (status, headers, at most 64 KiB of the answer). A status in ``answered`` (a
    failed precondition) is returned, not raised; other non-2xx answers are our errors.
    A store that takes no piece of the body for ``options.stall_timeout_s``, or has not
    answered ``options.answer_timeout_s`` after the last piece, is a StallDetected: the
    connection is dropped (short of its Content-Length while the body is being sent, so the
    store keeps nothing)."""
    hdrs = dict(headers)
    hdrs["Content-Length"] = str(body.length)
    loop = asyncio.get_running_loop()
    stall, answer_s = options.stall_timeout_s, options.answer_timeout_s
    sent = False

    def progress() -> None:
        nonlocal sent
        sent = body.sent >= body.length
        deadline.reschedule(loop.time() + (answer_s if sent else stall))

    try:
        async with asyncio.timeout(stall) as deadline:
            body.on_progress = progress
            async with session.request(
                method, wire_url(url), headers=hdrs, data=body.__aiter__()
            ) as resp:
                deadline.reschedule(loop.time() + stall)
                if resp.status == 400:
                    answer = (await resp.content.read(2048)).decode("utf-8", "replace")
                    if _DIGEST_REFUSED.search(answer):
                        raise IntegrityError(
                            f"{what}: the store refused the body: it does not match the "
                            f"checksums sent with it ({_error_detail(answer)}); damaged on the "
                            "way? Nothing was written; rerun"
                        )
                    raise error_for_status(400, resp.reason or "", resp.headers, answer, what)
                if resp.status not in answered:
                    await raise_for_status(resp, what, hint=hint)
                return resp.status, resp.headers, await resp.content.read(64 << 10)
    except SpotstartError:
        if body.failure is not None:
            raise body.failure from None
        raise
    except TimeoutError as exc:
        if body.failure is not None:
            raise body.failure from exc
        if isinstance(exc, aiohttp.ClientError):  # aiohttp's own (connect) timeouts
            raise translate_client_error(exc, what) from exc
        if sent:
            raise StallDetected(
                f"{what}: the store did not answer within {answer_s:g}s of the body's last "
                "byte; retry"
            ) from exc
        raise StallDetected(
            f"{what}: the store took no byte of the body for {stall:g}s; the upload was "
            "dropped short of its length, so nothing was written; retry"
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        if body.failure is not None:
            raise body.failure from exc
        raise translate_client_error(exc, what) from exc
