"""The swarm order of a fetch with peers (rarest first from peers, this node's share of the
hash ring from the origin, another node's share waited for within a bound), against the
emulated cloud and real `spotstart serve-peers` processes on 127.0.0.1. Every assertion is on
bytes (what the origin served, what each node holds), never on times."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart import Concurrency, FetchConfig, FetchReport, Retry
from spotstart.cli.main import build_parser
from spotstart.emulate.link import FaultRule
from spotstart.emulate.storage import StorageEmulator
from spotstart.errors import UsageError
from spotstart.fetch import NullProgress
from spotstart.fetch.engine import fetch_async
from spotstart.fetch.peers import PeerSpec
from tests.conftest import BUCKET, spawn_cli
from tests.guard.test_proxy import free_port

MiB = 1 << 20
URL = f"gs://{BUCKET}/swarm/"
LISTING = 64 << 10  # what listings and stats may add to the origin's body bytes


class Recorder(NullProgress):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def on_message(self, text: str) -> None:
        self.messages.append(text)


@pytest.fixture
def model(clean_cloud: StorageEmulator, gcs_env: dict[str, str]) -> dict[str, bytes]:
    # Four files of uneven sizes in 1 MiB chunks (19 chunks): each node's ring share is
    # several chunks spread over the files.
    files = {
        "swarm/a.bin": os.urandom(7 * MiB + 3),
        "swarm/b.bin": os.urandom(6 * MiB),
        "swarm/c.bin": os.urandom(4 * MiB + 1000),
        "swarm/d.bin": os.urandom(MiB - 7),
    }
    clean_cloud.seed_gcs(BUCKET, files)
    return files


def _size(model: dict[str, bytes]) -> int:
    return sum(len(v) for v in model.values())


def _config(peers: list[str], me: str, wait_s: float, streams: int = 4) -> FetchConfig:
    return FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=streams),
        retry=Retry(backoff_base_s=0.01, backoff_cap_s=0.05),
        peers=PeerSpec(tuple(peers), exclude=(me,), me=me, single_flight_wait_s=wait_s),
    )


def _check(dest: Path, model: dict[str, bytes]) -> None:
    for key, data in model.items():
        assert (dest / key.split("/", 1)[1]).read_bytes() == data, key


def _origin_bytes(cloud: StorageEmulator) -> int:
    return int(cloud.stats()["body_bytes_down"])


@pytest.fixture
def serve() -> Iterator[object]:
    """`spotstart serve-peers DIR` processes; returns each one's address."""
    started: list[subprocess.Popen[str]] = []

    def start(root: Path) -> str:
        root.mkdir(parents=True, exist_ok=True)
        proc = spawn_cli(["serve-peers", str(root), "--listen", "127.0.0.1:0", "--json"])
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        return str(json.loads(line)["listen"])

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def test_two_fresh_nodes_at_once_take_the_model_from_the_origin_about_once(
    model: dict[str, bytes], clean_cloud: StorageEmulator, tmp_path: Path, serve: object
) -> None:
    # Each node's DEST served by its own peer server (it outlives both fetches, so neither
    # node's end takes its chunks away from the other); each fetch knows the other's
    # server as its peer and its own as its place on the ring.
    a_at = serve(tmp_path / "a")  # type: ignore[operator]
    b_at = serve(tmp_path / "b")  # type: ignore[operator]
    clean_cloud.reset_stats()

    async def both() -> tuple[FetchReport, FetchReport]:
        # The wait is long (nothing here should reach it: both nodes are alive), so an
        # origin count under 2x says the nodes traded their shares, not that a wait ran out.
        a = fetch_async(URL, tmp_path / "a", _config([b_at], a_at, 30.0), progress=Recorder())
        b = fetch_async(URL, tmp_path / "b", _config([a_at], b_at, 30.0), progress=Recorder())
        return await asyncio.gather(a, b)

    ra, rb = asyncio.run(both())
    _check(tmp_path / "a", model)
    _check(tmp_path / "b", model)
    size = _size(model)
    origin = _origin_bytes(clean_cloud)
    from_peers = ra.bytes_from_peers + rb.bytes_from_peers
    # Every byte reached each node once, from the origin or from the other node.
    assert ra.bytes_transferred == rb.bytes_transferred == size
    assert size <= origin < 2 * size, (origin, size, ra.bytes_from_peers, rb.bytes_from_peers)
    assert origin - LISTING <= 2 * size - from_peers <= origin
    assert not ra.peers_dropped and not rb.peers_dropped


def test_a_node_whose_ring_partner_is_dead_waits_its_bound_then_takes_the_origin(
    model: dict[str, bytes], clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    # The partner: an address nothing listens on (a node gone before it fetched its share).
    dead = f"127.0.0.1:{free_port()}"
    me = f"127.0.0.1:{free_port()}"
    progress = Recorder()
    report = asyncio.run(
        fetch_async(URL, tmp_path / "a", _config([dead], me, 0.3, streams=2), progress=progress)
    )
    _check(tmp_path / "a", model)
    assert report.bytes_from_peers == 0
    # Each chunk once from the origin: this node's share at once, the dead one's after the wait.
    assert _size(model) <= _origin_bytes(clean_cloud) <= _size(model) + LISTING
    assert any("single-flight" in m for m in progress.messages), progress.messages


def test_a_resumed_fetch_in_swarm_order_takes_only_the_chunks_it_lacks(
    model: dict[str, bytes], clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    # A fetch killed once its journals list some chunks (three ranged reads hang).
    clean_cloud.set_faults([FaultRule(kind="stall", count=3, ranged_only=True)])
    proc = spawn_cli(
        [
            "fetch",
            URL,
            str(tmp_path / "a"),
            "--concurrency",
            "4",
            "--chunk-size",
            "1MiB",
            "--stall-timeout",
            "60",
            "--json",
        ],
        env=dict(os.environ),
    )
    journals = tmp_path / "a" / ".spotstart" / "parts"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(len(p.read_text().splitlines()) - 1 for p in journals.glob("*.journal")) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    clean_cloud.set_faults([])
    clean_cloud.reset_stats()
    dead = f"127.0.0.1:{free_port()}"
    me = f"127.0.0.1:{free_port()}"
    report = asyncio.run(fetch_async(URL, tmp_path / "a", _config([dead], me, 0.3)))
    _check(tmp_path / "a", model)
    assert report.bytes_resumed > 0
    # Files the killed run finished are current (cached); the rest resumed or fetched once.
    lacking = _size(model) - report.bytes_resumed - report.bytes_cached
    assert report.bytes_transferred == lacking
    assert lacking <= _origin_bytes(clean_cloud) <= lacking + LISTING


def test_the_cli_flags_set_the_peer_sample_and_the_single_flight_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from spotstart.cli.fetch_cmd import config_from_args

    monkeypatch.delenv("SPOTSTART_PEERS", raising=False)
    parser = build_parser()
    flags = ["--peers", "10.0.0.2:8471", "--peer-sample", "3", "--peer-wait", "2.5"]
    args = parser.parse_args(["fetch", "gs://b/m/", "/tmp/x", *flags])
    spec = config_from_args(args).peers
    assert spec is not None and (spec.sample, spec.single_flight_wait_s) == (3, 2.5)
    args = parser.parse_args(["fetch", "gs://b/m/", "/tmp/x", "--peers", "10.0.0.2:8471"])
    spec = config_from_args(args).peers
    assert spec is not None and (spec.sample, spec.single_flight_wait_s) == (8, 10.0)
    for bad in (["--peer-sample", "0"], ["--peer-wait", "-1"], ["--peer-wait", "nan"]):
        args = parser.parse_args(["fetch", "gs://b/m/", "/tmp/x", "--peers", "h:1", *bad])
        with pytest.raises(UsageError):
            config_from_args(args)


def test_serving_on_every_address_a_node_is_on_the_ring_at_its_pod_ip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 0.0.0.0 is no address a peer knows us by: on every node it would be the same ring
    # node, so every node would take that share from the origin and wait for its own.
    from spotstart.cli.fetch_cmd import config_from_args

    monkeypatch.setenv("POD_IP", "10.0.0.9")
    flags = ["--peers", "dns:svc:8471", "--serve-peers", "0.0.0.0:8471", "--no-token"]
    args = build_parser().parse_args(["fetch", "gs://b/m/", "/tmp/x", *flags])
    spec = config_from_args(args).peers
    assert spec is not None and spec.me == "10.0.0.9:8471"
    assert "10.0.0.9:8471" in spec.exclude


class MemTarget:
    """A file target in memory that records, at each open, how many opened targets still
    lack bytes (files open with chunks left)."""

    def __init__(self, size: int, opened: list[MemTarget], peaks: list[int]) -> None:
        self.buf = bytearray(size)
        self.written = 0
        self.size = size
        self.opened, self.peaks = opened, peaks
        self.is_open = False
        self.done = False

    def open(self) -> dict[int, int]:
        self.is_open = True
        self.opened.append(self)
        self.peaks.append(sum(t.written < t.size for t in self.opened))
        return {}

    async def write(self, offset: int, pieces: list[bytes]) -> asyncio.Future[None]:
        for p in pieces:
            self.buf[offset : offset + len(p)] = p
            offset += len(p)
            self.written += len(p)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def stored_size(self) -> int:
        return self.size

    def commit(self, chunks: dict[int, int]) -> None:
        return None

    def finish(self) -> None:
        self.done, self.is_open = True, False

    def discard(self) -> None:
        self.is_open = False

    def close(self) -> None:
        self.is_open = False


def test_in_swarm_order_files_open_as_the_window_reaches_them_no_more_than_streams_plus_one() -> (
    None
):
    # Forty small files (1-3 chunks) from memory; the only peer is dead, so half the chunks
    # are its share and wait (briefly) before the origin serves them. However the picker
    # orders chunks, files with chunks left never number more than streams + 1.
    from spotstart.fetch.peers import PeerSet
    from spotstart.fetch.scheduler import TransferScheduler
    from spotstart.store.memory import MemorySource
    from spotstart.store.url import parse_url

    objects = {f"m/{i:02}.bin": os.urandom(1000 * (1 + i % 3)) for i in range(40)}
    source = MemorySource(objects)
    streams = 2
    config = FetchConfig(
        chunk_bytes=1000,
        concurrency=Concurrency(streams=streams),
        peers=PeerSpec((f"127.0.0.1:{free_port()}",), me="127.0.0.1:1", single_flight_wait_s=0.05),
    )
    sched = TransferScheduler(source, parse_url("gs://mem/m/"), config, Recorder())
    opened: list[MemTarget] = []
    peaks: list[int] = []
    targets: dict[str, MemTarget] = {}

    def make(f: object) -> MemTarget:
        rel = f.rel  # type: ignore[attr-defined]
        targets[rel] = MemTarget(len(objects["m/" + rel]), opened, peaks)
        return targets[rel]

    async def run() -> None:
        assert config.peers is not None
        infos = await source.list("m/")
        files = [sched.plan_file(i, i.key[2:], make) for i in infos]
        assert all(f.peer_id is not None for f in files)
        sched.peers = PeerSet(config.peers)
        await sched.peers.refresh()  # the dead peer is in the fleet: half the ring is its
        await sched.transfer(files)

    try:
        asyncio.run(run())
    finally:
        sched.close()
    assert len(opened) == 40 and all(t.done for t in opened)
    for key, data in objects.items():
        assert bytes(targets[key[2:]].buf) == data, key
    assert max(peaks) <= streams + 1, peaks
    assert sched.counters.origin_after_wait >= 1  # the dead node's share waited, then came
    assert sched.counters.origin_owned >= 1
    # every chunk read once
    assert sorted(source.reads) == sorted(set(source.reads))
    assert len(source.reads) == sum(1 + i % 3 for i in range(40))
