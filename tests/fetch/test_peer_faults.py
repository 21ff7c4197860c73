"""A hostile peer on 127.0.0.1: a small real server speaking the peer protocol (an honest
inventory of the model, then one kind of wrong answer to every object read: each error
status, redirects, a whole body, wrong ranges and sizes, a short, silent or trickling body,
endless ``100 Continue``, garbage), or a wrong answer to the inventory itself. Every fetch
ends byte-identical from the origin, costs the origin no retry, and names the peer in
``peers_dropped``. Also: ``--peers`` entries that cannot be a peer are refused at once
(exit 2, one line), and one that cannot be reached is reported once, not silently ignored."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spotstart import Concurrency, FetchConfig, Retry, fetch
from spotstart.emulate.storage import StorageEmulator
from spotstart.fetch.peers import INVENTORY_PATH, PeerSpec, object_id
from spotstart.fetch.scheduler import NullProgress
from tests.conftest import BUCKET, run_cli

pytestmark = pytest.mark.timeout(90)

KiB, MiB = 1 << 10, 1 << 20
URL = f"gs://{BUCKET}/hostile/"
_RANGE = re.compile(rb"\r\nRange: bytes=(\d+)-(\d+)", re.IGNORECASE)


@pytest.fixture
def model(clean_cloud: StorageEmulator, gcs_env: dict[str, str]) -> dict[str, bytes]:
    # Three chunks of 1 MiB and a small object read in one chunk (so a whole-body 200 is
    # also the range asked: still not the answer a peer must give).
    files = {"hostile/a.bin": os.urandom(2 * MiB + 17), "hostile/b.bin": os.urandom(100 * KiB)}
    clean_cloud.seed_gcs(BUCKET, files)
    return files


def _config(peer: str | None, **spec: object) -> FetchConfig:
    return FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=2),
        retry=Retry(backoff_base_s=0.01, backoff_cap_s=0.05),
        peers=PeerSpec((peer,), **spec) if peer else None,  # type: ignore[arg-type]
    )


def _held(dest: Path, model: dict[str, bytes]) -> dict[str, bytes]:
    """{peer object id: bytes} of the model, as a node that fetched it into ``dest`` names
    them (its cache index: source, version, size)."""
    index = json.loads((dest / ".spotstart" / "index.json").read_text())["files"]
    out = {}
    for rel, e in index.items():
        out[object_id(e["source"], e["version"], e["size"])] = model[f"hostile/{rel}"]
    return out


def _check(dest: Path, model: dict[str, bytes]) -> None:
    for key, data in model.items():
        assert (dest / key.split("/", 1)[1]).read_bytes() == data, key


class Elsewhere:
    """Where a redirect points: a listener that only counts who comes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/objects/elsewhere"

    def visitors(self) -> int:
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1


class HostilePeer:
    """The peer protocol over raw asyncio streams on its own loop thread: ``GET
    /v1/inventory`` and ``GET /v1/objects/<id>`` answered as ``mode`` says."""

    def __init__(self, mode: str, held: dict[str, bytes], elsewhere: str) -> None:
        self.mode, self.held, self.elsewhere = mode, held, elsewhere
        self.object_reads = 0
        self.connections = 0
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._connection, "127.0.0.1", 0)

    def inventory(self) -> bytes:
        objects = [
            {"id": oid, "size": len(data), "ranges": [[0, len(data)]], "complete": True}
            for oid, data in self.held.items()
        ]
        return json.dumps({"version": 1, "objects": objects}).encode()

    async def _connection(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                target = head.split(b" ", 2)[1].decode()
                if target == INVENTORY_PATH:
                    keep = await self._inventory(w)
                else:
                    self.object_reads += 1
                    keep = await self._object(target, head, w)
                await w.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            w.close()

    async def _inventory(self, w: asyncio.StreamWriter) -> bool:
        body = self.inventory()
        mode = self.mode.removeprefix("inventory-") if "inventory-" in self.mode else ""
        if mode == "401":
            w.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        elif mode == "302":
            w.write(f"HTTP/1.1 302 Found\r\nLocation: {self.elsewhere}\r\n".encode())
            w.write(b"Content-Length: 0\r\n\r\n")
        elif mode == "garbage":
            w.write(b"\x16\x03\x01\x02\x00SSH-2.0-hello\r\n\r\n" + bytes(range(256)))
            return False
        elif mode == "continue":
            while True:
                w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await w.drain()
                await asyncio.sleep(0.01)
        else:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            w.write(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        return True

    async def _object(self, target: str, head: bytes, w: asyncio.StreamWriter) -> bool:
        data = self.held[target.rsplit("/", 1)[1]]
        m = _RANGE.search(head)
        assert m is not None
        first, last = int(m.group(1)), int(m.group(2))
        body, total = data[first : last + 1], len(data)

        def partial(version: str = "HTTP/1.1", cr: str = "", extra: str = "") -> bytes:
            cr = cr or f"bytes {first}-{last}/{total}"
            return (
                f"{version} 206 Partial Content\r\nContent-Range: {cr}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n"
            ).encode()

        mode = self.mode
        if mode.isdigit():
            status = int(mode)
            extra = f"Location: {self.elsewhere}\r\n" if 300 <= status < 400 else ""
            extra += "Retry-After: 1\r\n" if status == 503 else ""
            w.write(f"HTTP/1.1 {status} Nope\r\n{extra}Content-Length: 4\r\n\r\nnope".encode())
        elif mode == "whole-200":
            w.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode() + data)
        elif mode == "wrong-total":
            w.write(partial(cr=f"bytes {first}-{last}/{total + 1}") + body)
        elif mode == "wrong-range":
            shifted = data[first + 1 : last + 2].ljust(len(body), b"\0")
            w.write(partial(cr=f"bytes {first + 1}-{last + 1}/{total}") + shifted)
        elif mode == "short":
            w.write(partial() + body[: len(body) // 2])
            return False
        elif mode == "chunked":
            w.write(
                f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{total}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
                + f"{len(body):x}\r\n".encode()
                + body
                + b"\r\n0\r\n\r\n"
            )
        elif mode == "trickle":  # 1 B/s: never a stall (2 s), never done
            w.write(partial())
            for i in range(len(body)):
                await w.drain()
                await asyncio.sleep(1.0)
                w.write(body[i : i + 1])
        elif mode == "silent":
            await asyncio.sleep(3600)
        elif mode.startswith("continue"):  # as fast as it goes, or one every 50 ms
            while True:
                w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await w.drain()
                if mode == "continue-slowly":
                    await asyncio.sleep(0.05)
        elif mode == "garbage":
            w.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n" + bytes(range(256)) * 4)
            return False
        elif mode == "http10":  # correct, and the connection closes after each answer
            w.write(partial("HTTP/1.0") + body)
            return False
        else:
            raise AssertionError(mode)
        return True

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def hostile(
    model: dict[str, bytes], tmp_path: Path
) -> Iterator[Callable[[str], tuple[HostilePeer, Elsewhere]]]:
    fetch(URL, tmp_path / "origin-copy", _config(None))
    held = _held(tmp_path / "origin-copy", model)
    started: list[tuple[HostilePeer, Elsewhere]] = []

    def start(mode: str) -> tuple[HostilePeer, Elsewhere]:
        elsewhere = Elsewhere()
        started.append((HostilePeer(mode, held, elsewhere.url), elsewhere))
        return started[-1]

    yield start
    for peer, elsewhere in started:
        peer.close()
        elsewhere.sock.close()


OBJECT_FAULTS = [
    "404",
    "401",
    "403",
    "412",
    "416",
    "500",
    "301",
    "302",
    "307",
    "whole-200",
    "wrong-total",
    "wrong-range",
    "short",
    "chunked",
    "trickle",
    "silent",
    "continue",
    "continue-slowly",
    "garbage",
]


@pytest.mark.parametrize("mode", OBJECT_FAULTS)
def test_any_wrong_answer_from_a_peer_sends_its_chunk_to_the_origin_at_no_retrys_cost(
    mode: str,
    model: dict[str, bytes],
    tmp_path: Path,
    hostile: Callable[[str], tuple[HostilePeer, Elsewhere]],
) -> None:
    peer, elsewhere = hostile(mode)
    report = fetch(URL, tmp_path / "b", _config(peer.address, deadline_floor_s=1.0))
    _check(tmp_path / "b", model)
    assert peer.object_reads >= 1  # the peer was asked, and answered its way
    assert report.bytes_from_peers == 0
    assert peer.address in report.peers_dropped, report.peers_dropped
    assert report.retries == 0  # the origin's attempts were all its own
    assert elsewhere.visitors() == 0  # no redirect followed


@pytest.mark.parametrize(
    "mode", ["inventory-401", "inventory-302", "inventory-garbage", "inventory-continue"]
)
def test_a_peer_whose_inventory_is_wrong_is_asked_for_nothing(
    mode: str,
    model: dict[str, bytes],
    tmp_path: Path,
    hostile: Callable[[str], tuple[HostilePeer, Elsewhere]],
) -> None:
    peer, elsewhere = hostile(mode)
    report = fetch(URL, tmp_path / "b", _config(peer.address, connect_timeout_s=0.25))
    _check(tmp_path / "b", model)
    assert peer.object_reads == 0 and report.bytes_from_peers == 0
    assert peer.address in report.peers_dropped, report.peers_dropped
    assert elsewhere.visitors() == 0


def test_a_busy_peer_is_skipped_while_it_asks_and_the_origin_serves(
    model: dict[str, bytes],
    tmp_path: Path,
    hostile: Callable[[str], tuple[HostilePeer, Elsewhere]],
) -> None:
    peer, _ = hostile("503")
    report = fetch(URL, tmp_path / "b", _config(peer.address))
    _check(tmp_path / "b", model)
    assert report.bytes_from_peers == 0 and report.retries == 0
    assert 1 <= peer.object_reads <= 2  # Retry-After: 1 is kept; not asked chunk after chunk


def test_a_peer_that_answers_http10_serves_every_byte_on_a_connection_per_answer(
    model: dict[str, bytes],
    tmp_path: Path,
    hostile: Callable[[str], tuple[HostilePeer, Elsewhere]],
) -> None:
    peer, _ = hostile("http10")
    report = fetch(URL, tmp_path / "b", _config(peer.address))
    _check(tmp_path / "b", model)
    assert report.bytes_from_peers == sum(len(v) for v in model.values())
    assert not report.peers_dropped and report.retries == 0
    assert peer.connections == peer.requests  # no socket reused after the server closed it


class Recorder(NullProgress):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def on_message(self, text: str) -> None:
        self.messages.append(text)


def test_an_unreachable_peer_is_reported_once_and_counted_as_dropped(
    model: dict[str, bytes], tmp_path: Path
) -> None:
    progress = Recorder()
    report = fetch(URL, tmp_path / "b", _config("127.0.0.1:1", refresh_s=0.05), progress=progress)
    _check(tmp_path / "b", model)
    assert "unreachable" in report.peers_dropped["127.0.0.1:1"]
    assert len([m for m in progress.messages if "127.0.0.1:1" in m]) == 1, progress.messages


def test_a_peer_name_that_gives_no_address_is_reported_once(
    model: dict[str, bytes], tmp_path: Path
) -> None:
    entry = "dns:no-such-peer.invalid:8471"  # RFC 2606: never resolves
    progress = Recorder()
    config = _config(entry, refresh_s=0.05, connect_timeout_s=0.5)
    report = fetch(URL, tmp_path / "b", config, progress=progress)
    _check(tmp_path / "b", model)
    assert "no address" in report.peers_dropped[entry]
    assert len([m for m in progress.messages if entry in m]) == 1, progress.messages


def test_the_cli_exits_0_with_the_unreachable_peer_in_its_report(
    model: dict[str, bytes], gcs_env: dict[str, str], tmp_path: Path
) -> None:
    r = run_cli(["fetch", URL, str(tmp_path / "b"), "--peers", "127.0.0.1:1", "--json"], gcs_env)
    assert r.code == 0, r.stderr
    assert "unreachable" in json.loads(r.stdout)["peers_dropped"]["127.0.0.1:1"]
    _check(tmp_path / "b", model)


NOT_PEERS = [
    "http://127.0.0.1:1",
    "https://peer.example:8471",
    "127.0.0.1:1/v1",
    "user@127.0.0.1:1",
    "127.0.0.1:0",
    "127.0.0.1:65536",
    "127.0.0.1:+80",
    "127.0.0.1:²",
    ":8471",
    "[::1:8471",
    "::1:8471",
    "[not-v6]:8471",
    "dns::8471",
    "dns:http://x:1",
    "peer one:8471",
    "pëer:8471",
    "-peer:8471",
]


@pytest.mark.parametrize("entry", NOT_PEERS)
def test_a_peer_entry_that_cannot_be_a_peer_is_a_usage_error(entry: str) -> None:
    from spotstart.errors import UsageError

    with pytest.raises(UsageError, match="expected HOST:PORT") as e:
        PeerSpec.parse(f"10.0.0.7:8471,{entry}")
    assert "\n" not in str(e.value)


def test_the_cli_refuses_a_url_as_a_peer_with_exit_2_and_one_line(tmp_path: Path) -> None:
    r = run_cli(["fetch", "gs://models/m/", str(tmp_path), "--peers", "http://127.0.0.1:1"])
    assert r.code == 2, (r.code, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "peer" in r.stderr, r.stderr
    r = run_cli(["fetch", "gs://models/m/", str(tmp_path)], {"SPOTSTART_PEERS": "h:1,http://h:1"})
    assert r.code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_every_peer_entry_form_still_parses() -> None:
    spec = PeerSpec.parse("10.0.0.7:8471, peer-0.svc.cluster.local.:1,[fe80::1]:65535,dns:x:2")
    assert spec.entries == (
        "10.0.0.7:8471",
        "peer-0.svc.cluster.local.:1",
        "[fe80::1]:65535",
        "dns:x:2",
    )


def test_a_chunks_deadline_follows_the_origins_measured_rate_above_a_floor() -> None:
    spec = PeerSpec(deadline_factor=4.0, deadline_floor_s=2.0, unmeasured_bytes_per_s=10e6)
    assert spec.chunk_deadline_s(16 * MiB, 0.0) == pytest.approx(4 * 16 * MiB / 10e6)
    assert spec.chunk_deadline_s(64 * MiB, 100e6) == pytest.approx(4 * 64 * MiB / 100e6)
    assert spec.chunk_deadline_s(1 * MiB, 100e6) == 2.0  # the floor
    assert spec.chunk_deadline_s(64 * MiB, 1e6) == pytest.approx(4 * 64 * MiB / 1e6)


def test_what_a_failed_read_costs_a_peer() -> None:
    from spotstart.errors import (
        AccessDenied,
        NotFound,
        ObjectChanged,
        ProtocolError,
        SpotstartError,
        StallDetected,
        TransientError,
    )
    from spotstart.fetch.peers import Peer, PeerObject, PeerSet
    from spotstart.store import DirectUnsupported

    said: list[str] = []
    peers = PeerSet(PeerSpec(), said.append)
    oid = "a" * 64

    def one(exc: BaseException) -> Peer:
        p = Peer("10.0.0.1:1")
        peers.peers[p.address] = p
        p.holdings[oid] = PeerObject(((0, 10),))
        peers.failed(p, oid, exc)
        return p

    busy = one(TransientError("x", status=503, retry_after_s=600))
    assert busy.dropped is None and busy.busy_until > 0 and oid in busy.holdings
    for miss in (NotFound("404"), ObjectChanged("416")):
        p = one(miss)
        assert p.dropped is None and oid not in p.holdings and p.misses == {oid: str(miss)}
        peers.served(p, oid, 10, 1.0)
        assert not p.misses  # it gave the object after all (it was moving into place)
    for fatal in (
        AccessDenied("401"),
        SpotstartError("unexpected HTTP 302"),
        ProtocolError("garbage"),
        StallDetected("deadline"),
        TransientError("HTTP 500", status=500),
        DirectUnsupported("chunked"),
        ValueError("anything else"),
    ):
        assert one(fatal).dropped, fatal
