"""`image audit` against a hostile registry: a real HTTP/1.1 server on 127.0.0.1 speaking the
distribution API's read side (manifest by tag, blobs by digest and range, a bearer token
service, redirects to a second "blob storage" host), each test making one answer hostile.
Every read is bounded by what was asked: a longer or endless body is refused with one line
(exit 11) naming the registry and the object, and the server sees the connection closed
long before it could send what it offered (nothing was buffered). Debian's docker-registry
covers the normal path (test_audit.py, test_malformed.py)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import error_line, run_cli

pytestmark = pytest.mark.timeout(300)

OFFERED = 512 << 20  # what an endless body offers before the server gives up
BOUND = 64 << 20  # what may have left the server when the client refuses: socket buffers
PIECE = b"\0" * (64 << 10)
CONFIG_TYPE = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Seen:
    """One request as the server saw it: how many body bytes it sent, whether the client
    hung up before the server was done."""

    method: str
    path: str
    headers: dict[str, str]
    sent: int = 0
    hung_up: bool = False
    done: bool = False


Answer = Callable[["Handler", Seen], bool]  # True: answered; False: the normal answer


@dataclass
class Hostile:
    """The image's blobs and manifest, and per-path overrides a test installs."""

    blobs: dict[str, bytes]
    manifest: bytes
    config_digest: str
    answer: Answer | None = None
    token_answer: Answer | None = None
    auth: bool = False  # require a bearer token (issued by /token on this server)
    redirect_blobs_to: str = ""  # "http://127.0.0.1:PORT": layer blobs answered by a 307 there
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests(self, part: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if part in s.path]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        seen = Seen("GET", self.path, {k.lower(): v for k, v in self.headers.items()})
        with state.lock:
            state.seen.append(seen)
        try:
            self._route(state, seen)
        except (BrokenPipeError, ConnectionResetError):
            seen.hung_up = True
            self.close_connection = True
        finally:
            seen.done = True

    def _route(self, state: Hostile, seen: Seen) -> None:
        if self.path.startswith("/token"):
            if state.token_answer is None or not state.token_answer(self, seen):
                self.send_body(200, json.dumps({"token": "good-token"}).encode(), seen)
            return
        if state.auth and self.headers.get("Authorization") != "Bearer good-token":
            host = f"127.0.0.1:{self.server.server_address[1]}"
            self.send_body(
                401,
                b'{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}',
                seen,
                {"WWW-Authenticate": f'Bearer realm="http://{host}/token",service="hostile"'},
            )
            return
        if state.answer is not None and state.answer(self, seen):
            return
        if "/manifests/" in self.path:
            self.send_body(200, state.manifest, seen, {"Content-Type": CONFIG_TYPE})
            return
        digest = self.path.rsplit("/", 1)[-1]
        data = state.blobs.get(digest)
        if data is None:
            self.send_body(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', seen)
            return
        if state.redirect_blobs_to and digest != state.config_digest:
            self.send_body(307, b"", seen, {"Location": f"{state.redirect_blobs_to}{self.path}"})
            return
        self.send_range(data, seen)

    def send_range(self, data: bytes, seen: Seen) -> None:
        lo, hi = asked_range(self, len(data))
        self.send_body(
            206, data[lo : hi + 1], seen, {"Content-Range": f"bytes {lo}-{hi}/{len(data)}"}
        )

    def send_body(
        self, status: int, body: bytes, seen: Seen, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        seen.sent += len(body)

    def send_endless(
        self, status: int, seen: Seen, headers: dict[str, str], head: bytes = b""
    ) -> None:
        """``head`` then zeros, close-delimited (no Content-Length) unless ``headers`` says
        one, until the client hangs up or OFFERED bytes are out."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.wfile.write(head)
        seen.sent += len(head)
        while seen.sent < OFFERED:
            self.wfile.write(PIECE)
            seen.sent += len(PIECE)


def asked_range(h: BaseHTTPRequestHandler, size: int) -> tuple[int, int]:
    start, _, end = h.headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
    return int(start), int(end or size - 1)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: Hostile) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = state


def _serve(state: Hostile) -> tuple[_Server, str]:
    server = _Server(state)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def hostile(images: dict[str, Path]) -> Iterator[tuple[Hostile, str]]:
    layout = images["oci"]
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    )
    blobs_dir = layout / "blobs" / "sha256"
    blobs = {f"sha256:{p.name}": p.read_bytes() for p in blobs_dir.iterdir()}
    manifest = blobs[desc["digest"]]
    state = Hostile(blobs, manifest, json.loads(manifest)["config"]["digest"])
    server, address = _serve(state)
    try:
        yield state, address
    finally:
        server.shutdown()
        server.server_close()


def _layer(state: Hostile) -> str:
    return json.loads(state.manifest)["layers"][0]["digest"]


def _finished(seen: list[Seen], deadline_s: float = 30.0) -> list[Seen]:
    """Wait (polling) until the server's writers noticed the hang-up."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and not all(s.done for s in seen):
        time.sleep(0.05)
    assert all(s.done for s in seen), seen
    return seen


def _audit(address: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = run_cli(["image", "audit", f"{address}/hostile/app:v1", "--json"], env=env)
    return result.code, result.stdout, result.stderr


def test_the_hostile_server_serves_the_image_when_it_behaves(
    hostile: tuple[Hostile, str],
) -> None:
    state, address = hostile
    state.auth = True
    code, out, err = _audit(address)
    assert code == 0, err
    assert json.loads(out)["kind"] == "registry"
    assert state.requests("/token")


def test_a_range_answered_with_an_endless_body_is_refused_unbuffered(
    hostile: tuple[Hostile, str],
) -> None:
    """206 with the right Content-Range, then bytes without end (close-delimited): the
    client reads the range's length plus one byte, refuses, hangs up."""
    state, address = hostile
    layer = _layer(state)

    def endless(h: Handler, seen: Seen) -> bool:
        if layer not in h.path:
            return False
        lo, hi = asked_range(h, len(state.blobs[layer]))
        h.send_endless(206, seen, {"Content-Range": f"bytes {lo}-{hi}/{len(state.blobs[layer])}"})
        return True

    state.answer = endless
    code, _, err = _audit(address)
    assert code == 11, err
    line = error_line(err)
    assert address in line and layer[7:19] in line and "more than the" in line
    for s in _finished(state.requests(layer)):
        assert s.hung_up and s.sent < BOUND, s


def test_a_range_declaring_a_gigabyte_is_refused_unread(hostile: tuple[Hostile, str]) -> None:
    state, address = hostile
    layer = _layer(state)

    def huge(h: Handler, seen: Seen) -> bool:
        if layer not in h.path:
            return False
        lo, hi = asked_range(h, len(state.blobs[layer]))
        h.send_endless(
            206,
            seen,
            {
                "Content-Range": f"bytes {lo}-{hi}/{len(state.blobs[layer])}",
                "Content-Length": str(1 << 30),
            },
        )
        return True

    state.answer = huge
    code, _, err = _audit(address)
    assert code == 11, err
    assert "declared a 1073741824-byte body" in error_line(err)
    for s in _finished(state.requests(layer)):
        assert s.hung_up and s.sent < BOUND, s


def test_a_blob_sent_whole_and_longer_than_its_size_is_refused(
    hostile: tuple[Hostile, str],
) -> None:
    """A registry that ignores Range (200) is read as one stream, to the descriptor's size
    and not a byte more."""
    state, address = hostile
    layer = _layer(state)

    def whole_then_more(h: Handler, seen: Seen) -> bool:
        if layer not in h.path:
            return False
        h.send_endless(200, seen, {}, head=state.blobs[layer])
        return True

    state.answer = whole_then_more
    code, _, err = _audit(address)
    assert code == 11, err
    assert f"more than the blob's {len(state.blobs[layer])} bytes" in error_line(err)
    for s in _finished(state.requests(layer)):
        assert s.hung_up and s.sent < BOUND, s


def test_an_endless_manifest_is_refused_past_4_mib(hostile: tuple[Hostile, str]) -> None:
    state, address = hostile

    def endless(h: Handler, seen: Seen) -> bool:
        if "/manifests/" not in h.path:
            return False
        h.send_endless(200, seen, {"Content-Type": CONFIG_TYPE}, head=b'{"layers": "')
        return True

    state.answer = endless
    code, _, err = _audit(address)
    assert code == 11, err
    line = error_line(err)
    assert "manifest v1" in line and "more than the 4194304 bytes" in line
    for s in _finished(state.requests("/manifests/")):
        assert s.hung_up and s.sent < BOUND, s


@pytest.mark.parametrize("declared", [False, True])
def test_an_endless_token_answer_is_refused_past_1_mib(
    hostile: tuple[Hostile, str], declared: bool
) -> None:
    state, address = hostile
    state.auth = True

    def endless(h: Handler, seen: Seen) -> bool:
        headers = {"Content-Type": "application/json"}
        if declared:
            headers["Content-Length"] = str(300 << 20)
        h.send_endless(200, seen, headers, head=b'{"token": "')
        return True

    state.token_answer = endless
    code, _, err = _audit(address)
    assert code == 11, err
    line = error_line(err)
    assert "token answer" in line and address in line
    assert ("declared a 314572800-byte body" if declared else "more than the 1048576") in line
    for s in _finished(state.requests("/token")):
        assert s.hung_up and s.sent < BOUND, s


def test_endless_error_and_redirect_bodies_are_not_read_to_their_end(
    hostile: tuple[Hostile, str],
) -> None:
    """A 404 whose body never ends is still a 404 (exit 3), read for 64 KiB at most; a
    redirect whose body never ends is followed all the same."""
    state, address = hostile
    layer = _layer(state)

    def endless_404(h: Handler, seen: Seen) -> bool:
        if layer not in h.path:
            return False
        h.send_endless(404, seen, {}, head=b'{"errors": [{"code": "BLOB_UNKNOWN", "message": "')
        return True

    state.answer = endless_404
    code, _, err = _audit(address)
    assert code == 3, err
    assert "not found" in error_line(err)
    for s in _finished(state.requests(layer)):
        assert s.hung_up and s.sent < BOUND, s

    def endless_redirect(h: Handler, seen: Seen) -> bool:
        if "/manifests/" not in h.path or "redirected" in h.path:
            return False
        h.send_endless(302, seen, {"Location": h.path + "?redirected"})
        return True

    state.answer = endless_redirect
    code, _, err = _audit(address)
    assert code == 0, err
    for s in _finished(state.requests("/manifests/")):
        assert s.sent < BOUND, s


def test_blob_redirects_are_followed_without_the_registrys_token(
    hostile: tuple[Hostile, str], images: dict[str, Path]
) -> None:
    """Blob storage on another host (a 307, as registries answer with S3 or a CDN): the
    bytes come from there, verified by digest; the registry's bearer token stays home."""
    state, address = hostile
    state.auth = True
    storage = Hostile(state.blobs, state.manifest, state.config_digest)
    server, storage_address = _serve(storage)
    try:
        state.redirect_blobs_to = f"http://localhost:{storage_address.split(':')[1]}"
        code, _, err = _audit(address)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, err
    assert any(_layer(state) in s.path for s in storage.seen)
    assert all("authorization" not in s.headers for s in storage.seen), storage.seen
    assert any(s.headers.get("authorization") == "Bearer good-token" for s in state.seen)


def test_a_redirect_to_plain_http_on_the_same_host_gets_no_token() -> None:
    """The origin is scheme and host: a registry at https://h redirecting to http://h would
    otherwise send its token in clear (checked on the helper that decides)."""
    from spotstart.image.registry import _origin

    assert _origin("https://r.example/v2/x") != _origin("http://r.example/v2/x")
    assert _origin("https://r.example/a") == _origin("https://r.example/b")


def test_a_head_too_large_is_retried_then_one_line(hostile: tuple[Hostile, str]) -> None:
    """A response head of 200 x 60 KiB headers: http.client stops at its limits (100 headers,
    64 KiB a line); each attempt fails, then exit 7 with one line."""
    state, address = hostile

    def big_head(h: Handler, seen: Seen) -> bool:
        h.send_response(200)
        for i in range(200):
            h.send_header(f"X-Junk-{i}", "j" * (60 << 10))
        h.send_header("Content-Length", "0")
        h.end_headers()
        return True

    state.answer = big_head
    code, _, err = _audit(address)
    assert code == 7, err
    assert "Traceback" not in err
    assert "manifest v1" in error_line(err)


def test_a_token_with_a_newline_is_refused(hostile: tuple[Hostile, str]) -> None:
    """A token is put in a header: one with CR/LF would split it (header injection)."""
    state, address = hostile
    state.auth = True

    def crlf(h: Handler, seen: Seen) -> bool:
        h.send_body(200, json.dumps({"token": "a\r\nX-Evil: 1"}).encode(), seen)
        return True

    state.token_answer = crlf
    code, _, err = _audit(address)
    assert code == 11, err
    assert "not visible ASCII" in error_line(err)


def test_a_manifest_nested_absurdly_deep_is_an_invalid_image(
    hostile: tuple[Hostile, str],
) -> None:
    state, address = hostile
    deep = b'{"schemaVersion": 2, "layers": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def nested(h: Handler, seen: Seen) -> bool:
        if "/manifests/" not in h.path:
            return False
        h.send_body(200, deep, seen, {"Docker-Content-Digest": _sha(deep)})
        return True

    state.answer = nested
    code, _, err = _audit(address)
    assert code == 12, err
    assert "nested deeper than 64 levels" in error_line(err)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
