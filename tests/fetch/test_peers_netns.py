"""Peer fetch between real hosts: network namespaces on this machine (spotstart.emulate.netns),
each with its own address and tc-paced uplink and downlink, each running a real
`spotstart fetch --serve-peers --peers <the others>` process; the origin (the storage
emulator) on the bridge behind its own paced uplink. Every node must end byte-identical to the
origin; a host killed or cut off mid-transfer must not fail the others (they fall back to the
origin). Bytes and outcomes are asserted, never times.

Needs root (CAP_NET_ADMIN) and iproute2: with CI set, their absence fails the test; without
CI, it skips."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spotstart.emulate.link import LinkConfig
from spotstart.emulate.netns import Host, HostNetwork, NamespaceUnavailable, check_available
from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions, env_for_gcs
from spotstart.fetch.layout import work_paths
from tests.conftest import isolated_environ

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MiB = 1 << 20
BUCKET = "models"
PREFIX = "nsmodel/"
PORT = 8471
TOKEN = "0123456789abcdef" * 4


@dataclass(frozen=True)
class Origin:
    emu: StorageEmulator
    files: dict[str, bytes]  # relative path -> bytes
    net: HostNetwork

    @property
    def model_bytes(self) -> int:
        return sum(len(v) for v in self.files.values())

    def served(self) -> int:
        return int(self.emu.stats()["body_bytes_down"])


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    try:
        check_available()
    except NamespaceUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and network namespaces are unavailable here: {exc}")
        pytest.skip(f"network namespaces unavailable (CI unset): {exc}")
    work = tmp_path_factory.mktemp("netns-origin")
    files = {
        "model-00001-of-00002.safetensors": os.urandom(16 * MiB + 4099),
        "model-00002-of-00002.safetensors": os.urandom(16 * MiB),
        "config.json": b'{"model_type": "llama"}',
    }
    # the origin's uplink: 40 MB/s for all hosts together, a tbf on the bridge
    with HostNetwork(origin_up_bytes_per_s=40e6) as net:
        opts = StorageEmulatorOptions(
            data_dir=work / "emu",
            link=LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.01),
            buckets=(BUCKET,),
            host=net.origin_address,
        )
        with StorageEmulator(opts) as emu:
            emu.seed_gcs(BUCKET, {PREFIX + k: v for k, v in files.items()})
            yield Origin(emu, files, net)


class Node:
    """One host running `spotstart fetch --serve-peers ... --peers ...`."""

    def __init__(self, host: Host, dest: Path) -> None:
        self.host, self.dest = host, dest
        self.proc: subprocess.Popen[str] | None = None
        self.report: dict[str, object] = {}

    @property
    def address(self) -> str:
        return f"{self.host.address}:{PORT}"

    def start(self, origin: Origin, peers: list[Node], token: Path) -> None:
        env = {**isolated_environ(), **env_for_gcs(origin.emu.info)}
        others = ",".join(p.address for p in peers if p is not self)
        argv = [sys.executable, "-P", "-m", "spotstart", "fetch", f"gs://{BUCKET}/{PREFIX}"]
        argv += [str(self.dest), "--json", "--serve-peers", self.address]
        argv += ["--peer-token-file", str(token), "--peers", others]
        self.proc = self.host.popen(argv, env=env)

    def finish(self) -> subprocess.CompletedProcess[str]:
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=300)
        if self.proc.returncode == 0:
            self.report = json.loads(out)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def chunks_landed(self, origin: Origin) -> int:
        """Chunks this node's journals list (0 before it starts, and for a file once done)."""
        landed = 0
        for rel in origin.files:
            _, journal = work_paths(self.dest, rel)
            with contextlib.suppress(FileNotFoundError, UnicodeDecodeError):
                landed += max(0, len(journal.read_text().splitlines()) - 1)
        return landed

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None


def _fleet(origin: Origin, tmp_path: Path, names: list[str], **rates: float) -> list[Node]:
    nodes = []
    for name in names:
        host = origin.net.add_host(name, **rates)
        nodes.append(Node(host, tmp_path / name))
    return nodes


def _token(tmp_path: Path) -> Path:
    path = tmp_path / "peer.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def _check_bytes(node: Node, origin: Origin) -> None:
    for rel, data in origin.files.items():
        assert (node.dest / rel).read_bytes() == data, f"{node.host.name}: {rel}"


def _wait_until(what: str, check: object, limit_s: float = 120) -> None:
    # a bound on a hang, not a measurement: the condition is what the test needs
    deadline = time.monotonic() + limit_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def _remove(origin: Origin, nodes: list[Node]) -> None:
    for node in nodes:
        if node.host.name in origin.net.hosts:
            origin.net.remove_host(node.host.name)


def test_four_hosts_arriving_apart_end_identical_and_take_bytes_from_each_other(
    origin: Origin, tmp_path: Path
) -> None:
    # 10 MB/s down per host against 40 MB/s from the origin for all: each node needs >= 3.3 s,
    # the next arrives once the one before holds chunks
    nodes = _fleet(
        origin, tmp_path, ["a1", "a2", "a3", "a4"], up_bytes_per_s=20e6, down_bytes_per_s=10e6
    )
    token = _token(tmp_path)
    origin.emu.reset_stats()
    try:
        for i, node in enumerate(nodes):
            node.start(origin, nodes, token)
            if i + 1 < len(nodes):
                # the next node arrives once this one holds something to serve
                _wait_until(
                    f"{node.host.name} lands a chunk",
                    lambda n=node: n.chunks_landed(origin) or n.exited(),
                )
        results = [node.finish() for node in nodes]
        for node, result in zip(nodes, results, strict=True):
            assert result.returncode == 0, f"{node.host.name}: {result.stderr[-2000:]}"
            _check_bytes(node, origin)
        from_peers = [int(node.report["bytes_from_peers"]) for node in nodes]  # type: ignore[call-overload]
        served = origin.served()
        assert sum(from_peers) > 0, [n.report for n in nodes]
        assert served < len(nodes) * origin.model_bytes, (served, from_peers)
        # every landed byte came from the origin or a peer, and each node landed one model
        landed = sum(int(n.report["bytes_transferred"]) for n in nodes)  # type: ignore[call-overload]
        assert landed == len(nodes) * origin.model_bytes
    finally:
        _remove(origin, nodes)


@pytest.mark.parametrize("fault", ["killed", "cut off"])
def test_a_host_lost_mid_transfer_does_not_fail_the_others(
    origin: Origin, tmp_path: Path, fault: str
) -> None:
    # the first host fetches and serves; two others arrive and take from it. Downlinks slow
    # (32 MiB at 4 MB/s: 8 s) so that every host is mid-transfer when the first one goes.
    tag = "k" if fault == "killed" else "c"
    lost, *rest = nodes = _fleet(
        origin,
        tmp_path,
        [f"{tag}1", f"{tag}2", f"{tag}3"],
        up_bytes_per_s=40e6,
        down_bytes_per_s=4e6,
    )
    token = _token(tmp_path)
    try:
        lost.start(origin, nodes, token)
        _wait_until(
            "the first host lands a chunk", lambda: lost.chunks_landed(origin) or lost.exited()
        )
        for node in rest:
            node.start(origin, nodes, token)
        before = lost.host.link_bytes()["sent"]
        _wait_until(
            "the first host serves 2 MiB to the others",
            lambda: (
                lost.host.link_bytes()["sent"] - before >= 2 * MiB or any(n.exited() for n in nodes)
            ),
        )
        # every host is mid-transfer: none has its whole model yet
        done = {n.host.name: n.finish() for n in nodes if n.exited()}
        assert not done, f"finished before the fault: {done}"
        if fault == "killed":
            killed = lost.host.kill()
            assert killed, "no process in the host to kill"
        else:
            lost.host.cut()
        results = [node.finish() for node in rest]
        for node, result in zip(rest, results, strict=True):
            assert result.returncode == 0, f"{node.host.name}: {result.stderr[-2000:]}"
            _check_bytes(node, origin)
        if fault == "killed":
            assert lost.proc is not None
            assert lost.proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        _remove(origin, nodes)
