"""Peer fetch on 127.0.0.1: `spotstart serve-peers` processes holding all, part or none of a
model, a peer killed mid-transfer, one serving wrong bytes, one that stalls, and hostile
requests against the peer server. Every fetch must end byte-identical to the origin."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart import Concurrency, FetchConfig, FetchReport, Retry, fetch
from spotstart.emulate.link import FaultRule, LinkConfig
from spotstart.emulate.proxy import LinkEmulator
from spotstart.emulate.storage import StorageEmulator
from spotstart.fetch.peers import PeerSpec
from tests.conftest import BUCKET, spawn_cli, tree_digest

MiB = 1 << 20
URL = f"gs://{BUCKET}/peer/"


@pytest.fixture
def model(clean_cloud: StorageEmulator, gcs_env: dict[str, str]) -> dict[str, bytes]:
    files = {"peer/a.bin": os.urandom(6 * MiB + 17), "peer/b.bin": os.urandom(3 * MiB)}
    clean_cloud.seed_gcs(BUCKET, files)
    return files


def _config(peers: list[str] | None = None, **spec: object) -> FetchConfig:
    return FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=4),
        retry=Retry(backoff_base_s=0.01, backoff_cap_s=0.05),
        peers=PeerSpec(tuple(peers), **spec) if peers else None,  # type: ignore[arg-type]
    )


def _origin_body_bytes(cloud: StorageEmulator) -> int:
    return int(cloud.stats()["body_bytes_down"])


def _check(dest: Path, model: dict[str, bytes]) -> None:
    for key, data in model.items():
        assert (dest / key.split("/", 1)[1]).read_bytes() == data, key


class Served:
    def __init__(self, proc: subprocess.Popen[str], address: str) -> None:
        self.proc, self.address = proc, address

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=10)  # reaps it and closes the pipes


@pytest.fixture
def serve() -> Iterator[object]:
    started: list[Served] = []

    def start(root: Path, *extra: str, env: dict[str, str] | None = None) -> Served:
        proc = spawn_cli(
            ["serve-peers", str(root), "--listen", "127.0.0.1:0", "--json", *extra], env=env
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        s = Served(proc, json.loads(line)["listen"])
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            s.proc.communicate(timeout=10)
            assert s.proc.returncode == 0  # SIGTERM: a clean exit
        else:
            s.proc.communicate(timeout=10)


def _get(
    address: str, target: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request, the target sent byte for byte (no client normalising it)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        head = [f"{method} {target} HTTP/1.1", f"Host: {address}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        raw = b""
        while chunk := s.recv(1 << 16):
            raw += chunk
    top, _, body = raw.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    fields = dict(ln.split(": ", 1) for ln in lines[1:] if ": " in ln)
    return int(lines[0].split()[1]), fields, body


@pytest.mark.parametrize("store", ["gs", "s3"])
def test_a_peer_holding_everything_serves_every_byte_and_the_origin_serves_none(
    store: str,
    model: dict[str, bytes],
    clean_cloud: StorageEmulator,
    s3_env: dict[str, str],
    tmp_path: Path,
    serve: object,
) -> None:
    # gs: fake-gcs-server's CRC-32C; s3: seaweedfs, whose objects carry only an MD5 ETag
    # (hashed in order from the landed file: peer bytes checked the same way)
    clean_cloud.seed_s3(BUCKET, model)
    url = URL if store == "gs" else f"s3://{BUCKET}/peer/"
    fetch(url, tmp_path / "a", _config())
    peer = serve(tmp_path / "a", env={**os.environ, **s3_env})  # type: ignore[operator]
    clean_cloud.reset_stats()
    report = fetch(url, tmp_path / "b", _config([peer.address]))
    _check(tmp_path / "b", model)
    assert report.bytes_from_peers == sum(len(v) for v in model.values())
    want = "crc32c" if store == "gs" else "md5"
    assert report.verified.get(want) == 2 and not report.peers_dropped, report.verified
    assert _origin_body_bytes(clean_cloud) < 64 << 10  # listing and stats only


def test_a_peer_holding_nothing_leaves_it_all_to_the_origin(
    model: dict[str, bytes], tmp_path: Path, serve: object
) -> None:
    (tmp_path / "empty").mkdir()
    peer = serve(tmp_path / "empty")  # type: ignore[operator]
    report = fetch(URL, tmp_path / "b", _config([peer.address]))
    _check(tmp_path / "b", model)
    assert report.bytes_from_peers == 0 and not report.peers_dropped


def test_a_peer_with_one_file_done_and_one_half_arrived_serves_exactly_what_it_has(
    model: dict[str, bytes], clean_cloud: StorageEmulator, tmp_path: Path, serve: object
) -> None:
    a = tmp_path / "a"
    fetch(URL + "b.bin", a, _config())  # b.bin complete on the peer
    # a.bin half arrived: a fetch whose other ranged reads hang, killed once its journal
    # lists some chunks (what a peer still starting holds).
    clean_cloud.set_faults([FaultRule(kind="stall", count=3, ranged_only=True)])
    proc = spawn_cli(
        [
            "fetch",
            URL + "a.bin",
            str(a),
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
    journals = a / ".spotstart" / "parts"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = sum(len(p.read_text().splitlines()) - 1 for p in journals.glob("*.journal"))
        if lines >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    clean_cloud.set_faults([])
    assert not (a / "a.bin").exists()
    peer = serve(a)  # type: ignore[operator]
    _, _, body = _get(peer.address, "/v1/inventory")
    held = {o["size"]: o for o in json.loads(body)["objects"]}
    assert held[3 * MiB]["complete"] and held[3 * MiB]["ranges"] == [[0, 3 * MiB]]
    partial = held[6 * MiB + 17]
    assert not partial["complete"]
    have = sum(b - a_ for a_, b in partial["ranges"])
    assert 0 < have < 6 * MiB + 17

    report = fetch(URL, tmp_path / "b", _config([peer.address]))
    _check(tmp_path / "b", model)
    assert report.bytes_from_peers == 3 * MiB + have
    assert not report.peers_dropped


def test_a_peer_killed_mid_transfer_costs_nothing_but_time(
    model: dict[str, bytes], tmp_path: Path, serve: object
) -> None:
    fetch(URL, tmp_path / "a", _config())
    peer = serve(tmp_path / "a")  # type: ignore[operator]
    host, port = peer.address.rsplit(":", 1)
    # The peer behind a slow NIC of its own, so the kill lands mid-body.
    with LinkEmulator(LinkConfig(per_conn_bytes_per_s=2e6, first_byte_latency_s=0)) as nic:
        slow = nic.open_proxy((host, int(port)), http=True)
        result: list[FetchReport | BaseException] = []

        def consumer() -> None:
            try:
                result.append(fetch(URL, tmp_path / "b", _config([f"127.0.0.1:{slow.port}"])))
            except BaseException as exc:
                result.append(exc)

        t = threading.Thread(target=consumer)
        t.start()
        deadline = time.monotonic() + 20
        while nic.stats.body_bytes_down < 512 << 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        peer.kill()
        t.join(60)
    assert result and isinstance(result[0], FetchReport), result
    _check(tmp_path / "b", model)
    assert list(result[0].peers_dropped) == [f"127.0.0.1:{slow.port}"]


def _flip_a_byte(a: Path, at: int) -> None:
    """A flipped byte in the peer's a.bin, size and mtime as its index records."""
    victim = a / "a.bin"
    st = victim.stat()
    with victim.open("r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_peer_serving_corrupt_bytes_is_caught_on_arrival_by_its_own_chunk_crc(
    model: dict[str, bytes], tmp_path: Path, serve: object
) -> None:
    a = tmp_path / "a"
    fetch(URL, a, _config())
    _flip_a_byte(a, 2 * MiB + 5)
    peer = serve(a)  # type: ignore[operator]
    report = fetch(URL, tmp_path / "b", _config([peer.address]))
    _check(tmp_path / "b", model)
    assert (
        "chunk 2 of a.bin does not match the CRC it published"
        in (report.peers_dropped[peer.address])
    )
    assert report.refetched_chunks == 0  # the bad chunk never landed as done


def test_a_lying_peer_is_caught_by_the_origins_checksum_and_only_its_chunks_refetched(
    model: dict[str, bytes], tmp_path: Path, serve: object
) -> None:
    from spotstart.fetch.verify import crc32c

    a = tmp_path / "a"
    fetch(URL, a, _config())
    _flip_a_byte(a, 2 * MiB + 5)
    # ...and it publishes the CRC of its wrong bytes: consistent, and a lie.
    index_path = a / ".spotstart" / "index.json"
    index = json.loads(index_path.read_text())
    bad = (a / "a.bin").read_bytes()[2 * MiB : 3 * MiB]
    index["files"]["a.bin"]["crcs"][2] = f"{crc32c(bad):x}"
    index_path.write_text(json.dumps(index))
    peer = serve(a)  # type: ignore[operator]
    report = fetch(URL, tmp_path / "b", _config([peer.address]))
    _check(tmp_path / "b", model)
    assert "fail the origin's checksum" in report.peers_dropped[peer.address]
    assert report.refetched_chunks == 1  # of the peer's chunks, only the lie differed
    assert report.verified.get("crc32c") == 2


def test_a_stalling_peer_is_left_for_the_origin(
    model: dict[str, bytes], tmp_path: Path, serve: object
) -> None:
    fetch(URL, tmp_path / "a", _config())
    real = serve(tmp_path / "a")  # type: ignore[operator]
    _, _, inventory = _get(real.address, "/v1/inventory")
    real.kill()
    # A peer that claims everything and then sends headers and no body.
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve_stalling() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            request = conn.recv(65536)
            if b"/v1/inventory" in request:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(inventory)}\r\nConnection: close\r\n\r\n".encode()
                    + inventory
                )
                conn.close()

    t = threading.Thread(target=serve_stalling, daemon=True)
    t.start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        started = time.monotonic()
        report = fetch(URL, tmp_path / "b", _config([address], stall_timeout_s=0.5))
        took = time.monotonic() - started
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        listener.close()
    _check(tmp_path / "b", model)
    assert address in report.peers_dropped and report.bytes_from_peers == 0
    assert took < 30  # dropped after one stall, not retried chunk after chunk


def test_the_peer_server_names_no_paths_and_serves_nothing_outside_its_holdings(
    model: dict[str, bytes], tmp_path: Path, serve: object
) -> None:
    a = tmp_path / "a"
    fetch(URL, a, _config())
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for peers" * 100)
    (a / "link.bin").symlink_to(secret)
    # A tampered index naming a file outside DIR and a symlink inside it.
    index_path = a / ".spotstart" / "index.json"
    index = json.loads(index_path.read_text())
    st = secret.stat()
    for rel in ("../secret.txt", "link.bin", ".spotstart/index.json"):
        index["files"][rel] = {
            "source": f"gs://{BUCKET}/x",
            "version": "1",
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
    index_path.write_text(json.dumps(index))
    token = "s3cret-s3cret-s3cret"  # a peer token is at least 16 bytes
    peer = serve(a, env={**os.environ, "SPOTSTART_PEER_TOKEN": token})  # type: ignore[operator]
    auth = {"Authorization": f"Bearer {token}"}

    assert _get(peer.address, "/v1/inventory")[0] == 401
    assert _get(peer.address, "/v1/inventory", {"Authorization": "Bearer nope"})[0] == 401
    code, _, body = _get(peer.address, "/v1/inventory", auth)
    assert code == 200
    objects = json.loads(body)["objects"]
    assert sorted(o["size"] for o in objects) == sorted(len(v) for v in model.values())
    assert all(set(o) == {"id", "size", "ranges", "complete", "chunks"} for o in objects)
    assert str(a) not in body.decode() and "secret" not in body.decode()
    good = objects[0]["id"]
    for target in (
        "/v1/objects/../../../../etc/passwd",
        "/v1/objects/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/objects/..%2f..%2fsecret.txt",
        f"/v1/objects/{good}/../../secret.txt",
        "/v1/objects/" + "0" * 64,
        "/v1/objects/" + good.upper(),
        "/etc/passwd",
    ):
        code, _, body = _get(peer.address, target, {**auth, "Range": "bytes=0-10"})
        assert code == 404, (target, code)
        assert b"not for peers" not in body
    size = next(o["size"] for o in objects if o["id"] == good)
    for bad_range in ("bytes=0-", f"bytes={size}-{size + 10}", "bytes=5-1", "bytes=0-1,5-9", ""):
        want = 206 if bad_range == "bytes=0-" else 416
        code, _, _ = _get(peer.address, f"/v1/objects/{good}", {**auth, "Range": bad_range})
        assert code == want, (bad_range, code)
    assert _get(peer.address, f"/v1/objects/{good}", auth, method="POST")[0] == 405
    assert _get(peer.address, f"/v1/objects/{good}", auth, method="DELETE")[0] == 405
    assert tree_digest(a)  # nothing changed under DIR by any of it
    assert secret.read_bytes() == b"not for peers" * 100


def test_the_guard_serves_its_weights_dir_to_peers_while_it_runs(
    model: dict[str, bytes], tmp_path: Path
) -> None:
    from tests.guard.test_proxy import UPSTREAM_CMD, free_ports, start_guard, wait_until_ready

    fetch(URL, tmp_path / "a", _config())
    port, listen_port, peer_port = free_ports(3)
    guard, url = start_guard(
        f"http://127.0.0.1:{port}",
        "--cloud",
        "none",
        "--serve-peers",
        f"{tmp_path / 'a'}:127.0.0.1:{peer_port}",
        "--",
        *UPSTREAM_CMD,
        str(port),
        listen_port=listen_port,
    )
    try:
        wait_until_ready(url, proc=guard)
        report = fetch(URL, tmp_path / "b", _config([f"127.0.0.1:{peer_port}"]))
    finally:
        guard.popen.send_signal(signal.SIGTERM)  # drains, stops its server, exits
        code = guard.popen.wait(timeout=30)
        guard.stop()
    assert code == 0, guard.text
    assert "serving" in guard.text and "to peers on" in guard.text
    _check(tmp_path / "b", model)
    assert report.bytes_from_peers == sum(len(v) for v in model.values())


def test_a_fetch_serving_its_dest_gives_the_chunks_it_has_while_it_runs(
    model: dict[str, bytes], clean_cloud: StorageEmulator, tmp_path: Path
) -> None:
    from tests.guard.test_proxy import free_port

    port = free_port()
    # Node A: three of its ranged reads hang, so it sits mid-way, serving what it has.
    clean_cloud.set_faults([FaultRule(kind="stall", count=3, ranged_only=True)])
    a = spawn_cli(
        [
            "fetch",
            URL + "a.bin",
            str(tmp_path / "a"),
            "--concurrency",
            "4",
            "--chunk-size",
            "1MiB",
            "--stall-timeout",
            "60",
            "--serve-peers",
            f"127.0.0.1:{port}",
            "--json",
        ],
        env=dict(os.environ),
    )
    try:
        journals = tmp_path / "a" / ".spotstart" / "parts"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if sum(len(p.read_text().splitlines()) - 1 for p in journals.glob("*.journal")) >= 2:
                break
            time.sleep(0.1)
        clean_cloud.set_faults([])
        # Found by name, as a headless Service is: localhost's A record.
        report = fetch(URL, tmp_path / "b", _config([f"dns:localhost:{port}"]))
    finally:
        a.send_signal(signal.SIGKILL)
        a.communicate(timeout=10)
    _check(tmp_path / "b", model)
    assert 0 < report.bytes_from_peers < len(model["peer/a.bin"])
    assert not report.peers_dropped


def test_peers_come_from_the_environment_and_leave_ourselves_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from spotstart.errors import UsageError
    from spotstart.fetch.peers import PeerSet, parse_inventory

    monkeypatch.setenv("SPOTSTART_PEERS", "10.0.0.7:8471, dns:localhost:8471,[::1]:9")
    monkeypatch.setenv("SPOTSTART_PEER_TOKEN", "t0k")
    spec = PeerSpec.parse(None, exclude=("127.0.0.1:8471",))
    assert spec.entries == ("10.0.0.7:8471", "dns:localhost:8471", "[::1]:9")
    assert spec.token == "t0k"
    found = asyncio.run(PeerSet(spec).discover())
    assert "10.0.0.7:8471" in found and "[::1]:9" in found
    assert "127.0.0.1:8471" not in found  # localhost's own A record is ourselves here
    for bad in ("nohost", "h:", "h:99999", "dns:name", ":80"):
        with pytest.raises(UsageError):
            PeerSpec.parse(bad)
    good = "a" * 64
    inv = {
        "objects": [
            {"id": good, "size": 10, "ranges": [[0, 5]]},
            {"id": "../../etc/passwd", "size": 10, "ranges": [[0, 5]]},  # not an id
            {"id": "b" * 64, "size": 10, "ranges": [[0, 50]]},  # past the size
            {"id": "c" * 64, "size": 10, "ranges": [[5, 2]]},  # backwards
            {"id": "d" * 64, "size": "x", "ranges": []},
        ]
    }
    assert {k: v.ranges for k, v in parse_inventory(json.dumps(inv).encode()).items()} == {
        good: ((0, 5),)
    }
    with pytest.raises(ValueError):
        parse_inventory(b'{"objects": 3}')
