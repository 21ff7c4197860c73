"""The link emulator's proxy against a local HTTP origin: bytes intact, faults observable."""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
from collections.abc import Iterator

import pytest

from spotstart.emulate.link import FaultRule, LinkConfig
from spotstart.emulate.proxy import LinkEmulator, TcpProxy

from .conftest import Origin


class RecordingSleep:
    """Records what the link asked to sleep and sleeps nothing (no wall clock in tests)."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self.calls.append(seconds)


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def link(sleeps: RecordingSleep) -> Iterator[LinkEmulator]:
    with LinkEmulator(
        LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.030), sleep=sleeps
    ) as emulator:
        yield emulator


@pytest.fixture
def proxy(link: LinkEmulator, origin: Origin) -> TcpProxy:
    return link.open_proxy((origin.host, origin.port), http=True, flavor="gcs")


def get(
    proxy: TcpProxy, path: str = "/o", headers: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_bytes_arrive_intact_and_are_counted(proxy: TcpProxy, origin: Origin) -> None:
    status, body = get(proxy)
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == origin.sha256
    stats = proxy.link.stats.snapshot()
    assert stats["body_bytes_down"] == len(origin.data)
    assert stats["bytes_down"] > len(origin.data)
    assert stats["requests"] == 1
    assert stats["connections_opened"] == 1


def test_capped_link_still_delivers_intact_bytes(link: LinkEmulator, proxy: TcpProxy) -> None:
    link.set_config(LinkConfig(per_conn_bytes_per_s=40e6, aggregate_bytes_per_s=30e6))
    status, body = get(proxy, headers={"Range": "bytes=1000-2000999"})
    assert status == 206
    assert body == proxy_origin_slice(1000, 2000999)


def proxy_origin_slice(start: int, end: int) -> bytes:
    from .conftest import ORIGIN_BYTES

    return ORIGIN_BYTES[start : end + 1]


def test_caps_ask_for_sleeps_that_add_up_to_the_rate(
    link: LinkEmulator, proxy: TcpProxy, sleeps: RecordingSleep
) -> None:
    link.set_config(LinkConfig(per_conn_bytes_per_s=10e6, first_byte_latency_s=0))
    status, body = get(proxy)
    assert status == 200
    # the recording sleep does not sleep, so the bucket's debt grows: the asked waits must
    # still cover the body at 10 MB/s (minus the free burst)
    assert max(sleeps.calls) >= (len(body) - 256 * 1024) / 10e6 * 0.9


def test_each_request_on_a_keep_alive_connection_gets_first_byte_latency(
    proxy: TcpProxy, sleeps: RecordingSleep
) -> None:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    for start in (0, 100, 200):
        conn.request("GET", "/o", headers={"Range": f"bytes={start}-{start + 9}"})
        assert conn.getresponse().read() == proxy_origin_slice(start, start + 9)
    conn.close()
    assert sleeps.calls.count(0.030) == 3
    assert proxy.link.stats.snapshot()["connections_opened"] == 1


def test_status_fault_answers_without_forwarding_then_is_spent(proxy: TcpProxy) -> None:
    proxy.link.set_faults([FaultRule(kind="status", status=503, count=2, retry_after_s=1)])
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    seen = []
    for _ in range(3):
        conn.request("GET", "/o", headers={"Range": "bytes=0-9"})
        response = conn.getresponse()
        body = response.read()
        seen.append((response.status, response.getheader("Retry-After")))
    conn.close()
    assert seen == [(503, "1"), (503, "1"), (206, None)]
    assert b"backendError" not in body
    stats = proxy.link.stats.snapshot()
    assert stats["faults_fired"]["status"] == 2
    assert stats["requests"] == 3


def test_fault_match_by_range_only_spares_plain_requests(proxy: TcpProxy) -> None:
    proxy.link.set_faults([FaultRule(kind="status", status=429, ranged_only=True)])
    assert get(proxy)[0] == 200
    assert get(proxy, headers={"Range": "bytes=0-0"})[0] == 429


def test_reset_fault_resets_the_client_connection(proxy: TcpProxy) -> None:
    proxy.link.set_faults([FaultRule(kind="reset", after_bytes=100_000)])
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        get(proxy)
    assert proxy.link.stats.snapshot()["faults_fired"]["reset"] == 1
    assert get(proxy)[0] == 200  # spent


def test_reset_fault_is_an_rst_not_a_fin(proxy: TcpProxy) -> None:
    proxy.link.set_faults([FaultRule(kind="reset", after_bytes=10)])
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(b"GET /o HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass


def test_truncate_fault_closes_cleanly_before_content_length(proxy: TcpProxy) -> None:
    proxy.link.set_faults([FaultRule(kind="truncate", after_bytes=123_456)])
    with pytest.raises(http.client.IncompleteRead) as info:
        get(proxy)
    assert len(info.value.partial) == 123_456


def test_corrupt_fault_flips_exactly_one_byte(proxy: TcpProxy, origin: Origin) -> None:
    proxy.link.set_faults([FaultRule(kind="corrupt", at_byte=1_000_001)])
    status, body = get(proxy)
    assert status == 200
    assert len(body) == len(origin.data)
    assert hashlib.sha256(body).hexdigest() != origin.sha256
    diff = [i for i in range(len(body)) if body[i] != origin.data[i]]
    assert diff == [1_000_001]
    assert body[1_000_001] == origin.data[1_000_001] ^ 0xFF


def test_stall_fault_starves_the_client_until_it_gives_up(proxy: TcpProxy) -> None:
    proxy.link.set_faults([FaultRule(kind="stall", after_bytes=1000, seconds=60)])
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=0.5)
    conn.request("GET", "/o")
    response = conn.getresponse()
    assert len(response.read(1000)) == 1000
    with pytest.raises(TimeoutError):
        response.read(1)
    conn.close()
    assert get(proxy)[0] == 200  # the stalled connection does not block others


def test_short_stall_recovers_and_delivers_everything(proxy: TcpProxy, origin: Origin) -> None:
    proxy.link.set_faults([FaultRule(kind="stall", after_bytes=1000, seconds=0.01)])
    status, body = get(proxy)
    assert status == 200
    assert body == origin.data


def test_tls_style_raw_proxy_relays_bytes(link: LinkEmulator, origin: Origin) -> None:
    raw = link.open_proxy((origin.host, origin.port), http=False)
    link.set_faults([FaultRule(kind="status")])  # not applied: raw proxies do not parse HTTP
    status, body = get(raw)
    assert status == 200
    assert body == origin.data


def test_concurrent_connections_are_counted(proxy: TcpProxy) -> None:
    barrier = threading.Barrier(4)
    conns = [http.client.HTTPConnection(proxy.host, proxy.port, timeout=10) for _ in range(4)]

    def fetch(conn: http.client.HTTPConnection) -> None:
        conn.connect()
        barrier.wait()
        conn.request("GET", "/o", headers={"Range": "bytes=0-99"})
        conn.getresponse().read()

    threads = [threading.Thread(target=fetch, args=(conn,)) for conn in conns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for conn in conns:
        conn.close()
    assert proxy.link.stats.snapshot()["max_concurrent_connections"] >= 4


def test_closing_the_emulator_ends_live_connections(link: LinkEmulator, origin: Origin) -> None:
    proxy = link.open_proxy((origin.host, origin.port), http=True)
    link.set_faults([FaultRule(kind="stall", after_bytes=0, seconds=60)])
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("GET", "/o")
    response = conn.getresponse()
    link.close()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        response.read()
    conn.close()


def test_non_http_bytes_on_an_http_proxy_are_relayed_raw(link: LinkEmulator) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        proxy = link.open_proxy(server.getsockname()[:2], http=True)

        def echo_once() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"\x16\x03\x01hello" + conn.recv(100))

        thread = threading.Thread(target=echo_once)
        thread.start()
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as client:
            client.sendall(b"\x16\x03\x01 not http")
            received = b""
            while len(received) < 18:
                chunk = client.recv(100)
                if not chunk:
                    break
                received += chunk
        thread.join()
    assert received == b"\x16\x03\x01hello\x16\x03\x01 not http"


def test_status_fault_on_an_expect_continue_upload_closes_the_connection(
    proxy: TcpProxy,
) -> None:
    proxy.link.set_faults([FaultRule(kind="status", status=503)])
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(
            b"PUT /o HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 503 ")
    assert b"Connection: close" in received
