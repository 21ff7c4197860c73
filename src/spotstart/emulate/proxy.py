"""The link emulator's I/O: TCP proxies that pace downloads, delay requests and inject faults.

Threads + ``os.splice`` (zero copy) for body bytes; the decisions live in `spotstart.emulate.link`.
Not a general-purpose proxy: one upstream per listening port, HTTP/1.x awareness only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

from spotstart.emulate.link import (
    HEAD_END,
    MAX_HEAD_BYTES,
    BodyFlavor,
    FaultPlan,
    FaultRule,
    HeadError,
    LinkConfig,
    LinkStats,
    TokenBucket,
    could_be_request,
    fault_response,
    parse_request_head,
    parse_response_head,
)

# 1 MiB per syscall when uncapped (the pipe's size); when capped, one burst per send keeps
# pacing smooth at 50 MB/s (5 ms steps).
_UNCAPPED_CHUNK = 1024 * 1024
_CAPPED_CHUNK = 256 * 1024
_RECV_CHUNK = 256 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class LinkEmulator:
    """One emulated network: shared link settings, NIC budget, fault plan and stats.

    Example::

        with LinkEmulator(LinkConfig(per_conn_bytes_per_s=50e6)) as link:
            proxy = link.open_proxy(("127.0.0.1", 4080), http=True, flavor="gcs")
            ...  # clients connect to proxy.port
    """

    def __init__(
        self,
        config: LinkConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.stats = LinkStats()
        self.faults = FaultPlan()
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._proxies: list[TcpProxy] = []
        self._config = LinkConfig()
        self._aggregate: TokenBucket | None = None
        self.set_config(config or LinkConfig())

    @property
    def config(self) -> LinkConfig:
        return self._config

    @property
    def aggregate_bucket(self) -> TokenBucket | None:
        return self._aggregate

    def set_config(self, config: LinkConfig) -> None:
        """Change caps and latency; live connections pick the new values up on their next send."""
        with self._lock:
            rate = config.aggregate_bytes_per_s
            if rate is None:
                self._aggregate = None
            elif self._aggregate is None:
                self._aggregate = TokenBucket(rate, self.clock)
            else:
                self._aggregate.set_rate(rate)
            self._config = config

    def set_faults(self, rules: list[FaultRule]) -> None:
        self.faults.replace(rules)

    def open_proxy(
        self,
        upstream: tuple[str, int],
        *,
        http: bool,
        flavor: BodyFlavor = "http",
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> TcpProxy:
        """Listen on ``listen_host:listen_port`` (0 = free port) and relay to ``upstream``.

        ``http=True`` parses HTTP/1.x heads (request counting, fault injection); use False for
        TLS or other protocols (caps and latency still apply).
        """
        proxy = TcpProxy(self, upstream, http=http, flavor=flavor)
        proxy.listen(listen_host, listen_port)
        with self._lock:
            self._proxies.append(proxy)
        return proxy

    def close(self) -> None:
        with self._lock:
            proxies, self._proxies = self._proxies, []
        for proxy in proxies:
            proxy.close()

    def __enter__(self) -> LinkEmulator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TcpProxy:
    """One listening port relaying every accepted connection to one upstream."""

    def __init__(
        self, link: LinkEmulator, upstream: tuple[str, int], *, http: bool, flavor: BodyFlavor
    ) -> None:
        self.link = link
        self.upstream = upstream
        self.http = http
        self.flavor: BodyFlavor = flavor
        self._listener: socket.socket | None = None
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.host = ""
        self.port = 0

    def listen(self, host: str, port: int) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(512)
        self._listener = listener
        self.host, self.port = listener.getsockname()[:2]
        threading.Thread(
            target=self._accept_loop, name=f"proxy-accept-{self.port}", daemon=True
        ).start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            conn = _Connection(self, client)
            with self._lock:
                if self._closed.is_set():
                    client.close()
                    return
                self._connections.add(conn)
            conn.start()

    def forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            conn.abort()


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


class _UpstreamClosed(Exception):
    """The upstream ended the connection in the middle of a response."""


class _Connection:
    """One client connection: a down thread (upstream -> client) and an up thread."""

    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.link = proxy.link
        self.client = client
        self.upstream: socket.socket | None = None
        self.pending: deque[tuple[str, FaultRule | None]] = deque()
        self.client_lock = threading.Lock()
        self.client_gone = threading.Event()
        self.down_seq = 0
        self._finished = 0
        self._finish_lock = threading.Lock()
        self._per_conn_rate: float | None = None
        self._bucket: TokenBucket | None = None
        self._pipe: tuple[int, int] | None = None
        self._reset = False
        # set when the up thread lost track of request boundaries (chunked upload, not HTTP)
        self.up_raw = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self.link.stats.connection_opened()
        threading.Thread(target=self._down_main, name="proxy-down", daemon=True).start()

    def abort(self) -> None:
        self.client_gone.set()
        _shutdown(self.client, socket.SHUT_RDWR)
        if self.upstream is not None:
            _shutdown(self.upstream, socket.SHUT_RDWR)

    def _finish(self) -> None:
        with self._finish_lock:
            self._finished += 1
            if self._finished < 2:
                return
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        if self._pipe is not None:
            os.close(self._pipe[0])
            os.close(self._pipe[1])
        self.link.stats.connection_closed()
        self.proxy.forget(self)

    def _down_main(self) -> None:
        try:
            upstream = socket.create_connection(self.proxy.upstream, timeout=10)
        except OSError:
            self._finished = 1
            self._finish()
            return
        upstream.settimeout(None)
        for sock in (upstream, self.client):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream = upstream
        try:
            pipe = os.pipe()
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, _UNCAPPED_CHUNK)
            self._pipe = pipe
        except OSError:
            self._pipe = None
        threading.Thread(target=self._up_main, name="proxy-up", daemon=True).start()
        try:
            if self.proxy.http:
                self._relay_http_down(upstream)
            else:
                self._relay_raw_down(upstream, bytearray())
        except (OSError, _UpstreamClosed, HeadError, ValueError):
            pass
        finally:
            if not self._reset:
                _shutdown(self.client, socket.SHUT_RDWR)
            _shutdown(upstream, socket.SHUT_RDWR)
            self._finish()

    def _up_main(self) -> None:
        assert self.upstream is not None
        try:
            self._relay_up(self.upstream)
        except (OSError, HeadError, ValueError):
            pass
        finally:
            self.client_gone.set()
            _shutdown(self.upstream, socket.SHUT_WR)
            self._finish()

    # -- pacing ----------------------------------------------------------------------------
    def _chunk(self) -> int:
        config = self.link.config
        capped = config.per_conn_bytes_per_s is not None or config.aggregate_bytes_per_s is not None
        return _CAPPED_CHUNK if capped else _UNCAPPED_CHUNK

    def _pace(self, n_bytes: int) -> None:
        rate = self.link.config.per_conn_bytes_per_s
        if rate != self._per_conn_rate:
            self._per_conn_rate = rate
            if rate is None:
                self._bucket = None
            elif self._bucket is None:
                self._bucket = TokenBucket(rate, self.link.clock)
            else:
                self._bucket.set_rate(rate)
        wait = 0.0
        if self._bucket is not None:
            wait = self._bucket.reserve(n_bytes)
        aggregate = self.link.aggregate_bucket
        if aggregate is not None:
            wait = max(wait, aggregate.reserve(n_bytes))
        if wait > 0.0005:
            self.link.sleep(wait)

    # -- downstream (server -> client) ---------------------------------------------------------
    def _send_down(self, data: bytes | bytearray | memoryview, body_bytes: int) -> None:
        if not data:
            return
        self._pace(len(data))
        with self.client_lock:
            self.client.sendall(data)
        self.down_seq += 1
        self.link.stats.add_down(len(data), body_bytes)

    def _move_down(self, upstream: socket.socket, limit: int, body: bool) -> int:
        """Move up to ``limit`` bytes from upstream to client; return 0 at upstream EOF."""
        n = min(limit, self._chunk())
        if self._pipe is None:
            data = upstream.recv(n)
            self._send_down(data, len(data) if body else 0)
            return len(data)
        pipe_r, pipe_w = self._pipe
        moved = os.splice(upstream.fileno(), pipe_w, n)
        if moved == 0:
            return 0
        self._pace(moved)
        with self.client_lock:
            left = moved
            while left:
                left -= os.splice(pipe_r, self.client.fileno(), left)
        self.down_seq += 1
        self.link.stats.add_down(moved, moved if body else 0)
        return moved

    def _relay_raw_down(self, upstream: socket.socket, buf: bytearray) -> None:
        self._send_down(buf, 0)
        while self._move_down(upstream, _UNCAPPED_CHUNK, body=False):
            pass

    def _emit_body(self, upstream: socket.socket, buf: bytearray, n_bytes: int) -> None:
        """Relay exactly ``n_bytes`` of body, taking what is already in ``buf`` first."""
        take = min(len(buf), n_bytes)
        if take:
            self._send_down(buf[:take], take)
            del buf[:take]
        left = n_bytes - take
        while left:
            moved = self._move_down(upstream, left, body=True)
            if moved == 0:
                raise _UpstreamClosed
            left -= moved

    def _read_head(self, upstream: socket.socket, buf: bytearray) -> int | None:
        """Fill ``buf`` until it holds a complete head; return its end, None at EOF/no head."""
        while True:
            idx = buf.find(HEAD_END)
            if idx >= 0:
                return idx
            if len(buf) > MAX_HEAD_BYTES or (len(buf) >= 5 and not buf.startswith(b"HTTP/")):
                return None
            data = upstream.recv(_RECV_CHUNK)
            if not data:
                return None
            buf += data

    def _relay_http_down(self, upstream: socket.socket) -> None:
        buf = bytearray()
        while True:
            idx = self._read_head(upstream, buf)
            if idx is None:
                # EOF, or not HTTP after all: hand over whatever is left untouched.
                self._relay_raw_down(upstream, buf)
                return
            head = parse_response_head(bytes(buf[:idx]))
            head_bytes = bytes(buf[: idx + len(HEAD_END)])
            del buf[: idx + len(HEAD_END)]
            if 100 <= head.status < 200:
                self._send_down(head_bytes, 0)
                continue
            if not self.pending and self.up_raw:
                # we no longer know which request this answers (a HEAD?): stop parsing
                buf[:0] = head_bytes
                self._relay_raw_down(upstream, buf)
                return
            method, rule = self.pending.popleft() if self.pending else ("GET", None)
            body_bytes = head.body_bytes(method)
            self._send_down(head_bytes, 0)
            if body_bytes is None:
                # chunked or close-delimited: no more request boundaries on this connection
                self._relay_raw_down(upstream, buf)
                return
            if not self._relay_one_body(upstream, buf, body_bytes, rule):
                return

    def _relay_one_body(
        self, upstream: socket.socket, buf: bytearray, body_bytes: int, rule: FaultRule | None
    ) -> bool:
        """Relay one response body applying ``rule``; False when the connection is over."""
        if rule is None or rule.kind == "status":
            self._emit_body(upstream, buf, body_bytes)
            return True
        if rule.kind == "corrupt":
            if rule.at_byte >= body_bytes:
                self._emit_body(upstream, buf, body_bytes)
                return True
            self._emit_body(upstream, buf, rule.at_byte)
            while not buf:
                data = upstream.recv(_RECV_CHUNK)
                if not data:
                    raise _UpstreamClosed
                buf += data
            buf[0] ^= 0xFF
            self._emit_body(upstream, buf, body_bytes - rule.at_byte)
            return True
        first = min(rule.after_bytes, body_bytes)
        self._emit_body(upstream, buf, first)
        if rule.kind == "stall":
            self.client_gone.wait(rule.seconds)
            if self.client_gone.is_set():
                return False
            self._emit_body(upstream, buf, body_bytes - first)
            return True
        if rule.kind == "reset":
            # SO_LINGER 0 turns close() into an RST; SHUT_RD wakes our up thread without a FIN.
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._reset = True
            _shutdown(self.client, socket.SHUT_RD)
        else:  # truncate: a clean FIN although Content-Length promised more
            _shutdown(self.client, socket.SHUT_WR)
        _shutdown(upstream, socket.SHUT_RDWR)
        return False

    # -- upstream (client -> server) -----------------------------------------------------------
    def _relay_up(self, upstream: socket.socket) -> None:
        buf = bytearray()
        raw = not self.proxy.http
        body_left = 0
        discard = False
        seen_down = -1
        while True:
            data = self.client.recv(_RECV_CHUNK)
            if not data:
                return
            self.link.stats.add_up(len(data))
            if self.down_seq != seen_down:
                # a new request (first data, or data after a response): time to first byte
                latency = self.link.config.first_byte_latency_s
                if latency > 0:
                    self.link.sleep(latency)
                seen_down = self.down_seq
            if raw:
                upstream.sendall(data)
                continue
            buf += data
            while buf:
                if body_left:
                    take = min(body_left, len(buf))
                    if not discard:
                        upstream.sendall(buf[:take])
                    del buf[:take]
                    body_left -= take
                    continue
                idx = buf.find(HEAD_END)
                if idx < 0:
                    if len(buf) > MAX_HEAD_BYTES or not could_be_request(buf):
                        raw = self.up_raw = True
                        upstream.sendall(buf)
                        buf.clear()
                    break
                try:
                    request = parse_request_head(bytes(buf[:idx]))
                except HeadError:
                    raw = self.up_raw = True
                    upstream.sendall(buf)
                    buf.clear()
                    break
                head_bytes = bytes(buf[: idx + len(HEAD_END)])
                del buf[: idx + len(HEAD_END)]
                self.link.stats.add_request()
                rule = self.link.faults.take(request)
                if rule is not None:
                    self.link.stats.add_fault(rule.kind)
                request_body = request.body_bytes
                if rule is not None and rule.kind == "status":
                    # a refused body the client may never send (Expect: 100-continue) or whose
                    # end we cannot find (chunked): answer and close instead of guessing
                    close = request_body is None or (
                        request_body > 0
                        and "100-continue" in request.headers.get("expect", "").lower()
                    )
                    reply = fault_response(rule, self.proxy.flavor, close=close)
                    with self.client_lock:
                        self.client.sendall(reply)
                    self.down_seq += 1
                    self.link.stats.add_down(len(reply), 0)
                    if close or request_body is None:
                        _shutdown(self.client, socket.SHUT_WR)
                        return
                    discard = True
                    body_left = request_body
                    continue
                self.pending.append((request.method, rule))
                upstream.sendall(head_bytes)
                discard = False
                if request_body is None:
                    raw = self.up_raw = True
                    upstream.sendall(buf)
                    buf.clear()
                    break
                body_left = request_body


def stats_snapshot(link: LinkEmulator) -> dict[str, Any]:
    """Stats plus the live fault rules with their remaining counts."""
    snap = link.stats.snapshot()
    snap["faults_remaining"] = [
        {**rule.to_dict(), "remaining": left} for rule, left in link.faults.remaining()
    ]
    return snap
