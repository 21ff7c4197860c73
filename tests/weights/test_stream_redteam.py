"""Red team of spotstart.iter_tensors: a checkpoint whose header lies, an origin that answers
short, long or cut bodies, a consumer that fails or walks away. Attackers: whoever writes the
bucket or answers for the URL (the origin: the root of trust, but it must never make the stream
hand over bytes it did not vouch for, hang, or outgrow the window) and the code consuming the
stream (vLLM's model.load_weights, a user's loop)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import http.server
import json
import os
import signal
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart.fetch import Concurrency
from spotstart.fetch.config import Retry

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from spotstart import FetchConfig  # noqa: E402
from spotstart.emulate.storage import StorageEmulator  # noqa: E402
from spotstart.errors import IntegrityError, InvalidCheckpoint, SpotstartError  # noqa: E402
from spotstart.weights.stream import iter_tensors  # noqa: E402
from tests.conftest import BUCKET, spawn_cli  # noqa: E402

MiB = 1 << 20
FAST_FAIL = FetchConfig(
    chunk_bytes=MiB,
    concurrency=Concurrency(streams=2),
    retry=Retry(max_attempts=2, backoff_base_s=0.01, backoff_cap_s=0.02),
)


def stream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("spotstart-")]


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(before_fds: int) -> None:
    """No stream thread and no extra descriptor left (waits a little for the loop to close)."""
    deadline = time.monotonic() + 10
    while stream_threads() or fds() > before_fds:
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: {stream_threads()}, {fds() - before_fds} fds")
        gc.collect()
        time.sleep(0.05)


def checkpoint(path: Path, tensors: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ts = {f"w.{i}": torch.randn(64 * 1024, generator=g) for i in range(tensors)}  # 256 KiB each
    ts["empty"] = torch.zeros(0, 4)
    save_file(ts, path)
    return ts


def raw_file(path: Path, header: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


# -- a consumer that walks away -----------------------------------------------------------------
def test_a_stream_dropped_unclosed_stops_and_leaves_nothing(tmp_path: Path) -> None:
    """``for name, t in iter_tensors(...): break`` without ``with``: before, the stream's own
    thread kept the object alive, so __del__ never ran: the thread, the open file and one
    window of memory stayed for the life of the process."""
    checkpoint(tmp_path / "m.safetensors")
    before = fds()
    for _ in range(3):
        for _name, _t in iter_tensors(str(tmp_path / "m.safetensors"), window_bytes=MiB):
            break
    settle(before)


def test_a_consumer_that_raises_inside_with_leaves_nothing(tmp_path: Path) -> None:
    checkpoint(tmp_path / "m.safetensors")
    before = fds()
    with (
        pytest.raises(RuntimeError, match="load_weights failed"),
        iter_tensors(str(tmp_path / "m.safetensors"), window_bytes=MiB) as stream,
    ):
        for _name, _t in stream:
            raise RuntimeError("load_weights failed")
    settle(before)


# -- a header that lies -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        (
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            b'"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
            b"\0" * 12,
            "overlapping",
        ),
        (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\0" * 8, "beyond"),
        (b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8, "mismatches"),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8, "hole"),
        (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 8, "trailing"),
        (
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            b"\0" * 8,
            "duplicate",
        ),
    ],
)
def test_a_lying_header_is_refused_before_any_tensor(
    tmp_path: Path, header: bytes, data: bytes, needle: str
) -> None:
    raw_file(tmp_path / "bad.safetensors", header, data)
    before = fds()
    got = []
    with (
        pytest.raises(InvalidCheckpoint, match=needle),
        iter_tensors(str(tmp_path / "bad.safetensors"), window_bytes=4) as stream,
    ):
        got.extend(name for name, _ in stream)
    assert got == []
    settle(before)


def test_a_name_in_two_shards_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(InvalidCheckpoint, match="two shards"), iter_tensors(str(tmp_path)) as s:
        list(s)


def test_zero_byte_tensors_and_a_tensor_larger_than_the_window(tmp_path: Path) -> None:
    ts = checkpoint(tmp_path / "m.safetensors", tensors=4)
    with iter_tensors(str(tmp_path / "m.safetensors"), window_bytes=1) as stream:
        got = {name: t.clone() for name, t in stream}
    assert set(got) == set(ts) and all(torch.equal(got[n], ts[n]) for n in ts)
    assert stream.bytes_held_peak <= 256 << 10  # one tensor at a time, never two


# -- an origin that answers wrong ----------------------------------------------------------------
class _Origin(http.server.BaseHTTPRequestHandler):
    body = b""
    mode = "ok"

    def log_message(self, *args: object) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the client gave up on a cut or long body
            super().handle()

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        lo_s, hi_s = self.headers["Range"].split("=", 1)[1].split("-")
        lo, hi = int(lo_s), int(hi_s)
        body = self.body[lo : hi + 1]
        mode = self.mode if lo > 0 else "ok"  # the header itself is read honestly
        if mode == "whole":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(self.body)}")
        if mode == "short":
            body = body[: len(body) // 2]
        elif mode == "long":
            body = self.body[lo : hi + 1 + 100]
        sent = body[: len(body) // 2] if mode == "cut" else body
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(sent)
        if mode == "cut":
            self.wfile.flush()
            self.close_connection = True


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[tuple[str, type[_Origin], dict[str, torch.Tensor]]]:
    ts = checkpoint(tmp_path / "m.safetensors")
    handler = type("Origin", (_Origin,), {"body": (tmp_path / "m.safetensors").read_bytes()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/m.safetensors", handler, ts
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("mode", "needle"),
    [
        ("short", "Content-Length"),
        ("long", "Content-Length"),
        ("cut", "body ended"),
        ("whole", "whole body"),
    ],
)
def test_short_long_cut_or_whole_bodies_fail_clearly_and_leave_nothing(
    origin: tuple[str, type[_Origin], dict[str, torch.Tensor]], mode: str, needle: str
) -> None:
    url, handler, ts = origin
    handler.mode = mode
    before = fds()
    t0 = time.monotonic()
    got: dict[str, torch.Tensor] = {}
    with (
        pytest.raises(SpotstartError, match=needle),
        iter_tensors(url, config=FAST_FAIL, window_bytes=MiB) as stream,
    ):
        got.update((n, t.clone()) for n, t in stream)
    assert time.monotonic() - t0 < 30
    # whatever was handed over before the failure is the origin's bytes, never the lie
    assert all(torch.equal(t, ts[n]) for n, t in got.items())
    assert len(got) < len(ts)
    settle(before)


def test_a_plain_http_origin_proves_only_sizes_and_says_so(
    origin: tuple[str, type[_Origin], dict[str, torch.Tensor]],
) -> None:
    """An http server that gives no checksum: only sizes can be checked (the origin is the
    root of trust); the report must not claim more."""
    url, _handler, ts = origin
    with iter_tensors(url, config=FAST_FAIL, window_bytes=MiB) as stream:
        got = {n: t.clone() for n, t in stream}
    assert all(torch.equal(got[n], ts[n]) for n in ts)
    assert stream.report is not None and set(stream.report.verified) == {"size"}
    assert stream.bytes_held_peak <= MiB + (256 << 10)


# -- a peer that lies ------------------------------------------------------------------------------
def test_a_lying_peer_fails_the_stream_with_an_integrity_error(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    """A peer (anyone in the cluster who wears the labels) serves a flipped byte and publishes
    the CRC of its wrong bytes, so its chunk checks out on arrival. ``load`` would refetch
    that chunk from the origin; the stream may have handed the tensor over already, so the
    origin's MD5 over the whole object must fail the iteration: never a clean end."""
    from spotstart import fetch
    from spotstart.fetch.peers import PeerSpec
    from spotstart.fetch.verify import crc32c

    (tmp_path / "ckpt").mkdir()
    checkpoint(tmp_path / "ckpt" / "model.safetensors", tensors=16)  # 4 MiB: 5 chunks
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    clean_cloud.seed_gcs(BUCKET, {f"lying-peer/{p.name}": p for p in (tmp_path / "ckpt").iterdir()})
    url = f"gs://{BUCKET}/lying-peer/"
    node = tmp_path / "node-a"
    fetch(url, node, FAST_FAIL)
    shard = node / "model.safetensors"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[2 * MiB + 5] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as its index says
    index_path = node / ".spotstart" / "index.json"
    index = json.loads(index_path.read_text())
    index["files"]["model.safetensors"]["crcs"][2] = f"{crc32c(bytes(data[2 * MiB : 3 * MiB])):x}"
    index_path.write_text(json.dumps(index))
    proc = spawn_cli(["serve-peers", str(node), "--listen", "127.0.0.1:0", "--json"])
    before = fds()
    try:
        assert proc.stdout is not None
        address = json.loads(proc.stdout.readline())["listen"]
        config = dataclasses.replace(FAST_FAIL, peers=PeerSpec((address,)))
        with (
            pytest.raises(IntegrityError, match=r"handed over|mismatch|checksum"),
            iter_tensors(url, config=config, window_bytes=MiB) as stream,
        ):
            for _ in stream:
                pass
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    settle(before)
