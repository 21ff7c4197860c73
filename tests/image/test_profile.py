"""`spotstart image profile` on a real Python server started from an image root: a Python
(Debian's, with its libraries and standard library) packed into an OCI image with umoci,
unpacked by the command itself, traced with strace (and with the audit hook), stopped once
its readiness URL answers. Each prefetch list is parsed back against its documented shape."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart.emulate.registry import DockerRegistry
from spotstart.emulate.servers import free_port
from tests.conftest import CliResult, error_line, isolated_environ, run_cli, spawn_cli
from tests.image import builder, pyroot

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout (tag `server`) whose one layer is the Python root, packed by umoci."""
    d = tmp_path_factory.mktemp("server-image")
    layout = d / "oci"
    builder.OciBuilder(layout, "server")
    bundle = d / "bundle"
    builder.run("umoci", "unpack", "--rootless", "--image", f"{layout}:server", bundle)
    pyroot.build(bundle / "rootfs")
    builder.run(
        "umoci",
        "repack",
        "--history.created_by",
        "COPY python and /app",
        "--image",
        f"{layout}:server",
        bundle,
    )
    return layout


def _profile(args: list[str], out: Path, port: int) -> tuple[int, str, dict]:
    result = run_cli(
        [
            "image",
            "profile",
            *args,
            "--ready-url",
            f"http://127.0.0.1:{port}/",
            "-o",
            str(out),
            "--json",
            "--",
            "/usr/bin/python3",
            "/app/server.py",
            str(port),
        ],
        timeout_s=200,
    )
    return result.code, result.stderr, json.loads(result.stdout) if result.code == 0 else {}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is installed by tests/setup.sh")
def test_strace_profile_of_a_python_server_from_its_image(
    server_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "profile"
    code, stderr, summary = _profile(["--image", f"oci:{server_image}:server"], out, free_port())
    assert code == 0, stderr
    assert summary["tracer"] == "strace"
    doc = json.loads((out / "profile.json").read_text())
    paths = [f["path"] for f in doc["files"]]
    # exec first, then the ELF interpreter the kernel mapped, then what the loader opened
    python = Path(pyroot.host_python()).name
    assert paths[0] == f"/usr/bin/{python}"
    assert paths[1].startswith(("/lib64/ld-linux", "/lib/ld-linux", "/usr/lib64/ld-linux"))
    assert any("/libc.so" in p for p in paths[:8])
    assert "/app/server.py" in paths
    assert any(p.endswith("/http/server.py") for p in paths)
    assert paths.index("/app/server.py") < paths.index("/models/model.safetensors")
    weights = [f for f in doc["files"] if f["kind"] == "weights"]
    assert weights == [
        {"path": "/models/model.safetensors", "bytes": pyroot.WEIGHTS_BYTES, "kind": "weights"}
    ]
    code_paths = [f["path"] for f in doc["files"] if f["kind"] == "code"]
    # eStargz --estargz-record-in: JSON lines, each an object with "path" (a tar entry name)
    records = [json.loads(line) for line in (out / "estargz-record.jsonl").read_text().splitlines()]
    assert all(set(r) == {"path"} and not r["path"].startswith("/") for r in records)
    assert ["/" + r["path"] for r in records] == code_paths
    # SOCI --prefetch-files-json: one JSON array of absolute paths
    soci = json.loads((out / "soci-prefetch.json").read_text())
    assert isinstance(soci, list) and soci == code_paths
    # Nydus prefetch patterns: absolute paths, one a line
    nydus = (out / "nydus-prefetch.txt").read_text().splitlines()
    assert nydus == code_paths and all(p.startswith("/") for p in nydus)
    assert "/models/model.safetensors" not in nydus
    assert 0 < summary["share_of_image"] < 1
    # and the audit reads the profile: the share of the image a start reads, lazily pulled
    audited = run_cli(
        [
            "image",
            "audit",
            f"oci:{server_image}:server",
            "--profile",
            str(out / "profile.json"),
            "--json",
        ]
    )
    assert audited.code == 0, audited.stderr
    report = json.loads(audited.stdout)
    # the checks against the image: every path is in it; SOCI's zTOC minimum as the layer is
    assert not any("not files of the image" in w for w in summary["warnings"])
    small = report["layers"][-1]["bytes_compressed"] < 10 << 20
    assert any("zTOC minimum" in w for w in summary["warnings"]) == small
    # the start reads files in another order than the layer stores them: SOCI loses it
    assert any("out of first-read order" in w for w in summary["warnings"])
    startup = report["startup"]
    assert startup["files"] == len(paths) and startup["files_missing"] == 0
    assert startup["bytes_read"] == sum(f["bytes"] for f in doc["files"])


def test_audit_hook_profile_when_strace_is_not_used(server_image: Path, tmp_path: Path) -> None:
    d = tmp_path / "unpacked"
    builder.run("umoci", "unpack", "--rootless", "--image", f"{server_image}:server", d)
    root = d / "rootfs"
    out = tmp_path / "profile"
    code, stderr, summary = _profile(
        ["--rootfs", str(root), "--tracer", "audit-hook"], out, free_port()
    )
    assert code == 0, stderr
    assert summary["tracer"] == "audit-hook"
    nydus = (out / "nydus-prefetch.txt").read_text().splitlines()
    assert "/app/server.py" in nydus and any(p.endswith("/http/server.py") for p in nydus)
    assert summary["weight_files"] == 1
    assert not [p for p in root.iterdir() if p.name.startswith(".spotstart-hook")]  # cleaned up


def test_a_server_that_exits_before_ready_is_exit_15(tmp_path: Path) -> None:
    root = tmp_path / "root"
    pyroot.build(root)
    result = run_cli(
        [
            "image",
            "profile",
            "--rootfs",
            str(root),
            "--ready-url",
            "http://127.0.0.1:9/",
            "-o",
            str(tmp_path / "p"),
            "--",
            "/usr/bin/python3",
            "-c",
            "raise SystemExit(3)",
        ],
    )
    assert result.code == 15, result.stderr
    assert "exited with 3" in error_line(result.stderr)


def test_profile_needs_a_readiness_signal(tmp_path: Path) -> None:
    result = run_cli(["image", "profile", "--rootfs", str(tmp_path), "--", "true"])
    assert result.code == 2
    assert "--ready-url" in error_line(result.stderr)


def test_profile_unpacks_an_image_from_a_plain_http_registry(
    server_image: Path, registry: DockerRegistry, tmp_path: Path
) -> None:
    builder.skopeo(
        f"oci:{server_image}:server",
        f"docker://{registry.address}/team/server:v1",
        "--dest-tls-verify=false",
    )
    out = tmp_path / "profile"
    code, stderr, summary = _profile(
        ["--image", f"{registry.address}/team/server:v1"], out, free_port()
    )
    assert code == 0, stderr
    nydus = (out / "nydus-prefetch.txt").read_text().splitlines()
    assert "/app/server.py" in nydus
    assert not any("not files of the image" in w for w in summary["warnings"])


# -- the sandbox: an image nobody here wrote, profiled by root in CI ---------------------------

ESCAPE = r"""
import os, sys, time
sentinel = sys.argv[1]
def attempt(label, path):
    try:
        with open(path) as f:
            print(label, "read:", f.read(), flush=True)
    except OSError as e:
        print(label, "read refused:", e.errno, flush=True)
    try:
        with open(path, "a") as f:
            f.write("escaped " + label + "\n")
        print(label, "write done", flush=True)
    except OSError as e:
        print(label, "write refused:", e.errno, flush=True)
attempt("direct", sentinel)
attempt("proc-1-root", "/proc/1/root" + sentinel)
# the classic: chroot into a subdirectory while keeping the cwd outside it, climb, chroot there
try:
    os.makedirs("/tmp/x", exist_ok=True)
    os.chroot("/tmp/x")
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
    print("chroot escape: chrooted", flush=True)
except OSError as e:
    print("chroot escape refused:", e.errno, flush=True)
attempt("escaped", sentinel)
print("uid inside:", os.getuid(), os.geteuid(), flush=True)
print("escape attempts done", flush=True)
time.sleep(600)
"""

WAIT_FOR_SIGNAL = r"""
import os, signal, time
released = []
signal.signal(signal.SIGUSR1, lambda *_: released.append(True))
print("env:", sorted(os.environ), os.environ.get("GIVEN"), flush=True)
print("uid inside:", os.getuid(), flush=True)
while not released:
    time.sleep(0.05)
print("released", flush=True)
time.sleep(600)
"""

DAEMON = r"""
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, b"x")  # the daemon is up, in a session of its own
        while True:
            time.sleep(60)
    os._exit(0)
os.read(r, 1)
print("daemon started", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def open_root() -> Iterator[Path]:
    """A Python image root with the hostile scripts, under a path every user can traverse (a
    non-root caller must reach it; the sentinel beside it is reachable by everyone too, so
    only the sandbox keeps the command from it)."""
    top = Path(tempfile.mkdtemp(prefix="spotstart-sandbox-test-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        root = pyroot.build(top / "root")
        (root / "app/escape.py").write_text(ESCAPE)
        (root / "app/wait.py").write_text(WAIT_FOR_SIGNAL)
        (root / "app/daemon.py").write_text(DAEMON)
        yield root
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture()
def sentinel(open_root: Path) -> Iterator[tuple[Path, str]]:
    secret = f"host-secret-{uuid.uuid4().hex}"
    path = open_root.parent / f"sentinel-{uuid.uuid4().hex}"
    path.write_text(secret)
    os.chmod(path, 0o666)  # readable and writable by anyone on the host
    yield path, secret
    path.unlink()


def _rootfs_args(root: Path, out: Path, flags: list[str], *command: str) -> list[str]:
    return ["image", "profile", "--rootfs", str(root), "-o", str(out), *flags, "--", *command]


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # the image's python running one of its scripts: not the CLI or the helpers,
            # whose arguments hold the marker too
            if argv[:1] == [b"/usr/bin/python3"] and marker.encode() in argv:
                pids.append(int(entry.name))
    return pids


def _as_nobody() -> list[str]:
    """Run a command as an unprivileged user: nobody from root, the test's own user else."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _unprivileged_userns_refused() -> str | None:
    probe = subprocess.run(
        [*_as_nobody(), "bwrap", "--unshare-user", "--ro-bind", "/", "/", "--", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if probe.returncode == 0 else probe.stderr.strip()


def _escape_profile(root: Path, out: Path, sentinel: Path, prefix: list[str]) -> CliResult:
    args = ["image", "profile", "--rootfs", str(root), "--ready-log", "escape attempts done"]
    args += ["-o", str(out), "--", "/usr/bin/python3", "/app/escape.py", str(sentinel)]
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "spotstart.cli.main", *args],
        env=isolated_environ(),
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
        cwd="/",
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def _assert_escape_failed(result: CliResult, out: Path, sentinel: tuple[Path, str]) -> None:
    path, secret = sentinel
    assert result.code == 0, result.stderr
    log = (out / "server.log").read_text()
    assert "escape attempts done" in log
    assert path.read_text() == secret  # untouched
    assert secret not in log + result.stdout + result.stderr  # unread
    assert "write done" not in log
    uid = re.search(r"uid inside: (\d+) (\d+)", log)
    assert uid is not None and uid.groups() != ("0", "0"), log


@pytest.mark.skipif(os.geteuid() != 0, reason="the escape as root needs a root test run (CI)")
def test_the_chroot_escape_attempted_as_root_cannot_reach_the_host(
    open_root: Path, sentinel: tuple[Path, str], tmp_path: Path
) -> None:
    out = tmp_path / "profile"
    result = _escape_profile(open_root, out, sentinel[0], [])
    _assert_escape_failed(result, out, sentinel)


def test_the_chroot_escape_attempted_as_a_user_cannot_reach_the_host(
    open_root: Path, sentinel: tuple[Path, str]
) -> None:
    refused = _unprivileged_userns_refused()
    if refused:
        pytest.skip(f"this kernel refuses unprivileged user namespaces: {refused}")
    out = Path(tempfile.mkdtemp(prefix="out-", dir=open_root.parent))
    if os.geteuid() == 0:
        os.chown(out, 65534, 65534)
    result = _escape_profile(open_root, out / "profile", sentinel[0], _as_nobody())
    _assert_escape_failed(result, out / "profile", sentinel)


def test_the_command_runs_as_an_unprivileged_uid_without_the_host_environment(
    open_root: Path, tmp_path: Path
) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    out = tmp_path / "profile"
    cli = spawn_cli(
        _rootfs_args(
            open_root,
            out,
            ["--ready-log", "^released", "-e", "GIVEN=given-value"],
            *("/usr/bin/python3", "/app/wait.py", marker),
        ),
        env={"SPOTSTART_HOST_SECRET": "host-env-secret"},
    )
    try:
        deadline = time.monotonic() + 60
        while not (pids := _processes_with(marker)):
            assert cli.poll() is None, cli.communicate()
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.05)
        (pid,) = pids

        def status() -> dict[str, str]:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            return dict(line.split(":", 1) for line in lines)

        # it waits for SIGUSR1 once it catches it (before, the signal would kill it)
        while not int(status()["SigCgt"], 16) & 1 << (signal.SIGUSR1 - 1):
            assert time.monotonic() < deadline, "the command never caught SIGUSR1"
            time.sleep(0.05)
        seen = status()
        # seen from the host: no id of root, no capability, no way to gain either
        assert all(int(i) != 0 for i in seen["Uid"].split()), seen["Uid"]
        assert all(int(i) != 0 for i in seen["Gid"].split()), seen["Gid"]
        assert int(seen["CapEff"], 16) == 0 and int(seen["CapPrm"], 16) == 0
        assert seen["NoNewPrivs"].strip() == "1"
        os.kill(pid, signal.SIGUSR1)
        _, stderr = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, stderr
    log = (out / "server.log").read_text()
    assert "host-env-secret" not in log and "SPOTSTART_HOST_SECRET" not in log
    assert "given-value" in log
    assert not re.search(r"uid inside: 0\b", log)


def test_a_setsid_daemon_the_command_started_is_gone_when_profile_returns(
    open_root: Path, tmp_path: Path
) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    result = run_cli(
        _rootfs_args(
            open_root,
            tmp_path / "profile",
            ["--ready-log", "daemon started"],
            *("/usr/bin/python3", "/app/daemon.py", marker),
        ),
        timeout_s=200,
    )
    left: list[int] = []
    try:
        assert result.code == 0, result.stderr
        deadline = time.monotonic() + 10
        while (left := _processes_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == [], "the command's daemon outlived the profile"
    finally:
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_ready_url_the_sandbox_cannot_reach_is_refused(open_root: Path, tmp_path: Path) -> None:
    result = run_cli(
        _rootfs_args(
            open_root,
            tmp_path / "p",
            ["--ready-url", "http://10.1.2.3:80/"],
            *("/usr/bin/python3", "/app/daemon.py", "x"),
        )
    )
    assert result.code == 2
    assert "--share-host-network" in error_line(result.stderr)
