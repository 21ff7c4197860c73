"""A TCP listener that stays up under abuse, for servers any host on the network can reach (the
peer server): a cap on open connections, a deadline for each request head, a bound on its
size, and accept errors (EMFILE...) logged once per interval with a count. Protocol-agnostic:
it wraps any asyncio protocol factory (aiohttp's ``web.Server``); HTTP stays aiohttp's.

The threats: a connection flood (1,100 sockets held open) that fills the open-files table and
stops the process accepting anything, its own probes included; a slowloris (a header byte a
second) holding every slot; a head of megabytes. The answers, in order: a connection beyond
``max_connections`` evicts the longest-idle connection that is not in a request (a flood of
idle sockets cannot lock a real client out), or, when every connection is busy, gets a canned
``503`` and is closed at once; a head not complete ``head_timeout_s`` after its first byte (or
after the accept) closes the connection; a head over ``max_head_bytes`` gets ``431`` and a
close; when accept itself fails for want of descriptors, a spare descriptor kept for the
purpose is released so the pending connection can be accepted and closed at once (not left
queued), and the failure is counted, not logged per call.

Not an HTTP parser: the head's end is found by its blank line, which is all a deadline needs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "BoundedListener",
    "ListenLimits",
    "OneLinePerInterval",
    "is_loopback",
    "raise_open_files_limit",
    "request_error_log",
]

# What a client over the cap, or with a head too large, is told before the close.
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
    b"Content-Length: 5\r\n\r\nbusy\n"
)
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
    b"Content-Length: 0\r\n\r\n"
)
# Accept failures that mean "no descriptor or memory now": shed and back off, never spin.
_SCARCE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True)
class ListenLimits:
    """Bounds of one listener. Memory: at most ``max_connections`` transports with their read
    buffers (64 KiB each in aiohttp) plus ``max_head_bytes`` of head each. Descriptors: at
    most ``max_connections`` + 2 (the listening socket and the spare); keep it well below
    ``ulimit -n`` so the rest of the process can still open files and sockets."""

    max_connections: int = 512
    head_timeout_s: float = 10.0  # from the accept, or from a head's first byte, to its end
    idle_timeout_s: float = 15.0  # keep-alive: a connection with no request is closed after
    max_head_bytes: int = 16 << 10
    backlog: int = 1024
    accept_log_interval_s: float = 10.0
    # The application reads request bodies (the guard's proxy): the bytes after a head belong
    # to its request until ``request_done`` (this listener cannot frame a body, so they are
    # neither counted as a head nor given a deadline); the next head is timed from its first
    # byte after that. False: every byte after a head starts the next one (GET-only servers).
    request_bodies: bool = False

    @classmethod
    def for_process(cls, max_connections: int | None = None, share: int = 2) -> ListenLimits:
        """Limits for a listener in this process, after raising the open-files limit
        (:func:`raise_open_files_limit`): ``max_connections`` as given, else 512 or
        1/``share`` of ``ulimit -n``, whichever is less (the rest is the process's own: its
        files, its streams, the guard's proxy)."""
        soft = raise_open_files_limit()
        if max_connections is None:
            max_connections = max(8, min(cls.max_connections, soft // share))
        return cls(max_connections=max_connections)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only: 127.0.0.0/8, ::1 (also as
    ``::ffff:127.x``) and ``localhost``. Any other name or address counts as reachable from
    elsewhere (a name may resolve to anything)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def raise_open_files_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (as the Go runtime does at start; the
    soft 1024 of many systems is for ``select``, which asyncio does not use) and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class OneLinePerInterval(logging.Filter):
    """A server's request errors (aiohttp's, for a malformed request), as one line per interval
    with a count and no traceback: anyone who reaches the port gets one logged per malformed
    request, eleven lines each, so a loop of them would bury the log and cost the CPU the
    server needs (as accept errors would)."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval_s, self.clock = interval_s, clock
        self.last = -float("inf")
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        if now - self.last < self.interval_s:
            self.suppressed += 1
            return False
        self.last = now
        exc = record.exc_info[1] if record.exc_info else None
        cause = f": {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}" if exc else ""
        more = f" ({self.suppressed} more since the last line)" if self.suppressed else ""
        record.msg, record.args = f"{record.getMessage()}{cause}{more}", ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        self.suppressed = 0
        return True


def request_error_log(parent: logging.Logger) -> logging.Logger:
    """A child of ``parent`` for one server's HTTP request errors, through a
    :class:`OneLinePerInterval` of its own (an unregistered logger: each server counts its
    own). Pass it as aiohttp's ``logger=``."""
    log = logging.Logger(f"{parent.name}.http")
    log.parent = parent
    log.addFilter(OneLinePerInterval())
    return log


class _RateLimitedLog:
    """One line for the first accept failure, then at most one per interval with the count
    (a flood makes accept fail thousands of times a second; a line each would bury the log
    and cost the CPU the server needs)."""

    def __init__(self, log: logging.Logger, what: str, interval_s: float) -> None:
        self.log, self.what, self.interval_s = log, what, interval_s
        self.count = 0  # failures since the last line
        self.total = 0
        self.last: OSError | None = None
        self._logged_at = -1e18

    def failed(self, exc: OSError, now: float) -> None:
        self.count += 1
        self.total += 1
        self.last = exc
        if now - self._logged_at >= self.interval_s:
            self._emit(now)

    def flush(self, now: float) -> None:
        if self.count:
            self._emit(now)

    def _emit(self, now: float) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.log.warning(
            "%s: accept failed %d time(s) (last: %s; open-files limit %d): connections shed",
            self.what,
            self.count,
            self.last.strerror if self.last is not None else "?",
            soft,
        )
        self.count = 0
        self._logged_at = now


class _Connection(asyncio.Protocol):
    """Wraps the server's protocol for one connection: tracks whether a request head is being
    read (head deadline and size), whether a request is being handled (not evictable), and
    tells the listener when it is gone."""

    def __init__(self, listener: BoundedListener, inner: asyncio.Protocol) -> None:
        self.listener = listener
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.reading_head = True  # a new connection is reading its first head
        self.head_bytes = 0
        self.tail = b""  # the last 3 bytes seen: a blank line may straddle two reads
        self.handling = 0  # requests inside the application now
        self.in_request = False  # request_bodies: a head was read, its request not done yet
        self.deadline: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.listener._opened(self)
        self._arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.in_request:  # request_bodies: a body (or whatever follows it) is the request's
            self.inner.data_received(data)
            return
        if not self.reading_head:
            # Bytes after a complete head start the next one (keep-alive, pipelining; our
            # routes take no bodies): its deadline runs from now.
            self.reading_head, self.head_bytes, self.tail = True, 0, b""
            self._arm()
        seen = self.tail + data
        end = _head_end(seen)
        if end < 0:
            self.head_bytes += len(data)
            self.tail = seen[-3:]
            if self.head_bytes > self.listener.limits.max_head_bytes:
                self._refuse(_TOO_LARGE)
                return
        else:
            self.head_bytes += end - len(self.tail)
            if self.head_bytes > self.listener.limits.max_head_bytes:
                self._refuse(_TOO_LARGE)
                return
            self.reading_head, self.tail = False, b""
            if self.listener.limits.request_bodies:
                # What follows is its body. The deadline stays (and the slot evictable) until
                # the application takes the request: a head seen to end here that the server
                # does not take as one must not hold a slot for ever.
                self.in_request = True
                self.inner.data_received(data)
                return
            self._disarm()
            self.listener._busy(self)
            rest = seen[end:]
            if rest:  # a pipelined next head began in the same read
                self.reading_head, self.head_bytes = True, len(rest)
                self.tail = rest[-3:]
                self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.listener._closed(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- for the listener and the application ----------------------------------------------------

    def request_started(self) -> None:
        self.handling += 1
        self.listener._busy(self)
        if self.listener.limits.request_bodies:
            self.in_request, self.reading_head = True, False
            self._disarm()

    def request_done(self) -> None:
        self.handling = max(0, self.handling - 1)
        if self.handling == 0:
            self.listener._idle(self)
            if self.in_request:  # idle now: the next byte starts a head, timed from then
                self.in_request, self.reading_head, self.head_bytes = False, False, 0
                return
            if self.reading_head and self.deadline is None:
                self._arm()  # a next head that began during the request: its deadline now

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _refuse(self, answer: bytes) -> None:
        self._disarm()
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.write(answer)
            self.transport.close()
            # a client that never reads must not keep the slot: abort if not gone soon
            asyncio.get_running_loop().call_later(1.0, self.abort)

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self.deadline = loop.call_later(self.listener.limits.head_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        if (self.reading_head or self.in_request) and self.handling == 0:
            self.listener.head_timeouts += 1
            self.abort()


def _head_end(data: bytes) -> int:
    """Offset just past the first blank line (CRLF CRLF, or LF LF as lenient parsers take
    it), or -1."""
    ends = [i + n for i, n in ((data.find(b"\r\n\r\n"), 4), (data.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else -1


class BoundedListener:
    """Accepts connections for ``factory`` (an asyncio protocol factory) within ``limits``.

    Example::

        listener = BoundedListener(runner.server, ListenLimits(max_connections=256), log, "peers")
        port = await listener.start("0.0.0.0", 8471)
        ...
        await listener.close()
    """

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        limits: ListenLimits,
        log: logging.Logger,
        what: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.factory = factory
        self.limits = limits
        self.log = log
        self.clock = clock
        self.accept_errors = _RateLimitedLog(log, what, limits.accept_log_interval_s)
        self.connections: set[_Connection] = set()
        # Evictable connections, least recently idle first (insertion order of an OrderedDict).
        self._idle_order: collections.OrderedDict[_Connection, None] = collections.OrderedDict()
        self._by_transport: dict[asyncio.BaseTransport, _Connection] = {}
        self.pending = 0  # accepted, transport not yet made
        self.evicted = 0
        self.refused = 0
        self.shed = 0
        self.head_timeouts = 0
        self._sockets: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._spare: int | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Bind every address ``host`` resolves to (port 0: a free one) and start accepting;
        returns the port. Raises OSError when nothing can be bound."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if self.port:  # port 0 and several addresses: the same port on each
                    addr = (addr[0], self.port, *addr[2:])
                sock.bind(addr)
                sock.listen(self.limits.backlog)
                sock.setblocking(False)
            except OSError:
                sock.close()
                self._close_sockets()
                raise
            self._sockets.append(sock)
            self.port = int(sock.getsockname()[1])
        self._spare = _open_spare()
        self._tasks = [loop.create_task(self._accept_loop(s)) for s in self._sockets]
        return self.port

    async def close(self) -> None:
        """Stop accepting; open connections are the application's to finish or close."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._close_sockets()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        self.accept_errors.flush(self.clock())

    def _close_sockets(self) -> None:
        for s in self._sockets:
            s.close()
        self._sockets = []

    # -- for the application (request start and end, by transport) --------------------------------

    def connection_of(self, transport: asyncio.BaseTransport | None) -> _Connection | None:
        return self._by_transport.get(transport) if transport is not None else None

    # -- accepting -------------------------------------------------------------------------------

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                self.accept_errors.failed(exc, self.clock())
                if exc.errno in _SCARCE and not self._shed_one(sock):
                    await asyncio.sleep(0.05)  # nothing to shed with: do not spin
                continue
            if self._spare is None:  # descriptors ran out: the spare comes first
                _refuse_now(conn)
                self.shed += 1
                self._spare = _open_spare()
                continue
            full = len(self.connections) + self.pending >= self.limits.max_connections
            if full and not self._evict_one():
                self.refused += 1
                _refuse_now(conn)
                continue
            self.pending += 1
            try:
                await loop.connect_accepted_socket(lambda: _Connection(self, self.factory()), conn)
            except OSError:
                conn.close()
            finally:
                self.pending -= 1

    def _shed_one(self, sock: socket.socket) -> bool:
        """Out of descriptors: give up the spare one, accept a pending connection with it and
        close that at once (the client learns now, not after a queue timeout), then take the
        spare back."""
        if self._spare is None:
            self._spare = _open_spare()
            return False
        os.close(self._spare)
        self._spare = None
        try:
            conn, _ = sock.accept()
        except OSError:
            return False
        else:
            self.shed += 1
            _refuse_now(conn)  # closed before the spare is taken back: its descriptor is ours
            return True
        finally:
            self._spare = _open_spare()

    def _evict_one(self) -> bool:
        """Close the connection idle the longest (no request in it), to make room."""
        for conn in self._idle_order:
            if conn.handling == 0:
                del self._idle_order[conn]
                self.connections.discard(conn)  # counted out now: its close comes later
                self.evicted += 1
                conn.abort()
                return True
        return False

    # -- connection state (called by _Connection) -----------------------------------------------

    def _opened(self, conn: _Connection) -> None:
        self.connections.add(conn)
        if conn.transport is not None:
            self._by_transport[conn.transport] = conn
        self._idle_order[conn] = None

    def _closed(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        self._idle_order.pop(conn, None)
        if conn.transport is not None:
            self._by_transport.pop(conn.transport, None)

    def _busy(self, conn: _Connection) -> None:
        self._idle_order.pop(conn, None)

    def _idle(self, conn: _Connection) -> None:
        if conn in self.connections:
            self._idle_order.pop(conn, None)
            self._idle_order[conn] = None  # to the end: idle the shortest


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _refuse_now(conn: socket.socket) -> None:
    """A canned 503 (fits any socket buffer, never blocks) and the close."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(_BUSY)
    conn.close()
