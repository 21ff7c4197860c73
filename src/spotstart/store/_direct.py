"""Ranged GETs read straight into the caller's memory (a destination file's pages, a tensor's
storage) from a worker thread: one blocking HTTP/1.1 exchange per call, ``recv_into`` the
target, the GIL released while the bytes move, so they cross user space once. Measured
against the aiohttp path in bench/fetch/datapath.py (a third less CPU per GB).

Only the body of a ranged GET goes this way; listings, stats and small reads stay on the
async transport (_http.py). Answers are judged by the same pure functions
(``error_for_status``, ``check_range_answer``), so both transports refuse the same things."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict

from spotstart.errors import EndpointUnreachable, ProtocolError, StallDetected, TransientError
from spotstart.store import _http
from spotstart.store.base import ObjectInfo

HEAD_LIMIT = 64 << 10
REPORT_BYTES = 1 << 20  # progress granularity: a bar that moves, 50 wake-ups a second at 50 MB/s
IDLE_PER_HOST = 64


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


class DirectRangeSource(Protocol):
    """A store whose ranged GETs the direct reader can send: it signs them, the reader
    moves the bytes."""

    async def range_request(self, obj: ObjectInfo, start: int, length: int) -> RangeRequest: ...


class DirectReader:
    """Thread-safe; sockets are kept alive and reused per (scheme, host, port)."""

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
        sock = self._take(key) or self._connect(scheme, host, port, req.what)
        with self._lock:
            self._busy.add(sock)
        reusable = False
        try:
            lines = [f"GET {url.raw_path_qs} HTTP/1.1", f"Host: {url.raw_authority}"]
            lines.append(f"Range: bytes={start}-{start + length - 1}")
            lines.append("Accept-Encoding: identity")
            lines += [f"{k}: {v}" for k, v in req.headers.items() if k.lower() != "range"]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            status, reason, headers, rest = _read_head(sock, req.what)
            if status >= 300:
                body = rest[:2048].decode("utf-8", "replace")
                raise _http.error_for_status(status, reason, headers, body, req.what, hint=req.hint)
            _http.check_range_answer(
                status, headers, start, length, total_size, req.what, req.pinned
            )
            declared = headers.get("Content-Length", "")
            if "chunked" in headers.get("Transfer-Encoding", "").lower() or not declared:
                raise DirectUnsupported(req.what)
            if not declared.isdigit() or int(declared) != length:
                raise TransientError(
                    f"{req.what}: Content-Length {declared or 'missing'} for {length} bytes"
                )
            got, reported = min(len(rest), length), 0
            lead = memoryview(rest)[:got]
            while lead:
                space = sink.space()
                n = min(len(space), len(lead))
                space[:n] = lead[:n]
                sink.took(n)
                lead = lead[n:]
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
                    try:
                        n = sock.recv_into(space, want, socket.MSG_WAITALL if waitall else 0)
                    except BlockingIOError as exc:  # SO_RCVTIMEO expired with nothing read
                        raise TimeoutError from exc
                    if not n:
                        raise TransientError(
                            f"{req.what}: body ended after {got} of {length} bytes at offset "
                            f"{start}"
                        )
                    got += n
                    sink.took(n)
                    if got - reported >= REPORT_BYTES:
                        on_bytes(got - reported)
                        reported = got
            finally:
                on_bytes(got - reported)
                if waitall:
                    sock.settimeout(self.options.stall_timeout_s)
            reusable = headers.get("Connection", "").lower() != "close" and len(rest) <= length
        except SinkError:
            raise
        except TimeoutError as exc:
            raise StallDetected(
                f"{req.what}: no bytes for {self.options.stall_timeout_s:g}s at offset {start}"
            ) from exc
        except ssl.SSLError as exc:
            raise TransientError(f"{req.what}: TLS error mid-stream: {exc}") from exc
        except OSError as exc:
            raise TransientError(f"{req.what}: {type(exc).__name__}: {exc}") from exc
        finally:
            with self._lock:
                self._busy.discard(sock)
            if reusable and not self._closed:
                self._give(key, sock)
            else:
                sock.close()

    def _connect(self, scheme: str, host: str, port: int, what: str) -> socket.socket:
        try:
            sock = socket.create_connection((host, port), timeout=self.options.connect_timeout_s)
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
            seconds = max(1, int(self.options.stall_timeout_s))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, 0))
        return sock

    def _take(self, key: tuple[str, str, int]) -> socket.socket | None:
        with self._lock:
            idle = self._idle[key]
            return idle.pop() if idle else None

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


def _read_head(sock: socket.socket, what: str) -> tuple[int, str, CIMultiDict[str], bytes]:
    """The final response head (informational 1xx heads skipped) and the body bytes read
    with it."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            more = sock.recv(65536)
            if not more:
                # A kept-alive socket the server closed meanwhile: a passing failure.
                raise TransientError(f"{what}: connection closed before the response head")
            buf += more
            if len(buf) > HEAD_LIMIT:
                raise ProtocolError(f"{what}: a response head over {HEAD_LIMIT} bytes")
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"{what}: not an HTTP/1.x answer: {lines[0][:80]!r}")
        if parts[1].startswith("1"):
            continue  # 100 Continue and kin: the real head follows
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers.add(name.strip(), value.strip())
        return int(parts[1]), parts[2] if len(parts) > 2 else "", headers, buf
