"""Ranged GETs read straight into the caller's memory (a destination file's pages, a tensor's
storage) from a worker thread: one blocking HTTP/1.1 exchange per call, ``recv_into`` the
target, the GIL released while the bytes move, so they cross user space once. Measured
against the aiohttp path in bench/fetch/datapath.py (a third less CPU per GB).

Only the body of a ranged GET goes this way; listings, stats and small reads stay on the
async transport (_http.py). Answers are judged by the same pure functions
(``error_for_status``, ``check_range_answer``), so both transports refuse the same things."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict

from spotstart.errors import EndpointUnreachable, ProtocolError, StallDetected, TransientError
from spotstart.store import _http
from spotstart.store.base import ObjectInfo

HEAD_LIMIT = 64 << 10  # all the heads of one answer, interim 1xx ones included
MAX_INTERIM = 8  # 1xx heads before the final one: a server sending more is broken or hostile
REPORT_BYTES = 1 << 20  # progress granularity: a bar that moves, 50 wake-ups a second at 50 MB/s
IDLE_PER_HOST = 64
# How a connection the server already closed fails a send or the first read of an answer.
_GONE = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)
_EXACT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})")


class BodySink(Protocol):
    """Where a body's bytes land, piece by piece: the reader asks for :meth:`space`,
    ``recv_into`` it, and reports how much it filled with :meth:`took`. A window over final
    memory (a tensor's) hands out the rest of itself; a file's hands out a small reused
    buffer that it writes out when full."""

    def space(self) -> memoryview:
        """Where the next bytes go (non-empty while the body is not complete)."""
        ...

    def took(self, n: int) -> None:
        """``n`` bytes were written at the start of the last :meth:`space`."""
        ...


class SinkError(Exception):
    """A sink failed to store what it took (a local write): not the network's fault, never
    retried as a transient error. ``cause`` is the OSError."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class DirectUnsupported(Exception):
    """This answer cannot be received in place (a chunked or close-delimited body): read it
    with the stream transport instead. Raised before any body byte is consumed."""


@dataclass(frozen=True)
class RangeRequest:
    """A ranged GET as the store signed it: the URL byte for byte, its headers (auth, If-Match
    or If-Range; not Range, which the reader sets), how to name the object in errors."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    what: str = ""
    hint: str = ""
    pinned: str | None = None  # an http source's If-Range validator
    # A peer's answer: only a 206 of exactly this range and the object's size is taken (no
    # whole-body 200, no unknown total); anything else is a ProtocolError.
    exact: bool = False
    # The whole exchange (connect, heads, body) must end within this many seconds: a stall
    # timeout restarts with every byte, so alone it never stops a server sending 1 B/s.
    deadline_s: float | None = None


class DirectRangeSource(Protocol):
    """A store whose ranged GETs the direct reader can send: it signs them, the reader
    moves the bytes."""

    async def range_request(self, obj: ObjectInfo, start: int, length: int) -> RangeRequest: ...


class DirectReader:
    """Thread-safe; sockets are kept alive and reused per (scheme, host, port) when the
    answer's protocol allows it (HTTP/1.1 without ``Connection: close``, HTTP/1.0 only with
    ``Connection: keep-alive``)."""

    def __init__(self, options: _http.HttpOptions) -> None:
        self.options = options
        self._ssl = _http.ssl_context(options)
        self._idle: dict[tuple[str, str, int], list[socket.socket]] = defaultdict(list)
        self._busy: set[socket.socket] = set()
        self._closed = False
        self._lock = threading.Lock()

    def read_into(
        self,
        req: RangeRequest,
        start: int,
        length: int,
        total_size: int,
        sink: BodySink,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        """Hand bytes ``[start, start+length)`` to ``sink``; our errors on any failure (the
        sink then holds a partial, meaningless prefix; its own write failures come out as
        :class:`SinkError`). ``on_bytes`` is told of body bytes as they arrive (every
        ``REPORT_BYTES`` and at the end, also on a failure: the wire carried them)."""
        url = _http.wire_url(req.url)
        scheme, host = url.scheme, url.host or ""
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        lines = [f"GET {url.raw_path_qs} HTTP/1.1", f"Host: {url.raw_authority}"]
        lines.append(f"Range: bytes={start}-{start + length - 1}")
        lines.append("Accept-Encoding: identity")
        lines += [f"{k}: {v}" for k, v in req.headers.items() if k.lower() != "range"]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        deadline = _Deadline(req.deadline_s)
        sock: socket.socket | None = None
        reusable = False
        try:
            sock, head = self._exchange(key, request, req.what, deadline)
            status, headers, rest = head.status, head.headers, head.rest
            if status >= 300:
                body = rest[:2048].decode("utf-8", "replace")
                raise _http.error_for_status(
                    status, head.reason, headers, body, req.what, hint=req.hint
                )
            if req.exact:
                _check_exact_range(status, headers, start, length, total_size, req.what)
            else:
                _http.check_range_answer(
                    status, headers, start, length, total_size, req.what, req.pinned
                )
            declared = headers.get("Content-Length", "")
            if "chunked" in headers.get("Transfer-Encoding", "").lower() or not declared:
                raise DirectUnsupported(req.what)
            # isdigit alone takes '²', which int() refuses: ASCII digits only.
            if not (declared.isascii() and declared.isdigit()) or int(declared) != length:
                raise TransientError(
                    f"{req.what}: Content-Length {declared or 'missing'} for {length} bytes"
                )
            self._receive(sock, rest, length, sink, on_bytes, deadline, req, start)
            reusable = head.keep_alive and len(rest) <= length
        except SinkError:
            raise
        except TimeoutError as exc:
            if deadline.expired():
                raise StallDetected(
                    f"{req.what}: {length} bytes at offset {start} not in within "
                    f"{req.deadline_s:g}s, the deadline for this read"
                ) from exc
            raise StallDetected(
                f"{req.what}: no bytes for {self.options.stall_timeout_s:g}s at offset {start}"
            ) from exc
        except ssl.SSLError as exc:
            raise TransientError(f"{req.what}: TLS error mid-stream: {exc}") from exc
        except OSError as exc:
            raise TransientError(f"{req.what}: {type(exc).__name__}: {exc}") from exc
        finally:
            if sock is not None:
                with self._lock:
                    self._busy.discard(sock)
                if reusable and not self._closed:
                    self._give(key, sock)
                else:
                    sock.close()

    def _exchange(
        self, key: tuple[str, str, int], request: bytes, what: str, deadline: _Deadline
    ) -> tuple[socket.socket, _Head]:
        """Send ``request`` and read the answer's head, on a kept-alive socket when there is
        one. A kept-alive socket the server closed meanwhile (its idle timeout) fails before
        any byte of the answer: the request is sent once more on a fresh connection, as
        urllib3 and aiohttp do, and costs no attempt. On a fresh connection that is an error.
        The socket comes back registered as busy."""
        sock = self._take(key)
        reused = sock is not None
        while True:
            if sock is None:
                sock = self._connect(*key, what, deadline)
            with self._lock:
                self._busy.add(sock)
            try:
                try:
                    sock.sendall(request)
                except _GONE as exc:
                    raise _ClosedEarly from exc
                return sock, _read_head(sock, what, deadline, self.options.stall_timeout_s)
            except BaseException as exc:
                with self._lock:
                    self._busy.discard(sock)
                sock.close()
                if not isinstance(exc, _ClosedEarly):
                    raise
                if not reused or self._closed:
                    raise TransientError(
                        f"{what}: connection closed before the response head"
                    ) from exc
                sock, reused = None, False

    def _receive(
        self,
        sock: socket.socket,
        rest: bytes,
        length: int,
        sink: BodySink,
        on_bytes: Callable[[int], None],
        deadline: _Deadline,
        req: RangeRequest,
        start: int,
    ) -> None:
        """The body: what came with the head, then ``recv_into`` the sink until ``length``
        bytes."""
        got, reported = min(len(rest), length), 0
        lead = memoryview(rest)[:got]
        while lead:
            space = sink.space()
            n = min(len(space), len(lead))
            space[:n] = lead[:n]
            sink.took(n)
            lead = lead[n:]
        stall = self.options.stall_timeout_s
        # Plain sockets: blocking, the kernel waits for each REPORT_BYTES (MSG_WAITALL)
        # and SO_RCVTIMEO bounds a stall: one wake-up a MiB instead of one a packet
        # batch. TLS sockets take no flags: the timeout loop.
        waitall = not isinstance(sock, ssl.SSLSocket)
        if waitall:
            sock.settimeout(None)
        try:
            while got < length:
                space = sink.space()
                want = min(len(space), length - got)
                if waitall:
                    want = min(want, REPORT_BYTES)
                if deadline.at is not None:  # each wait ends by the deadline
                    if waitall:
                        _set_rcvtimeo(sock, deadline.timeout(stall))
                    else:
                        sock.settimeout(deadline.timeout(stall))
                try:
                    n = sock.recv_into(space, want, socket.MSG_WAITALL if waitall else 0)
                except BlockingIOError as exc:  # SO_RCVTIMEO expired with nothing read
                    raise TimeoutError from exc
                if not n:
                    raise TransientError(
                        f"{req.what}: body ended after {got} of {length} bytes at offset {start}"
                    )
                got += n
                sink.took(n)
                if got - reported >= REPORT_BYTES:
                    on_bytes(got - reported)
                    reported = got
        finally:
            on_bytes(got - reported)
            sock.settimeout(stall)
            if waitall and deadline.at is not None:
                _set_rcvtimeo(sock, stall)

    def _connect(
        self, scheme: str, host: str, port: int, what: str, deadline: _Deadline
    ) -> socket.socket:
        try:
            timeout = deadline.timeout(self.options.connect_timeout_s)
            sock = socket.create_connection((host, port), timeout=timeout)
        except (TimeoutError, OSError) as exc:
            raise EndpointUnreachable(f"{what}: cannot connect: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            try:
                sock = self._ssl.wrap_socket(sock, server_hostname=host)
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise EndpointUnreachable(f"{what}: TLS failure: {exc}") from exc
        sock.settimeout(self.options.stall_timeout_s)
        if scheme != "https":
            _set_rcvtimeo(sock, self.options.stall_timeout_s)
        return sock

    def _take(self, key: tuple[str, str, int]) -> socket.socket | None:
        """A kept-alive socket for ``key`` that still looks open (not readable: a socket
        with an EOF or stray bytes waiting was closed or spoken on by the server)."""
        while True:
            with self._lock:
                idle = self._idle[key]
                if not idle:
                    return None
                sock = idle.pop()
            if not _readable(sock):
                return sock
            sock.close()

    def _give(self, key: tuple[str, str, int], sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle[key]
            if len(idle) < IDLE_PER_HOST:
                idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        """Close kept-alive sockets and cut the ones in use, so a reader blocked in recv
        returns now (an interrupted fetch exits without waiting out the stall timeout)."""
        with self._lock:
            self._closed = True
            for idle in self._idle.values():
                for sock in idle:
                    sock.close()
            self._idle.clear()
            for sock in self._busy:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _ClosedEarly(Exception):
    """The connection ended before any byte of the answer (EOF, reset, broken pipe)."""


class _Deadline:
    """When a whole exchange must be over (``at``, monotonic), or never (None)."""

    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def timeout(self, longest: float) -> float:
        """How long the next wait may last: ``longest``, or less to end by the deadline;
        TimeoutError once it has passed."""
        if self.at is None:
            return longest
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return min(longest, left)

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


@dataclass(frozen=True)
class _Head:
    """The final response head: status, headers, whether the connection may carry another
    request, and the body bytes read with it."""

    status: int
    reason: str
    headers: CIMultiDict[str]
    keep_alive: bool
    rest: bytes


def _set_rcvtimeo(sock: socket.socket, seconds: float) -> None:
    # Zero would mean "wait forever": never less than a millisecond.
    micros = max(1000, int(seconds * 1e6))
    value = struct.pack("ll", micros // 1_000_000, micros % 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)


def _readable(sock: socket.socket) -> bool:
    """Is something (an EOF, a reset, stray bytes) waiting on an idle socket?"""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def keeps_alive(version: str, headers: CIMultiDict[str]) -> bool:
    """May this connection carry another request after this answer (RFC 9112 section 9.3)?
    ``close`` among the Connection options ends it; HTTP/1.1 persists by default, HTTP/1.0
    only with ``keep-alive``."""
    options = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    if "close" in options:
        return False
    return version != "HTTP/1.0" or "keep-alive" in options


def _check_exact_range(
    status: int, headers: CIMultiDict[str], start: int, length: int, total_size: int, what: str
) -> None:
    """A 206 of exactly ``[start, start+length)`` of an object of ``total_size`` bytes, else
    ProtocolError (a peer's answer: nothing else is ever correct)."""
    want = f"{start}-{start + length - 1}/{total_size}"
    if status != 206:
        raise ProtocolError(f"{what}: HTTP {status} to a read of bytes {want}; only a 206 will do")
    given = headers.get("Content-Range", "").strip()
    m = _EXACT_RANGE.fullmatch(given)
    if not m or (int(m.group(1)), int(m.group(2)), int(m.group(3))) != (
        start,
        start + length - 1,
        total_size,
    ):
        raise ProtocolError(f"{what}: Content-Range {given[:80]!r} for bytes {want}")


def _read_head(sock: socket.socket, what: str, deadline: _Deadline, stall_s: float) -> _Head:
    """The final response head (at most ``MAX_INTERIM`` informational 1xx heads skipped, all
    of them within ``HEAD_LIMIT`` bytes) and the body bytes read with it. ``_ClosedEarly``
    when the connection ends before any byte."""
    buf = bytearray()
    seen = 0  # bytes of this answer so far
    heads = 0  # of them, in interim heads already skipped
    interim = 0
    while True:
        scan = 0
        while (end := buf.find(b"\r\n\r\n", scan)) < 0:
            if heads + len(buf) > HEAD_LIMIT:
                raise ProtocolError(f"{what}: response heads over {HEAD_LIMIT} bytes")
            scan = max(0, len(buf) - 3)  # a byte at a time must not cost a rescan each
            if deadline.at is not None:
                sock.settimeout(deadline.timeout(stall_s))
            try:
                more = sock.recv(65536)
            except _GONE as exc:
                if not seen:
                    raise _ClosedEarly from exc
                raise
            if not more:
                if not seen:
                    raise _ClosedEarly
                raise TransientError(f"{what}: connection closed in the response head")
            buf += more
            seen += len(more)
        head, buf = bytes(buf[:end]), buf[end + 4 :]
        heads += end + 4
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = parts[1] if len(parts) > 1 else ""
        if (
            not parts[0].startswith("HTTP/1.")
            or len(status) != 3
            or not (status.isascii() and status.isdigit())
        ):
            raise ProtocolError(f"{what}: not an HTTP/1.x answer: {lines[0][:80]!r}")
        if status.startswith("1"):
            # 100 Continue and kin: the real head follows. 101 would switch protocols,
            # which a GET without Upgrade never asks for.
            interim += 1
            if status == "101" or interim > MAX_INTERIM:
                raise ProtocolError(f"{what}: {interim} interim answers ({lines[0][:40]!r})")
            continue
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers.add(name.strip(), value.strip())
        reason = parts[2] if len(parts) > 2 else ""
        return _Head(int(status), reason, headers, keeps_alive(parts[0], headers), bytes(buf))
