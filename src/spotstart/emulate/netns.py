"""Several hosts on this machine as Linux network namespaces, for peer tests and benchmarks.

Each host is a namespace with one veth into a bridge in the root namespace, its own 10.x
address, and tc token buckets on both ends of its veth: the namespace end paces what the host
sends (its uplink), the bridge end what it receives (its downlink). The root namespace holds
the bridge's address: a server started there on it (the storage emulator) is the origin every
host reaches, and a tbf on the bridge device paces what the root namespace sends into it (the
origin's uplink). A host can be cut off (its link down) or have its processes killed.

Not a network simulator: the kernel's own TCP over real (virtual) links, with rates from tc.
Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's ``ip`` and ``tc``. Every name a
run creates starts with ``spst`` and holds the creating process's id, so that a later run
removes what a crashed one left (:func:`remove_leftovers`).

    with HostNetwork(origin_up_bytes_per_s=50e6) as net:
        a = net.add_host("a", up_bytes_per_s=25e6, down_bytes_per_s=25e6)
        proc = a.popen(["python", "-m", "spotstart", "fetch", ...])
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from spotstart.emulate.servers import EmulatorError

FAMILY = "spst"
# Interface names hold at most 15 bytes: "spst" + pid (<= 7 digits) + a 2-4 byte suffix.
_NAME = re.compile(rf"^{FAMILY}(\d+)(?:[a-z][0-9a-z]*)$")
_NS = re.compile(rf"^{FAMILY}-(\d+)-")
_LOCK = Path("/run/spotstart-netns.lock")
MAX_HOSTS = 200
# A tbf bucket holds at least this much: veth hands it GSO packets of up to 64 KiB, and a
# bucket smaller than a packet makes tbf split each one (CPU) or drop it.
_MIN_BURST = 96 * 1024
# ... and at least this many seconds of its rate (the timer that refills it ticks at HZ).
_BURST_S = 0.004


class NamespaceUnavailable(EmulatorError):
    """Network namespaces cannot be made here: not root, no CAP_NET_ADMIN, no iproute2."""


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise EmulatorError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def check_available() -> None:
    """Raise :class:`NamespaceUnavailable` (saying what is missing and the fix) unless this
    process can make namespaces, veths, bridges and tc qdiscs."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NamespaceUnavailable(
            f"network namespaces need iproute2's {' and '.join(missing)} on PATH "
            "(Debian: apt-get install iproute2)"
        )
    if os.geteuid() != 0:
        raise NamespaceUnavailable(
            f"network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); running as uid "
            f"{os.geteuid()}: run as root, or in a container with those capabilities"
        )
    probe = f"{FAMILY}{os.getpid()}p"
    made = _run(["ip", "link", "add", probe, "type", "bridge"], check=False)
    if made.returncode != 0:
        raise NamespaceUnavailable(
            f"cannot create network interfaces ({made.stderr.strip()}): this process lacks "
            "CAP_NET_ADMIN (a container needs --cap-add NET_ADMIN, or --privileged)"
        )
    _run(["ip", "link", "del", probe], check=False)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _namespaces() -> list[str]:
    out = _run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    if not out:
        return []
    return [str(entry["name"]) for entry in json.loads(out)]


def _links() -> list[str]:
    out = _run(["ip", "-j", "link", "show"], check=False).stdout.strip()
    return [str(entry["ifname"]) for entry in json.loads(out)] if out else []


def _kill_namespace_processes(ns: str, sig: int = signal.SIGKILL) -> list[int]:
    pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def _delete_namespace(ns: str) -> None:
    for _ in range(50):
        if not _kill_namespace_processes(ns):
            break
        time.sleep(0.05)
    _run(["ip", "netns", "del", ns], check=False)


def remove_leftovers(*, all_runs: bool = False) -> list[str]:
    """Delete namespaces and interfaces of earlier runs whose process is gone (crashed, or
    killed before its cleanup ran); with ``all_runs``, every run's. Returns what it removed."""
    removed: list[str] = []
    for ns in _namespaces():
        match = _NS.match(ns)
        if match and (all_runs or not _alive(int(match.group(1)))):
            _delete_namespace(ns)
            removed.append(ns)
    for link in _links():
        name = link.split("@", 1)[0]
        match = _NAME.match(name)
        if match and (all_runs or not _alive(int(match.group(1)))):
            _run(["ip", "link", "del", name], check=False)
            removed.append(name)
    return removed


def _tbf(dev: str, bytes_per_s: float, *, netns: str | None = None) -> None:
    burst = max(_MIN_BURST, int(bytes_per_s * _BURST_S))
    prefix = ["ip", "netns", "exec", netns] if netns else []
    _run(
        [
            *prefix,
            *("tc", "qdisc", "replace", "dev", dev, "root", "tbf"),
            *("rate", f"{int(bytes_per_s * 8)}bit", "burst", str(burst)),
            *("latency", "100ms"),
        ]
    )


def _delay(dev: str, delay_s: float, bytes_per_s: float | None, netns: str | None) -> None:
    """netem delay at the root, the tbf (if any) under it."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    made = _run(
        [
            *prefix,
            *("tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem"),
            *("delay", f"{delay_s * 1000:g}ms", "limit", "100000"),
        ],
        check=False,
    )
    if made.returncode != 0:
        raise NamespaceUnavailable(
            f"tc netem delay on {dev}: {made.stderr.strip()} (this kernel has no sch_netem: "
            "leave the delay out)"
        )
    if bytes_per_s is not None:
        burst = max(_MIN_BURST, int(bytes_per_s * _BURST_S))
        _run(
            [
                *prefix,
                *("tc", "qdisc", "add", "dev", dev, "parent", "1:", "handle", "2:", "tbf"),
                *("rate", f"{int(bytes_per_s * 8)}bit", "burst", str(burst), "latency", "100ms"),
            ]
        )


@dataclass
class Host:
    """One namespace: a name, an address on the bridge, and the processes started in it."""

    name: str
    netns: str
    address: str
    veth_host: str  # inside the namespace
    veth_bridge: str  # in the root namespace, on the bridge
    up_bytes_per_s: float | None
    down_bytes_per_s: float | None
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    cut_off: bool = False

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host (``ip netns exec`` execs it: the pid is the
        command's own)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
        text: bool = True,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in this host; it is killed when the host goes."""
        proc = subprocess.Popen(
            self.argv(argv), env=env, stdout=stdout, stderr=stderr, text=text, cwd=cwd
        )
        self.procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 60,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this host to its end; EmulatorError (with its stderr) on a
        non-zero exit when ``check``."""
        proc = subprocess.run(
            self.argv(argv),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and proc.returncode != 0:
            raise EmulatorError(
                f"host {self.name}: {' '.join(argv)}: exit {proc.returncode}: "
                f"{proc.stderr.strip()[-800:]}"
            )
        return proc

    def cut(self) -> None:
        """Cut this host off: both ends of its link down. Connections in flight hang, as
        when a node loses its network; nothing is closed or reset."""
        _run(["ip", "link", "set", "dev", self.veth_bridge, "down"])
        _run(
            ["ip", "netns", "exec", self.netns, "ip", "link", "set", "dev", self.veth_host, "down"]
        )
        self.cut_off = True

    def reconnect(self) -> None:
        _run(["ip", "link", "set", "dev", self.veth_bridge, "up"])
        _run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "dev", self.veth_host, "up"])
        self.cut_off = False

    def kill(self) -> list[int]:
        """SIGKILL every process in this namespace (those started here and any other)."""
        pids = _kill_namespace_processes(self.netns)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return pids

    def link_bytes(self) -> dict[str, int]:
        """Bytes this host sent and received on its link (the veth's counters)."""
        out = self.run(["ip", "-j", "-s", "link", "show", "dev", self.veth_host]).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"sent": int(stats["tx"]["bytes"]), "received": int(stats["rx"]["bytes"])}


class HostNetwork:
    """A bridge in the root namespace and hosts on it; everything removed on :meth:`close`
    (and the leftovers of crashed earlier runs removed on start).

    ``origin_up_bytes_per_s``: pace what the root namespace sends to the hosts (the origin's
    uplink: a server listening on :attr:`origin_address`); None: not paced.
    """

    def __init__(
        self,
        *,
        origin_up_bytes_per_s: float | None = None,
        mtu: int = 1500,
    ) -> None:
        self.origin_up_bytes_per_s = origin_up_bytes_per_s
        self.mtu = mtu
        self.run_id = str(os.getpid())
        self.bridge = f"{FAMILY}{self.run_id}br"
        self.hosts: dict[str, Host] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self._started = False
        self._made = 0  # hosts made so far: names and addresses are never reused in a run

    def __enter__(self) -> HostNetwork:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def origin_address(self) -> str:
        """The root namespace's address on the bridge: where hosts reach the origin."""
        assert self.subnet is not None, "start() first"
        return str(self.subnet.network_address + 1)

    def start(self) -> None:
        check_available()
        _LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(_LOCK, "a") as lock:  # two runs at once must not pick the same subnet
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_leftovers()
            remove_leftovers_of(self.run_id)  # a pid reused from a crashed run
            self.subnet = _free_subnet()
            self._started = True
            try:
                _run(["ip", "link", "add", self.bridge, "type", "bridge"])
                _run(["ip", "addr", "add", f"{self.origin_address}/16", "dev", self.bridge])
                _run(["ip", "link", "set", "dev", self.bridge, "mtu", str(self.mtu), "up"])
            except BaseException:
                self.close()
                raise
        if self.origin_up_bytes_per_s is not None:
            _tbf(self.bridge, self.origin_up_bytes_per_s)

    def add_host(
        self,
        name: str,
        *,
        up_bytes_per_s: float | None = None,
        down_bytes_per_s: float | None = None,
        delay_s: float = 0.0,
    ) -> Host:
        """A new host ``name`` (letters and digits) with its uplink and downlink paced
        (None: not paced) and ``delay_s`` one way each direction (needs sch_netem)."""
        if not self._started or self.subnet is None:
            raise EmulatorError("HostNetwork.add_host before start()")
        if not re.fullmatch(r"[a-z0-9]{1,12}", name) or name in self.hosts:
            raise ValueError(f"host name {name!r}: 1-12 lowercase letters or digits, unique")
        index = self._made
        if len(self.hosts) >= MAX_HOSTS or index >= 60000:
            raise EmulatorError(f"at most {MAX_HOSTS} hosts at once")
        self._made += 1
        netns = f"{FAMILY}-{self.run_id}-{name}"
        veth_b, veth_h = f"{FAMILY}{self.run_id}b{index}", f"{FAMILY}{self.run_id}h{index}"
        address = str(self.subnet.network_address + 10 + index)
        host = Host(name, netns, address, veth_h, veth_b, up_bytes_per_s, down_bytes_per_s)
        self.hosts[name] = host
        _run(["ip", "netns", "add", netns])
        in_ns = ["ip", "netns", "exec", netns]
        _run(["ip", "link", "add", veth_b, "type", "veth", "peer", "name", veth_h])
        _run(["ip", "link", "set", veth_h, "netns", netns])
        _run(["ip", "link", "set", "dev", veth_b, "master", self.bridge, "mtu", str(self.mtu)])
        _run(["ip", "link", "set", "dev", veth_b, "up"])
        _run([*in_ns, "ip", "link", "set", "dev", "lo", "up"])
        _run([*in_ns, "ip", "addr", "add", f"{address}/16", "dev", veth_h])
        _run([*in_ns, "ip", "link", "set", "dev", veth_h, "mtu", str(self.mtu), "up"])
        for dev, rate, ns in ((veth_h, up_bytes_per_s, netns), (veth_b, down_bytes_per_s, None)):
            if delay_s > 0:
                _delay(dev, delay_s, rate, ns)
            elif rate is not None:
                _tbf(dev, rate, netns=ns)
        return host

    def remove_host(self, name: str) -> None:
        """Kill ``name``'s processes and delete its namespace and link."""
        host = self.hosts.pop(name)
        host.kill()
        for proc in host.procs:
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)
        _delete_namespace(host.netns)
        _run(["ip", "link", "del", host.veth_bridge], check=False)

    def close(self) -> None:
        """Kill every process in the hosts, delete the namespaces, veths and bridge."""
        if not self._started:
            return
        for host in self.hosts.values():
            host.kill()
        for host in self.hosts.values():
            for proc in host.procs:
                with contextlib.suppress(Exception):
                    proc.communicate(timeout=10)
        remove_leftovers_of(self.run_id)
        self.hosts = {}
        self._started = False


def remove_leftovers_of(run_id: str) -> None:
    """Delete the namespaces and interfaces of run ``run_id`` (a process id)."""
    for ns in _namespaces():
        if ns.startswith(f"{FAMILY}-{run_id}-"):
            _delete_namespace(ns)
    for link in _links():
        name = link.split("@", 1)[0]
        match = _NAME.match(name)
        if match and match.group(1) == run_id:
            _run(["ip", "link", "del", name], check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.x.0.0/16 that no interface of the root namespace is on."""
    out = _run(["ip", "-j", "addr", "show"]).stdout
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in json.loads(out) if out.strip() else []:
        for info in entry.get("addr_info", []):
            if info.get("family") == "inet":
                used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", False))
    for x in range(64, 250):
        candidate = ipaddress.IPv4Network(f"10.{x}.0.0/16")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise EmulatorError("no free 10.x.0.0/16 for the host network")


@contextlib.contextmanager
def host_network(**kwargs: Any) -> Iterator[HostNetwork]:
    """:class:`HostNetwork` as a context manager (the same as ``with HostNetwork(...)``)."""
    with HostNetwork(**kwargs) as net:
        yield net
