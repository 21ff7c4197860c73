"""The sandbox `image profile` runs an image's command in, built for images nobody here wrote:
bubblewrap started as an unprivileged user (``nobody`` when the caller is root), new user,
mount, PID, IPC, UTS and (by default) network namespaces, ``pivot_root`` into the image root
(bound read-only, the old root detached), no capabilities, no new privileges, a cleared
environment. Killing the PID namespace's init ends every process the command started.

Not a container runtime: no seccomp filter, no resource limits, no image config (USER, ENV).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from spotstart.errors import UsageError

# The outside uid/gid a root caller's sandbox runs as. The kernel keeps the user namespace's
# ids mapped onto it, so nothing the command does inside (a chroot escape, a setuid binary,
# a nested namespace) acts on the host as more than nobody.
SANDBOX_UID = 65534
SANDBOX_GID = 65534
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where a writable host directory (the audit hook's) appears: inside the sandbox's own /tmp.
HOOK_MOUNT = "/tmp/.spotstart-hook"

# The readiness probe, run inside the sandbox's network namespace (by nsenter, as the
# sandbox's user): exits 0 once the URL answers 2xx, the profiler kills it otherwise. No
# proxy: the namespace has only loopback, so a host's http_proxy (CI runners set one) would
# take every try to a proxy it cannot reach and the server would never be seen ready. The
# probe is started with an empty environment (the host's secrets stay out of it).
_PROBE = r"""
import sys, time, urllib.request
url = sys.argv[1]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while True:
    try:
        with opener.open(url, timeout=1.0) as r:
            if 200 <= r.status < 300:
                sys.exit(0)
    except (OSError, ValueError):
        pass
    time.sleep(0.05)
"""


@dataclass(frozen=True)
class SandboxSpec:
    """How the command is run: its root; an empty directory of the profile's own that a root
    caller binds the root onto, in a mount namespace of the helpers' own (bwrap resolves a
    bind's source by path as the sandbox's user, and the root's own path may pass through
    directories closed to others: /root, pytest's temp dirs); the command's environment; a
    host directory the audit hook writes to; whether the host's network is shared."""

    root: Path
    mount_point: Path
    env: Mapping[str, str] = field(default_factory=dict)
    hook_dir: Path | None = None
    share_network: bool = False


def drop_to() -> tuple[int, int] | None:
    """The (uid, gid) the sandbox is started as, when it must differ from the caller's."""
    return (SANDBOX_UID, SANDBOX_GID) if os.geteuid() == 0 else None


def _tool(name: str) -> str:
    # Absolute paths, found once: the helpers start with the caller's PATH.
    path = shutil.which(name)
    if path is None:
        package = {"bwrap": "bubblewrap", "sh": "dash"}.get(name, "util-linux")
        raise UsageError(f"image profile: the sandbox needs {name} (apt-get install {package})")
    return os.path.realpath(path)


def check_tools(share_network: bool) -> None:
    needed = ["bwrap"]
    if drop_to() is not None:
        needed += ["setpriv", "unshare", "mount", "sh"]
    if not share_network:
        needed.append("nsenter")
    for tool in needed:
        _tool(tool)


def check_reachable(work: Path) -> None:
    """A root caller's sandbox user must reach the profile's work directory by path."""
    if drop_to() is None:
        return
    for d in work.parents:
        if not os.stat(d).st_mode & 0o001:
            raise UsageError(
                f"image profile: {d} is closed to other users, so the sandbox's user (nobody) "
                f"cannot reach the work directory {work}; set TMPDIR to a directory others "
                "may traverse (e.g. /tmp)"
            )


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ready_url(url: str, share_network: bool) -> None:
    """In its own network namespace the server is reachable on loopback only."""
    if share_network:
        return
    if not is_loopback(urllib.parse.urlsplit(url).hostname or ""):
        raise UsageError(
            f"--ready-url {url}: the sandbox has only a loopback network; give a 127.0.0.1 "
            "URL, or --share-host-network for a server that must reach the network"
        )


def _is_dir(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return stat.S_ISDIR(os.lstat(path).st_mode)
    return False


def wrap(command: list[str], spec: SandboxSpec, info_fd: int) -> list[str]:
    """The argv that runs ``command`` in the sandbox; bwrap writes its init's pid to
    ``info_fd``. The root is bound read-only: mount points must exist in the image, so
    /dev, /proc and /tmp are mounted only where the image has them as directories (not
    links: those would be followed inside the sandbox, never on the host)."""
    argv: list[str] = []
    root = spec.root
    ids = drop_to()
    if ids is not None:
        uid, gid = ids
        bind = f'{shlex.quote(_tool("mount"))} --bind -- "$0" "$1" && shift && exec "$@"'
        argv += [_tool("unshare"), "--mount", "--propagation", "private", "--"]
        argv += [_tool("sh"), "-c", bind, str(spec.root), str(spec.mount_point)]
        argv += [_tool("setpriv"), f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        root = spec.mount_point
    argv += [
        _tool("bwrap"),
        "--unshare-user",
        "--disable-userns",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        *([] if spec.share_network else ["--unshare-net"]),
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--info-fd",
        str(info_fd),
        "--ro-bind",
        str(root),
        "/",
    ]
    if _is_dir(spec.root / "dev"):
        argv += ["--dev", "/dev"]
    if _is_dir(spec.root / "proc"):
        argv += ["--proc", "/proc"]
    if _is_dir(spec.root / "tmp"):
        argv += ["--tmpfs", "/tmp"]
        if spec.hook_dir is not None:
            argv += ["--bind", str(spec.hook_dir), HOOK_MOUNT]
    elif spec.hook_dir is not None:
        raise UsageError(
            "--tracer audit-hook: the image has no /tmp directory for the hook; use strace"
        )
    argv += ["--clearenv", "--setenv", "PATH", SANDBOX_PATH, "--setenv", "HOME", "/"]
    for key, value in spec.env.items():
        argv += ["--setenv", key, value]
    return [*argv, "--chdir", "/", "--", *command]


def prepare_work(work: Path, hook_dir: Path | None) -> Path:
    """The empty mount point a root caller binds the root onto, under ``work`` (opened to
    traversal, not listing); the audit hook's directory is made the sandbox user's."""
    mount_point = work / "root"
    mount_point.mkdir(mode=0o755)
    ids = drop_to()
    if ids is not None:
        check_reachable(work)
        os.chmod(work, 0o711)
        if hook_dir is not None:
            os.chown(hook_dir, *ids)
    return mount_point


def dies_with_caller() -> Callable[[], None]:
    """A ``preexec_fn`` for the tracer that wraps the sandbox: SIGKILL when the caller dies
    (killed, or ended by a signal it does not handle). bwrap dies with its parent
    (--die-with-parent), and the sandbox with bwrap; without this a tracer whose caller is
    gone keeps the sandbox running."""
    caller = os.getpid()

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != caller:
            os._exit(127)

    return preexec


_PR_SET_PDEATHSIG = 1


class SandboxInit:
    """The sandbox's PID-namespace init, learnt from bwrap's info fd; killing it makes the
    kernel kill every process in the namespace, daemons that left the session included."""

    def __init__(self, info_read_fd: int) -> None:
        self._fd: int | None = info_read_fd
        os.set_blocking(info_read_fd, False)
        self._buf = b""
        self.pid: int | None = None
        self._pidfd: int | None = None

    def poll(self) -> int | None:
        """The init's pid once bwrap has told it (non-blocking)."""
        if self.pid is not None or self._fd is None:
            return self.pid
        try:
            chunk = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        if not chunk:  # bwrap exited before it started the sandbox
            self.close()
            return None
        self._buf += chunk
        if len(self._buf) > 65536:
            self.close()
            return None
        with contextlib.suppress(ValueError):
            pid = json.loads(self._buf).get("child-pid")
            if isinstance(pid, int) and pid > 1:
                # A pidfd: the signal reaches this process, never a later one with its pid.
                with contextlib.suppress(OSError):
                    self._pidfd = os.pidfd_open(pid)
                self.pid = pid
                self.close()
        return self.pid

    def kill(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            os.close(self._pidfd)
            self._pidfd = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def start_probe(url: str, init_pid: int) -> subprocess.Popen[bytes]:
    """The readiness probe, in the sandbox's network namespace, as the sandbox's user: a root
    caller enters the network alone and drops to nobody before the probe starts; any other
    caller enters the user namespace it owns first, for the right to enter its network."""
    enter = [_tool("nsenter"), "--target", str(init_pid)]
    ids = drop_to()
    if ids is None:
        enter += ["--user", "--net", "--preserve-credentials", "--"]
    else:
        enter += ["--net", "--", _tool("setpriv"), f"--reuid={ids[0]}", f"--regid={ids[1]}"]
        enter += ["--clear-groups", "--"]
    return subprocess.Popen(
        [*enter, sys.executable, "-I", "-S", "-c", _PROBE, url],
        env={},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
