"""Red team of the registry reader: where a hostile registry may send us (a token realm or a
redirect to the cloud's metadata server), what its headers may claim (a Content-Range that
lies, a Content-Encoding bomb, redirect loops, other schemes, other ports), each against the
real hostile HTTP server of test_hostile_registry.py.

The metadata server lives at 169.254.169.254, an address a test cannot bind: the tests that
need it stand one up on 127.0.0.2 and count that address as link-local for the run (the
check is on the address actually connected to, so the rest is the real path)."""

from __future__ import annotations

import gzip
import ipaddress
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from spotstart.errors import ProtocolError, RetriesExceeded, TransientError
from spotstart.image import oci, registry
from spotstart.image.digest import Digest
from spotstart.image.registry import forbidden_destination, open_registry_image
from tests.conftest import error_line
from tests.image.test_hostile_registry import (
    Handler,
    Hostile,
    Seen,
    _audit,
    _layer,
    _serve,
    asked_range,
    hostile,
)

__all__ = ["hostile"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(300)

SECRET = "metadata-credential-never-for-the-registry"
PLATFORM = oci.Platform("linux", "amd64")


class _Metadata(BaseHTTPRequestHandler):
    """A metadata server: answers every GET with a JSON "token" (as GCE's and Azure's token
    endpoints do, were the right header sent) and counts the requests. HTTP/1.0: the answer
    closes its connection, and urllib3's connection lets go of its socket at once."""

    protocol_version = "HTTP/1.0"
    hits: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = json.dumps({"token": SECRET, "access_token": SECRET}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def metadata(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A metadata server on 127.0.0.2, counted as link-local for the test."""
    _Metadata.hits = []
    server = ThreadingHTTPServer(("127.0.0.2", 0), _Metadata)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(
        registry, "LINK_LOCAL", (*registry.LINK_LOCAL, ipaddress.ip_network("127.0.0.2/32"))
    )
    try:
        yield f"127.0.0.2:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _open(address: str) -> None:
    """Open the image and read its layer blobs, in this process (where the test's idea of
    link-local applies)."""
    reg, _ = open_registry_image(f"{address}/hostile/app:v1", platform=PLATFORM)
    try:
        for layer in json.loads(reg.get_manifest("v1")[0])["layers"]:
            with reg.open_blob(Digest.parse(layer["digest"]), layer["size"]) as blob:
                while blob.read(1 << 20):
                    pass
    finally:
        reg.close()


def test_a_token_realm_on_the_metadata_server_is_refused(
    hostile: tuple[Hostile, str], metadata: str
) -> None:
    """`Bearer realm="http://169.254.169.254/..."`: what the metadata server answers would be
    sent to the registry as our bearer token. Before the fix the registry received it."""
    state, address = hostile

    def challenge(h: Handler, seen: Seen) -> bool:
        if h.headers.get("Authorization"):
            return False  # serve normally: what we check is what it was sent
        realm = f"http://{metadata}/computeMetadata/v1/instance/service-accounts/default/token"
        h.send_body(401, b"{}", seen, {"WWW-Authenticate": f'Bearer realm="{realm}"'})
        return True

    state.answer = challenge
    with pytest.raises(ProtocolError, match="link-local"):
        _open(address)
    assert all(SECRET not in json.dumps(s.headers) for s in state.seen), state.seen


def test_a_redirect_to_the_metadata_server_is_refused(
    hostile: tuple[Hostile, str], metadata: str
) -> None:
    """A layer blob redirected to the metadata server: refused, nothing read from it."""
    state, address = hostile
    state.redirect_blobs_to = f"http://{metadata}"
    with pytest.raises(ProtocolError, match="link-local"):
        _open(address)


def test_redirects_to_loopback_are_refused_for_a_registry_elsewhere() -> None:
    """The decision on the address connected to (a DNS name for 169.254.169.254, an
    IPv4-mapped IPv6 address, EC2's IPv6 IMDS are all caught); private networks stay open
    (registries and their blob stores live there)."""
    public = "203.0.113.7"
    for peer in ("169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254", "fe80::1%eth0"):
        assert "link-local" in forbidden_destination(peer, public), peer
        assert "link-local" in forbidden_destination(peer, "registry.example"), peer
    for peer in ("127.0.0.1", "::1", "127.9.9.9"):
        assert "loopback" in forbidden_destination(peer, public), peer
        assert forbidden_destination(peer, "127.0.0.1") == ""
        assert forbidden_destination(peer, "localhost") == ""
    for peer in ("10.0.0.5", "192.168.1.2", "203.0.113.9", "2001:db8::1"):
        assert forbidden_destination(peer, public) == ""
    assert forbidden_destination("169.254.10.10", "169.254.0.5") == ""


def test_a_content_range_that_lies_is_refused(hostile: tuple[Hostile, str]) -> None:
    """A 206 with the bytes asked for but a Content-Range one byte off: refused (exit 11),
    never spliced in at the wrong offset."""
    state, address = hostile
    layer = _layer(state)
    size = len(state.blobs[layer])

    def lying(h: Handler, seen: Seen) -> bool:
        if layer not in h.path:
            return False
        lo, hi = asked_range(h, size)
        claimed = f"bytes {lo + 1}-{hi + 1}/{size + 1}"
        h.send_body(206, state.blobs[layer][lo : hi + 1], seen, {"Content-Range": claimed})
        return True

    state.answer = lying
    code, _, err = _audit(address)
    assert code == 11, err
    assert "Content-Range" in error_line(err)


def _bomb(size: int) -> bytes:
    return gzip.compress(b"\0" * size, 9)


def test_a_gzip_bomb_range_is_taken_as_sent_not_inflated(hostile: tuple[Hostile, str]) -> None:
    """A range answered as `Content-Encoding: gzip` of 64 MiB of zeros (64 KiB on the wire):
    read as the bytes sent (a short body: retried, then one line), never inflated."""
    state, address = hostile
    layer = _layer(state)
    bomb = _bomb(64 << 20)

    def gzipped(h: Handler, seen: Seen) -> bool:
        if layer not in h.path:
            return False
        lo, hi = asked_range(h, len(state.blobs[layer]))
        headers = {"Content-Range": f"bytes {lo}-{hi}/{len(state.blobs[layer])}"}
        h.send_body(206, bomb, seen, headers | {"Content-Encoding": "gzip"})
        return True

    state.answer = gzipped
    code, _, err = _audit(address)
    assert code in (7, 11, 12), err
    assert "Traceback" not in err
    error_line(err)


def test_a_gzip_bomb_whole_blob_is_read_as_sent_never_inflated(
    hostile: tuple[Hostile, str],
) -> None:
    """The range ignored (200), the whole blob sent as `Content-Encoding: gzip` of 32 MiB of
    zeros (fewer bytes than the blob, so its Content-Length passes): the bytes as sent, as
    the ranges are read (nobody asked for an encoding); short of the blob's size: exit 6."""
    state, address = hostile
    layer = _layer(state)
    bomb = _bomb(32 << 20)
    assert len(bomb) < len(state.blobs[layer])

    def whole(h: Handler, seen: Seen) -> bool:
        if layer not in h.path:
            return False
        h.send_body(200, bomb, seen, {"Content-Encoding": "gzip"})
        return True

    state.answer = whole
    code, _, err = _audit(address)
    assert code == 6, err
    assert f"blob is {len(bomb)} bytes" in error_line(err)


@pytest.mark.parametrize(
    "location",
    ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/x", "LOOP"],
)
def test_redirect_loops_and_other_schemes_end_in_one_line(
    hostile: tuple[Hostile, str], location: str
) -> None:
    state, address = hostile

    def redirect(h: Handler, seen: Seen) -> bool:
        if "/manifests/" not in h.path:
            return False
        h.send_body(302, b"", seen, {"Location": h.path if location == "LOOP" else location})
        return True

    state.answer = redirect
    code, _, err = _audit(address)
    assert code == 11, err
    line = error_line(err)
    assert ("too many redirects" if location == "LOOP" else "not an http(s) URL") in line
    assert len(state.requests("/manifests/")) <= 8 * 5


def test_the_token_never_follows_a_redirect_to_another_port(
    hostile: tuple[Hostile, str], images: dict[str, Path]
) -> None:
    """Same address, other port: another origin (another process may listen there)."""
    state, address = hostile
    state.auth = True
    storage = Hostile(state.blobs, state.manifest, state.config_digest)
    server, storage_address = _serve(storage)
    try:
        state.redirect_blobs_to = f"http://{storage_address}"
        code, _, err = _audit(address)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, err
    assert storage.seen and all("authorization" not in s.headers for s in storage.seen)


@pytest.mark.parametrize(
    ("status", "header"),
    [(503, "Retry-After"), (200, "Content-Length")],
)
def test_a_header_of_digits_that_are_not_ascii_is_the_servers_fault(
    hostile: tuple[Hostile, str], status: int, header: str
) -> None:
    """ "\\xb2" ("²" as latin-1 decodes it) passes str.isdigit() and fails int(): exit 1 (a
    bug) before; now an unusable header, ignored (a retry without the server's pause; a
    body read to the bound)."""
    state, address = hostile

    def odd(h: Handler, seen: Seen) -> bool:
        if "/manifests/" not in h.path:
            return False
        h.send_response(status)
        h.send_header(header, "\u00b2")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        h.wfile.write(state.manifest if status == 200 else b"{}")
        return True

    state.answer = odd
    code, _, err = _audit(address)
    assert "Traceback" not in err
    assert code == (7 if status == 503 else 0), err


@pytest.mark.parametrize(
    ("challenge", "needle"),
    [
        ('Bearer realm="http://[::1/token"', "is not a URL"),  # was ValueError, exit 1
        ('Bearer realm="http://127.0.0.1:99999/token"', "is not a URL"),
        ('Bearer realm="https://"', "not an http(s) URL with a host"),
        ('Bearer realm="file:///etc/passwd"', "not an http(s) URL"),
        ('Bearer realm="/token"', "not an http(s) URL"),
        ("Bearer realm=" + "x" * 60000, "not an http(s) URL"),
        ("Bearer " + ",".join(f"k{i}=v" for i in range(5000)), "usable WWW-Authenticate"),
        ("Negotiate", "usable WWW-Authenticate"),
    ],
)
def test_a_hostile_challenge_is_one_short_line(
    hostile: tuple[Hostile, str], challenge: str, needle: str
) -> None:
    state, address = hostile

    def unauthorized(h: Handler, seen: Seen) -> bool:
        if h.headers.get("Authorization"):
            return False
        h.send_body(401, b"{}", seen, {"WWW-Authenticate": challenge})
        return True

    state.answer = unauthorized
    code, _, err = _audit(address)
    assert code == 11, err
    line = error_line(err)
    assert needle in line and len(line) < 1000, line


def test_a_redirect_to_a_broken_url_is_one_line(hostile: tuple[Hostile, str]) -> None:
    state, address = hostile

    def broken(h: Handler, seen: Seen) -> bool:
        if "/manifests/" not in h.path:
            return False
        h.send_body(302, b"", seen, {"Location": "http://[::1/v2/x"})
        return True

    state.answer = broken
    code, _, err = _audit(address)
    assert code == 11, err
    assert "is not a URL" in error_line(err)


@pytest.mark.parametrize("where", ["manifest", "range", "stream"])
def test_a_body_trickled_a_byte_at_a_time_is_dropped_not_waited_for(
    hostile: tuple[Hostile, str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Each byte inside the socket's read timeout, so it never fires: before, a manifest
    trickled a byte a minute held the audit for years. Now a body under the rate floor
    (after the grace, here 0.3 s) is dropped, retried, then one error."""
    monkeypatch.setattr(registry, "GRACE_S", 0.3)
    state, address = hostile
    layer = _layer(state)
    stop = threading.Event()

    def trickle(h: Handler, seen: Seen) -> bool:
        if where == "manifest" and "/manifests/" not in h.path:
            return False
        if where != "manifest" and layer not in h.path:
            return False
        body = state.manifest if where == "manifest" else state.blobs[layer]
        h.send_response(206 if where == "range" else 200)
        if where == "range":
            lo, hi = asked_range(h, len(body))
            body = body[lo : hi + 1]
            h.send_header("Content-Range", f"bytes {lo}-{hi}/{len(state.blobs[layer])}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(len(body)):
            if stop.wait(0.05):
                break
            h.wfile.write(body[i : i + 1])
            h.wfile.flush()
            seen.sent += 1
        return True

    state.answer = trickle
    try:
        expected = TransientError if where == "stream" else RetriesExceeded  # a stream: once
        with pytest.raises(expected, match="KiB/s"):
            _open(address)
    finally:
        stop.set()


@pytest.mark.parametrize("how", ["endless", "huge-size", "long-line", "endless-trailers"])
def test_chunked_bodies_are_bounded_like_any_other(hostile: tuple[Hostile, str], how: str) -> None:
    """Transfer-Encoding: chunked: one endless chunk, a chunk claiming 2^64 bytes, a chunk
    size line of 100 KB, endless trailers: each read to the range's length plus one byte
    at most, then refused or retried; one line, never a traceback."""
    state, address = hostile
    layer = _layer(state)

    def chunked(h: Handler, seen: Seen) -> bool:
        if layer not in h.path:
            return False
        lo, hi = asked_range(h, len(state.blobs[layer]))
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {lo}-{hi}/{len(state.blobs[layer])}")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.close_connection = True
        try:
            if how == "long-line":
                h.wfile.write(b"1" * 100_000 + b"\r\n")
            elif how == "endless-trailers":
                data = state.blobs[layer][lo : hi + 1]
                h.wfile.write(b"%x\r\n%s\r\n0\r\n" % (len(data), data))
                for _ in range(20_000):
                    h.wfile.write(b"X-T: 1\r\n")
            else:
                size = b"FFFFFFFFFFFFFFFF" if how == "huge-size" else b"8000000"
                h.wfile.write(size + b"\r\n")
                while seen.sent < 64 << 20:
                    h.wfile.write(b"\0" * (64 << 10))
                    seen.sent += 64 << 10
        except (BrokenPipeError, ConnectionResetError):
            seen.hung_up = True
        return True

    state.answer = chunked
    code, _, err = _audit(address)
    assert "Traceback" not in err
    assert code in (0, 7, 11), err
    if code:
        error_line(err)


def test_a_response_head_trickled_a_byte_at_a_time_is_cut(
    hostile: tuple[Hostile, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers a byte every 50 ms (each inside the read timeout; 64 KiB lines, 100 of
    them, allowed): before, the audit waited as long as the server liked. The head has
    HEAD_DEADLINE_S (here 0.5 s), then the connection is cut and the read retried."""
    monkeypatch.setattr(registry, "HEAD_DEADLINE_S", 0.5)
    state, address = hostile
    stop = threading.Event()

    def slow_head(h: Handler, seen: Seen) -> bool:
        if "/manifests/" not in h.path:
            return False
        h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(600):  # 30 s, then a valid answer: what the old reader got
            if stop.wait(0.05):
                return True
            h.wfile.write(b"a")
            h.wfile.flush()
        body = state.manifest
        h.wfile.write(b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return True

    state.answer = slow_head
    try:
        with pytest.raises(RetriesExceeded, match="manifest"):
            _open(address)
    finally:
        stop.set()


def test_endless_chunk_trailers_are_cut_at_the_bodys_deadline(
    hostile: tuple[Hostile, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest, then its last chunk, then trailer lines without end: http.client reads
    trailers inside one read, out of reach of the rate check; the body's deadline cuts it."""
    monkeypatch.setattr(registry, "GRACE_S", 0.5)
    monkeypatch.setattr(registry, "MIN_RATE", 1 << 40)
    state, address = hostile
    stop = threading.Event()

    def trailers(h: Handler, seen: Seen) -> bool:
        if "/manifests/" not in h.path:
            return False
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        body = state.manifest
        h.wfile.write(b"%x\r\n%s\r\n0\r\n" % (len(body), body))
        while not stop.wait(0.01):
            h.wfile.write(b"X-Trailer: 1\r\n")
            h.wfile.flush()
        return True

    state.answer = trailers
    try:
        with pytest.raises(RetriesExceeded, match="manifest"):
            _open(address)
    finally:
        stop.set()
