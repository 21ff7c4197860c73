"""Shared fixtures: an isolated environment (no cloud credentials, no metadata servers: no
test ever sends a packet beyond 127.0.0.1), one emulated cloud for the whole run, and a way to
run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import settings

from spotstart.emulate.crosscheck import GcsEmulator, MotoS3, Nginx, S3rver
from spotstart.emulate.link import LinkConfig
from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions
from tests.safe_report import make_report

BUCKET = "models"

# No wall-clock limits in tests (STYLE.md): hypothesis' per-example deadline is one, and it
# fails on a busy 2-core machine. Per-test timeouts (pytest-timeout) still bound a hang.
settings.register_profile("spotstart", deadline=None, print_blob=True)
settings.load_profile("spotstart")

# Credential chains probe cloud metadata servers (169.254.169.254): point them nowhere.
ISOLATED_ENV = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "NO_GCE_CHECK": "True",
    "CLOUDSDK_CONFIG": "/nonexistent/gcloud",
    "SPOTSTART_AZURE_METADATA_URL": "http://127.0.0.1:9",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9",
}
CLEARED = (
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
    "AWS_CA_BUNDLE",
)


def isolated_environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(ISOLATED_ENV)
    return env


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in CLEARED:
        monkeypatch.delenv(key, raising=False)
    for key, value in ISOLATED_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageEmulator]:
    """One emulated cloud for the run: a fast link (tests check behaviour, not speed)."""
    options = StorageEmulatorOptions(
        data_dir=tmp_path_factory.mktemp("cloud"),
        link=LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.0),
        buckets=(BUCKET,),
    )
    with StorageEmulator(options) as emu:
        yield emu


@pytest.fixture
def clean_cloud(cloud: StorageEmulator) -> Iterator[StorageEmulator]:
    """The cloud with no faults, zeroed stats and a fast link before and after the test."""
    fast = LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.0)
    cloud.clear_faults()
    cloud.set_link(fast)
    cloud.reset_stats()
    yield cloud
    cloud.clear_faults()
    cloud.set_link(fast)


@pytest.fixture(autouse=True)
def _no_faults_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whatever a test did to the shared cloud (faults, a slow link), the next test starts
    clean, even when the test failed half-way or used ``cloud`` directly."""
    yield
    if "cloud" in request.fixturenames:
        emu: StorageEmulator = request.getfixturevalue("cloud")
        emu.clear_faults()
        emu.set_link(LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.0))
        emu.reset_stats()


@pytest.fixture
def s3_env(cloud: StorageEmulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = cloud.env_for_s3()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def gcs_env(cloud: StorageEmulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"STORAGE_EMULATOR_HOST": cloud.gcs.endpoint}
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", cloud.gcs.endpoint)
    return env


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(
    args: list[str], env: Mapping[str, str] | None = None, timeout_s: float = 120
) -> CliResult:
    """Run `spotstart ARGS` in a subprocess, as a user would."""
    full_env = isolated_environ()
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "spotstart.cli.main", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def error_line(stderr: str) -> str:
    """The error a failed command printed: exactly one line, the last one."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("spotstart: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def spawn_cli(args: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = isolated_environ()
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "spotstart.cli.main", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative paths), skipping spotstart's own state."""
    import hashlib

    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(".spotstart"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------
# Every implementation of each protocol the test run starts: fetch and load are run against
# each (tests/fetch/test_crosscheck.py, tests/weights/test_crosscheck.py).
# --------------------------------------------------------------------------------------------


@dataclass
class Store:
    """One server speaking one protocol, as a test sees it: seed objects, then fetch URLs."""

    name: str
    scheme: str  # s3, gs, http, https
    env: dict[str, str]
    seed: Callable[[dict[str, bytes]], None]
    base: str  # URL of the bucket / document root, no trailing slash

    def url(self, key: str) -> str:
        return f"{self.base}/{key}"


S3RVER_BIN = Path(__file__).parent / "node" / "node_modules" / ".bin" / "s3rver"
ServerT = TypeVar("ServerT", MotoS3, S3rver, GcsEmulator, Nginx)


def _served(server: ServerT) -> Iterator[ServerT]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    yield from _served(MotoS3(tmp_path_factory.mktemp("moto"), (BUCKET,)))


@pytest.fixture(scope="session")
def s3rver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3rver]:
    yield from _served(S3rver(tmp_path_factory.mktemp("s3rver"), (BUCKET,), S3RVER_BIN))


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    yield from _served(GcsEmulator(tmp_path_factory.mktemp("gcpemu"), (BUCKET,)))


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    yield from _served(Nginx(tmp_path_factory.mktemp("nginx")))


STORE_NAMES = (
    "seaweedfs",
    "moto",
    "s3rver",
    "fake-gcs",
    "gcp-storage-emulator",
    "nginx",
    "nginx-tls",
)


@pytest.fixture(params=STORE_NAMES)
def store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Store:
    """Each server of the run in turn, its environment set for this test."""
    name: str = request.param
    if name in ("seaweedfs", "fake-gcs"):
        emu: StorageEmulator = request.getfixturevalue("clean_cloud")
        if name == "seaweedfs":
            st = Store(
                name, "s3", emu.env_for_s3(), lambda o: emu.seed_s3(BUCKET, o), f"s3://{BUCKET}"
            )
        else:
            env = {"STORAGE_EMULATOR_HOST": emu.gcs.endpoint}
            st = Store(name, "gs", env, lambda o: emu.seed_gcs(BUCKET, o), f"gs://{BUCKET}")
    elif name in ("moto", "s3rver"):
        m: MotoS3 | S3rver = request.getfixturevalue(name)
        st = Store(name, "s3", m.env(), lambda o: m.seed(BUCKET, o), f"s3://{BUCKET}")
    elif name == "gcp-storage-emulator":
        g: GcsEmulator = request.getfixturevalue("gcs_emulator")
        st = Store(name, "gs", g.env(), lambda o: g.seed(BUCKET, o), f"gs://{BUCKET}")
    else:
        n: Nginx = request.getfixturevalue("nginx")
        tls = name == "nginx-tls"
        env = {"SSL_CERT_FILE": str(n.cert_path)} if tls else {}
        st = Store(
            name, "https" if tls else "http", env, n.seed, n.tls_endpoint if tls else n.endpoint
        )
    for key, value in st.env.items():
        monkeypatch.setenv(key, value)
    return st


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """pytest's own report, or one that survives a traceback pytest cannot format (see
    tests/safe_report.py): a hung test's timeout must not end the whole run."""
    return make_report(item, call)
