"""The direct reader (store/_direct.py) against small raw-socket servers on 127.0.0.1 that
speak HTTP/1.x each in their own way: connection reuse by the protocol (HTTP/1.0,
``Connection: close``, a kept-alive socket the server closed meanwhile), and the bounds a
read keeps against a hostile server (interim answers, head size, a deadline, exact ranges).
The servers count connections and requests, so reuse is seen from the server's side."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spotstart import FetchConfig, fetch
from spotstart.emulate.crosscheck import GcsEmulator
from spotstart.errors import ProtocolError, StallDetected, TransientError
from spotstart.store import DirectReader, HttpOptions, RangeRequest, _http
from tests.conftest import BUCKET

pytestmark = pytest.mark.timeout(60)

DATA = os.urandom(64 << 10)
_RANGE = re.compile(rb"Range: bytes=(\d+)-(\d+)", re.IGNORECASE)


@dataclass
class Exchange:
    """What a handler is told of one request: the connection's number (from 0), the
    request's number on that connection (from 0), the requested range."""

    conn: int
    nth: int
    first: int
    last: int


Handler = Callable[[socket.socket, Exchange], bool]  # answers; False: stop this connection


@dataclass
class RawServer:
    """A threaded HTTP/1.x server written by hand: reads request heads, lets ``handler``
    write whatever bytes it likes, counts connections and requests per connection."""

    handler: Handler
    requests: list[int] = field(default_factory=list)  # per connection
    _stop: threading.Event = field(default_factory=threading.Event)
    _conns: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/obj"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            self.requests.append(0)
            t = threading.Thread(target=self._serve, args=(conn, len(self.requests) - 1))
            t.daemon = True
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, index: int) -> None:
        buf = b""
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                more = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not more:
                return
            buf += more
            while b"\r\n\r\n" in buf:
                head, _, buf = buf.partition(b"\r\n\r\n")
                m = _RANGE.search(head)
                first, last = (int(m.group(1)), int(m.group(2))) if m else (0, len(DATA) - 1)
                nth = self.requests[index]
                self.requests[index] += 1
                try:
                    if not self.handler(conn, Exchange(index, nth, first, last)):
                        conn.close()
                        return
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for t in self._threads:
            t.join(5)
        for c in self._conns:
            c.close()


@pytest.fixture
def server() -> Iterator[Callable[[Handler], RawServer]]:
    started: list[RawServer] = []

    def start(handler: Handler) -> RawServer:
        s = RawServer(handler)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def answer(version: str = "HTTP/1.1", *extra: str) -> Handler:
    """A correct 206 with ``extra`` header lines; the connection is left open whatever the
    head says (a client that reuses a socket it was told is closing is seen doing it)."""

    def handle(conn: socket.socket, ex: Exchange) -> bool:
        body = DATA[ex.first : ex.last + 1]
        head = [
            f"{version} 206 Partial Content",
            f"Content-Range: bytes {ex.first}-{ex.last}/{len(DATA)}",
            f"Content-Length: {len(body)}",
            *extra,
        ]
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        return True

    return handle


class Sink:
    def __init__(self, length: int) -> None:
        self.buf = bytearray(length)
        self.at = 0

    def space(self) -> memoryview:
        return memoryview(self.buf)[self.at :]

    def took(self, n: int) -> None:
        self.at += n


def read(reader: DirectReader, url: str, start: int, length: int, **req: object) -> bytes:
    sink = Sink(length)
    reader.read_into(RangeRequest(url, what="obj", **req), start, length, len(DATA), sink)  # type: ignore[arg-type]
    assert sink.at == length
    return bytes(sink.buf)


def read_all(url: str, n: int = 4, options: HttpOptions | None = None) -> None:
    reader = DirectReader(options or HttpOptions(stall_timeout_s=5))
    try:
        step = len(DATA) // n
        for i in range(n):
            assert read(reader, url, i * step, step) == DATA[i * step : (i + 1) * step]
    finally:
        reader.close()


@pytest.mark.parametrize(
    "version,extra",
    [
        ("HTTP/1.0", ()),
        ("HTTP/1.0", ("Connection: close",)),
        ("HTTP/1.1", ("Connection: close",)),
        ("HTTP/1.1", ("Connection: Keep-Alive, Close",)),
        ("HTTP/1.1", ("Connection: keep-alive", "Connection: close")),
    ],
)
def test_an_answer_that_ends_its_connection_never_puts_the_socket_back_in_the_pool(
    server: Callable[[Handler], RawServer], version: str, extra: tuple[str, ...]
) -> None:
    s = server(answer(version, *extra))
    read_all(s.url)
    assert s.requests == [1, 1, 1, 1]  # four connections, one request each


@pytest.mark.parametrize(
    "version,extra",
    [
        ("HTTP/1.1", ()),
        ("HTTP/1.1", ("Connection: keep-alive",)),
        ("HTTP/1.0", ("Connection: Keep-Alive",)),
    ],
)
def test_a_persistent_connection_carries_every_read(
    server: Callable[[Handler], RawServer], version: str, extra: tuple[str, ...]
) -> None:
    s = server(answer(version, *extra))
    read_all(s.url)
    assert s.requests == [4]


def _closing_after_first(reset: bool) -> Handler:
    """Keep-alive answers, but a connection's second request finds it closed by the server
    (its idle timeout firing as the request arrives): EOF, or a reset."""
    ok = answer()

    def handle(conn: socket.socket, ex: Exchange) -> bool:
        if ex.nth == 0:
            return ok(conn, ex)
        if reset:  # RST instead of FIN
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        return False

    return handle


@pytest.mark.parametrize("reset", [False, True], ids=["eof", "reset"])
def test_a_kept_alive_socket_closed_by_the_server_is_retried_once_on_a_fresh_one(
    server: Callable[[Handler], RawServer], reset: bool
) -> None:
    s = server(_closing_after_first(reset))
    read_all(s.url)  # no error: each stale socket cost one more connection, no attempt
    assert s.requests == [2, 2, 2, 1]


def test_a_fresh_connection_closed_before_the_head_is_an_error_without_a_second_try(
    server: Callable[[Handler], RawServer],
) -> None:
    s = server(lambda conn, ex: False)
    reader = DirectReader(HttpOptions(stall_timeout_s=5))
    with pytest.raises(TransientError, match="closed before the response head"):
        read(reader, s.url, 0, 10)
    reader.close()
    assert s.requests == [1]


def test_a_socket_the_server_closed_while_idle_is_not_taken_from_the_pool(
    server: Callable[[Handler], RawServer],
) -> None:
    ok = answer()
    closed = threading.Event()

    def handle(conn: socket.socket, ex: Exchange) -> bool:
        ok(conn, ex)
        conn.shutdown(socket.SHUT_WR)  # keep-alive said, then a FIN: closed while idle
        closed.set()
        return True

    s = server(handle)
    reader = DirectReader(HttpOptions(stall_timeout_s=5))
    try:
        read(reader, s.url, 0, 10)
        assert closed.wait(10)
        read(reader, s.url, 10, 10)
    finally:
        reader.close()
    assert s.requests == [1, 1]  # the second read went straight to a new connection


def _interim(n: int) -> Handler:
    ok = answer()

    def handle(conn: socket.socket, ex: Exchange) -> bool:
        for _ in range(n):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        return ok(conn, ex)

    return handle


def test_a_few_interim_answers_are_skipped(server: Callable[[Handler], RawServer]) -> None:
    read_all(server(_interim(3)).url)


def test_endless_interim_answers_are_a_protocol_error(
    server: Callable[[Handler], RawServer],
) -> None:
    stop = threading.Event()

    def endless(conn: socket.socket, ex: Exchange) -> bool:
        while not stop.is_set():
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        return False

    s = server(endless)
    reader = DirectReader(HttpOptions(stall_timeout_s=5))
    try:
        with pytest.raises(ProtocolError, match="interim"):
            read(reader, s.url, 0, 10)
    finally:
        stop.set()
        reader.close()


def test_an_endless_head_is_a_protocol_error(server: Callable[[Handler], RawServer]) -> None:
    stop = threading.Event()

    def endless(conn: socket.socket, ex: Exchange) -> bool:
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\n")
        while not stop.is_set():
            conn.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
        return False

    s = server(endless)
    reader = DirectReader(HttpOptions(stall_timeout_s=5))
    try:
        with pytest.raises(ProtocolError, match="heads over"):
            read(reader, s.url, 0, 10)
    finally:
        stop.set()
        reader.close()


def _trickle(stop: threading.Event, in_head: bool) -> Handler:
    """One byte every 20 ms: never a stall, never done."""

    def handle(conn: socket.socket, ex: Exchange) -> bool:
        body = DATA[ex.first : ex.last + 1]
        head = (
            f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {ex.first}-{ex.last}/"
            f"{len(DATA)}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        raw = head + body
        if not in_head:
            conn.sendall(head)
            raw = body
        for i in range(len(raw)):
            if stop.wait(0.02):
                break
            conn.sendall(raw[i : i + 1])
        return False

    return handle


@pytest.mark.parametrize("in_head", [False, True], ids=["body", "head"])
def test_a_trickle_is_cut_at_the_deadline_though_it_never_stalls(
    server: Callable[[Handler], RawServer], in_head: bool
) -> None:
    stop = threading.Event()
    s = server(_trickle(stop, in_head))
    reader = DirectReader(HttpOptions(stall_timeout_s=5))
    try:
        with pytest.raises(StallDetected, match="deadline"):
            read(reader, s.url, 0, 4096, deadline_s=0.5)
    finally:
        stop.set()
        reader.close()


@pytest.mark.parametrize(
    "status,content_range",
    [
        ("200 OK", None),  # the whole body, though it is the range asked for
        ("206 Partial Content", "bytes 0-9/*"),  # an unknown total
        ("206 Partial Content", "bytes 0-9/99"),  # another size
        ("206 Partial Content", "bytes 1-10/{total}"),  # another range
        ("206 Partial Content", "bytes 0-9/{total}0"),
        ("206 Partial Content", None),
    ],
)
def test_an_exact_read_takes_nothing_but_a_206_of_the_asked_range(
    server: Callable[[Handler], RawServer], status: str, content_range: str | None
) -> None:
    def handle(conn: socket.socket, ex: Exchange) -> bool:
        head = [f"HTTP/1.1 {status}", "Content-Length: 10"]
        if content_range is not None:
            head.append("Content-Range: " + content_range.format(total=10))
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + DATA[:10])
        return True

    s = server(handle)
    reader = DirectReader(HttpOptions(stall_timeout_s=5))
    try:
        sink = Sink(10)
        with pytest.raises(ProtocolError):
            reader.read_into(RangeRequest(s.url, what="peer", exact=True), 0, 10, 10, sink)
        assert sink.at == 0  # refused before its body
    finally:
        reader.close()


def test_a_content_length_of_odd_digits_is_refused_as_transient(
    server: Callable[[Handler], RawServer],
) -> None:
    def handle(conn: socket.socket, ex: Exchange) -> bool:
        conn.sendall(
            f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-1/{len(DATA)}\r\n".encode()
            + "Content-Length: ²\r\n\r\n".encode("latin-1")
        )
        return True

    reader = DirectReader(HttpOptions(stall_timeout_s=5))
    try:
        with pytest.raises(TransientError, match="Content-Length"):
            read(reader, server(handle).url, 0, 2)
    finally:
        reader.close()


# The aiohttp transport (listings, stats, the stream path): the same reuse rules.


def _stream_all(url: str, n: int = 4) -> None:
    async def run() -> None:
        options = HttpOptions(stall_timeout_s=5)
        session = _http.make_session(options)
        try:
            step = len(DATA) // n
            for i in range(n):
                out = bytearray()

                async def sink(piece: bytes, out: bytearray = out) -> None:
                    out += piece

                await _http.stream_range(
                    session, url, {}, i * step, step, len(DATA), sink, "obj", options
                )
                assert out == DATA[i * step : (i + 1) * step]
        finally:
            await session.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "version,extra,want",
    [
        ("HTTP/1.0", (), [1, 1, 1, 1]),
        ("HTTP/1.1", ("Connection: close",), [1, 1, 1, 1]),
        ("HTTP/1.1", (), [4]),
    ],
)
def test_the_stream_transport_reuses_connections_by_the_same_rules(
    server: Callable[[Handler], RawServer], version: str, extra: tuple[str, ...], want: list[int]
) -> None:
    s = server(answer(version, *extra))
    _stream_all(s.url)
    assert s.requests == want


def test_the_stream_transport_retries_a_stale_kept_alive_socket_once(
    server: Callable[[Handler], RawServer],
) -> None:
    s = server(_closing_after_first(reset=False))
    _stream_all(s.url)
    assert s.requests == [2, 2, 2, 1]


def test_many_small_objects_from_an_http10_store_come_without_a_single_retry(
    gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # gcp-storage-emulator answers HTTP/1.0 and closes after each answer: every socket put
    # back in the pool was dead, and each next chunk on it cost an attempt (199 retries for
    # 200 objects; a prefix of 1,005 exhausted a chunk's 8 attempts, exit 7).
    objects = {f"small/{i:04d}": bytes([i % 256]) for i in range(300)}
    gcs_emulator.seed(BUCKET, objects)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.endpoint)
    report = fetch(f"gs://{BUCKET}/small/", tmp_path, FetchConfig())
    assert report.retries == 0 and report.chunks_direct == len(objects)
    for key, data in objects.items():
        assert (tmp_path / key.split("/", 1)[1]).read_bytes() == data
