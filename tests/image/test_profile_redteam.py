"""Red-team attacks on the `image profile` sandbox with an image nobody here wrote: what the
command inherits (descriptors, environment), an image whose /tmp, /proc and /dev are links
out of it, a setuid binary, a nested user namespace, a command that ignores SIGTERM and
leaves a daemon behind past the timeout, bubblewrap missing, and a host http_proxy in the
way of the readiness probe. Run as root in CI: the sandbox then runs as nobody."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart.emulate.servers import free_port
from spotstart.image.prefetch import nydus_prefetch
from spotstart.image.profile import ordered_files, parse_strace
from tests.conftest import error_line, run_cli
from tests.image import pyroot

pytestmark = pytest.mark.timeout(300)

INHERITED = r"""
import ctypes, os, stat
for fd in sorted(int(x) for x in os.listdir("/proc/self/fd")):
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
    except OSError:
        continue  # listdir's own descriptor, closed since
    print("fd", fd, os.readlink(f"/proc/self/fd/{fd}"), oct(kind), flush=True)
print("env", sorted(os.environ), flush=True)
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER = 0x10000000
print("nested userns:", libc.unshare(CLONE_NEWUSER), ctypes.get_errno(), flush=True)
print("inventory done", flush=True)
import time; time.sleep(600)
"""

SETUID = r"""
import os
print("euid", os.geteuid(), "uid", os.getuid(), flush=True)
print("setuid done", flush=True)
import time; time.sleep(600)
"""

LINKED_DIRS = r"""
import os, sys
for d in ("/tmp", "/proc", "/dev"):
    try:
        with open(d + "/planted-by-image", "w") as f:
            f.write("escaped")
        print(d, "written", flush=True)
    except OSError as e:
        print(d, "refused", e.errno, flush=True)
print("linked done", flush=True)
import time; time.sleep(600)
"""

STUBBORN = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    while True:
        time.sleep(60)
print("never ready", flush=True)
while True:
    time.sleep(60)
"""


FORGED_LOG = r"""
import os
with open(os.environ["SPOTSTART_PROFILE_LOG"], "a") as log:
    log.write("/" + "x/" * 3000 + "y\n")  # longer than any path the kernel resolves
    log.write("/" + "app/" * 400_000 + "\n")  # endless components
    log.write("/app/../../../models/model.safetensors\n")  # above the root: clamped
print("forged done", flush=True)
import time; time.sleep(600)
"""


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    """A Python image root with the hostile scripts, under a path every user can traverse
    (the sandbox's user, nobody, must reach it)."""
    top = Path(tempfile.mkdtemp(prefix="spotstart-redteam-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        root = pyroot.build(top / "root")
        _add_ctypes_libraries(root)
        for name, text in (
            ("inherited.py", INHERITED),
            ("setuid.py", SETUID),
            ("linked.py", LINKED_DIRS),
            ("stubborn.py", STUBBORN),
            ("forged.py", FORGED_LOG),
        ):
            (root / "app" / name).write_text(text)
        yield root
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _add_ctypes_libraries(root: Path) -> None:
    """The shared libraries the image's _ctypes needs (libffi), which pyroot leaves out."""
    for ext in (root / "usr/lib").rglob("_ctypes*.so"):
        out = subprocess.run(["ldd", str(ext)], capture_output=True, text=True, check=False)
        for m in re.finditer(r"=> (/\S+)", out.stdout):
            lib = Path(m.group(1))
            for src in (lib, Path(os.path.realpath(lib))):
                dest = root / str(src).lstrip("/")
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest)


def _profile(root: Path, out: Path, ready: list[str], *command: str, **kw: object) -> object:
    args = ["image", "profile", "--rootfs", str(root), "-o", str(out), *ready, "--", *command]
    return run_cli(args, timeout_s=200, **kw)  # type: ignore[arg-type]


def _python_marker_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv[:1] == [b"/usr/bin/python3"] and marker.encode() in argv:
                    pids.append(int(entry.name))
    return pids


def test_the_command_inherits_only_its_stdio_no_host_environment_and_no_nested_userns(
    image_root: Path, tmp_path: Path
) -> None:
    """No descriptor of bwrap's, strace's or the profiler's reaches the command (each is a
    way out: a directory fd is a path to the host, bwrap's info pipe feeds the pid we
    kill), the environment is PATH and HOME (and bwrap's PWD), and a user namespace
    inside (whose root could remount) is refused."""
    out = tmp_path / "p"
    result = _profile(
        image_root,
        out,
        ["--ready-log", "inventory done"],
        "/usr/bin/python3",
        "/app/inherited.py",
        env={"AWS_SECRET_ACCESS_KEY": "host-secret"},
    )
    assert result.code == 0, result.stderr  # type: ignore[attr-defined]
    log = (out / "server.log").read_text()
    fds = {int(m.group(1)): m.group(2) for m in re.finditer(r"^fd (\d+) (\S+)", log, re.M)}
    assert set(fds) == {0, 1, 2}, log
    assert fds[0] == "/dev/null"
    env = re.search(r"^env (.*)$", log, re.M)
    assert env is not None and set(eval(env.group(1))) <= {"PATH", "HOME", "PWD"}, log
    assert "host-secret" not in log
    nested = re.search(r"nested userns: (-?\d+) (\d+)", log)
    assert nested is not None and nested.group(1) == "-1", log


@pytest.mark.skipif(os.geteuid() != 0, reason="an image's setuid-root file needs root to make")
def test_a_setuid_root_binary_in_the_image_gives_no_root(image_root: Path, tmp_path: Path) -> None:
    python = Path(os.path.realpath(image_root / "usr/bin/python3"))
    suid = image_root / "app" / "suid-python"
    shutil.copy2(python, suid)
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)
    out = tmp_path / "p"
    result = _profile(
        image_root, out, ["--ready-log", "setuid done"], "/app/suid-python", "/app/setuid.py"
    )
    assert result.code == 0, result.stderr  # type: ignore[attr-defined]
    log = (out / "server.log").read_text()
    ids = re.search(r"euid (\d+) uid (\d+)", log)
    assert ids is not None and ids.groups() != ("0", "0") and ids.group(1) != "0", log


def test_an_image_whose_tmp_proc_and_dev_are_links_out_of_it_reaches_nothing(
    image_root: Path, tmp_path: Path
) -> None:
    """/tmp, /proc and /dev as links to a host directory (absolute, and relative through
    ``../..``): never followed on the host to mount a tmpfs, procfs or devices there, and
    the command's writes through them go nowhere."""
    host_dir = Path(tempfile.mkdtemp(prefix="spotstart-redteam-host-", dir="/tmp"))
    linked = Path(tempfile.mkdtemp(prefix="spotstart-redteam-linked-", dir="/tmp"))
    try:
        os.chmod(host_dir, 0o777)
        os.chmod(linked, 0o755)
        root = linked / "root"
        shutil.copytree(image_root, root, symlinks=True)
        for d in ("tmp", "proc", "dev"):
            (root / d).rmdir()
        (root / "tmp").symlink_to(host_dir)
        (root / "proc").symlink_to("../" * 12 + str(host_dir).lstrip("/"))
        (root / "dev").symlink_to("/")
        out = tmp_path / "p"
        result = _profile(
            root, out, ["--ready-log", "linked done"], "/usr/bin/python3", "/app/linked.py"
        )
        assert result.code == 0, result.stderr  # type: ignore[attr-defined]
        log = (out / "server.log").read_text()
        assert "written" not in log, log
        assert list(host_dir.iterdir()) == []
        assert not Path("/planted-by-image").exists()
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)
        shutil.rmtree(linked, ignore_errors=True)


def test_a_command_that_ignores_sigterm_and_leaves_a_daemon_is_gone_after_the_timeout(
    image_root: Path, tmp_path: Path
) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    result = _profile(
        image_root,
        tmp_path / "p",
        ["--ready-log", "^ready$", "--timeout", "3"],
        "/usr/bin/python3",
        "/app/stubborn.py",
        marker,
    )
    left: list[int] = []
    try:
        assert result.code == 15, result.stderr  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while (left := _python_marker_processes(marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == [], "the command outlived the profile's timeout"
    finally:
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_without_bubblewrap_it_is_exit_2_and_never_runs_the_command_unsandboxed(
    image_root: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran-on-the-host"
    result = _profile(
        image_root,
        tmp_path / "p",
        ["--ready-log", "x", "--timeout", "5"],
        "/usr/bin/python3",
        "-c",
        f"open({str(marker)!r}, 'w')",
        env={"PATH": str(tmp_path / "no-tools-here")},
    )
    assert result.code == 2, result.stderr  # type: ignore[attr-defined]
    assert "bwrap" in error_line(result.stderr)  # type: ignore[attr-defined]
    assert not marker.exists()


def test_a_host_http_proxy_does_not_keep_the_probe_from_the_sandboxed_server(
    image_root: Path, tmp_path: Path
) -> None:
    """The probe ran urllib with the host's environment: an http_proxy (CI runners set
    one) sent every try to a proxy the sandbox's loopback-only network cannot reach, and the
    server was never seen ready (exit 15)."""
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "p"
    result = _profile(
        image_root,
        out,
        ["--ready-url", f"http://127.0.0.1:{port}/", "--timeout", "60"],
        "/usr/bin/python3",
        "/app/server.py",
        str(port),
        env={"http_proxy": dead, "HTTP_PROXY": dead, "all_proxy": dead},
    )
    assert result.code == 0, result.stderr  # type: ignore[attr-defined]
    assert (out / "profile.json").exists()


def test_a_trace_of_an_open_loop_is_parsed_in_bounded_memory(tmp_path: Path) -> None:
    """A command that opens a file in a loop until --timeout (300 s by default) writes a
    line per open: the trace was held whole as parsed tuples (~330 bytes a line, 1.5 GB of
    the profiler's memory for 300 s of one process). Now read twice as a stream: memory is
    the helpers' clones and the distinct files, not the lines."""
    root = tmp_path / "root"
    (root / "app").mkdir(parents=True)
    (root / "app" / "x.py").write_text("x")
    trace = tmp_path / "strace.txt"
    with open(trace, "w") as f:
        f.write('100 execve("/usr/bin/setpriv", ["setpriv"], 0x0 /* 0 vars */) = 0\n')
        f.write("100 clone3({flags=CLONE_NEWPID, exit_signal=SIGCHLD}, 88) = 101\n")
        f.write("101 clone(child_stack=NULL, flags=SIGCHLD) = 102\n")
        f.write('102 execve("/app/x.py", ["/app/x.py"], 0x0 /* 0 vars */) = 0\n')
        line = '102 openat(AT_FDCWD, "/app/x.py", O_RDONLY|O_CLOEXEC) = 3</app/x.py>\n'
        f.write(line * 100_000)
    tracemalloc.start()
    try:
        with contextlib.ExitStack() as opened:
            events = parse_strace(lambda: opened.enter_context(open(trace)), str(root))
            files = ordered_files(events, root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert files == ["/app/x.py"]
    assert peak < 8 << 20, f"{peak / 1e6:.0f} MB to parse {trace.stat().st_size / 1e6:.0f} MB"


def test_a_forged_audit_hook_log_is_judged_not_crashed_on(image_root: Path, tmp_path: Path) -> None:
    """The audit hook's log is whatever the command writes: a path longer than PATH_MAX
    raised ENAMETOOLONG out of resolve_in_root (exit 1), a path of 400,000 components took
    quadratic time; a path climbing above the root stays in it."""
    out = tmp_path / "p"
    result = _profile(
        image_root,
        out,
        ["--tracer", "audit-hook", "--ready-log", "forged done"],
        "/usr/bin/python3",
        "/app/forged.py",
    )
    assert result.code == 0, result.stderr  # type: ignore[attr-defined]
    files = [f["path"] for f in json.loads((out / "profile.json").read_text())["files"]]
    assert "/models/model.safetensors" in files
    assert all(len(f) < 4096 for f in files)


def test_a_file_name_with_a_line_break_adds_no_line_to_the_nydus_list() -> None:
    """The image chooses its file names: ``/app/x\\n/`` in the one-path-a-line Nydus list
    added a line ``/`` (prefetch everything)."""
    text = nydus_prefetch(["/app/a.py", "/app/x\n/", "/app/y\r", "/app/b.py"])
    assert text.splitlines() == ["/app/a.py", "/app/b.py"]
