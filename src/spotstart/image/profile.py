"""`spotstart image profile`: start a server from an unpacked image root in a sandbox
(``sandbox.py``: an unprivileged user namespace, ``pivot_root``, its own PID namespace), record
the files it reads in first-read order until it is ready, and write the prefetch lists
lazy-pulling snapshotters take (formats in ``prefetch.py``).

Tracing starts before the first exec (``strace -f`` wraps the sandbox helpers, so the
dynamic loader's reads are caught; the kernel's own reads of the executable and its ELF
interpreter are added from the execve). Only the sandboxed command's reads count: the
helpers' host reads are dropped. Without strace, Python servers are traced by an audit hook.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spotstart import safefs
from spotstart.errors import NotReady, UsageError
from spotstart.image import prefetch, rules, sandbox
from spotstart.image.tree import MergedTree

_LINE = re.compile(r"^(\d+) +(\w+)\((.*)\) += (-?\d+)(?:<(.*)>)?")
_FIRST_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class ProfileOptions:
    command: tuple[str, ...]
    out_dir: Path
    rootfs: Path | None = None
    image: str | None = None
    ready_url: str | None = None
    ready_log: str | None = None
    timeout_s: float = 300.0
    tracer: str = "auto"  # auto, strace, audit-hook
    # sandbox, or none: the command runs on the host as the caller (--unsafe-no-sandbox)
    isolation: str = "sandbox"
    share_network: bool = False  # the host's network instead of a loopback-only one
    env: tuple[tuple[str, str], ...] = ()  # the command's environment (no host variables)
    platform: str = "linux/amd64"


@dataclass(frozen=True)
class ProfiledFile:
    path: str  # absolute, in the image's terms
    bytes: int
    kind: str  # "code" or "weights"


@dataclass
class ProfileResult:
    files: list[ProfiledFile]
    tracer: str
    seconds_to_ready: float
    rootfs_bytes: int
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        code = [f for f in self.files if f.kind == "code"]
        weights = [f for f in self.files if f.kind == "weights"]
        read = sum(f.bytes for f in self.files)
        return {
            "tracer": self.tracer,
            "seconds_to_ready": self.seconds_to_ready,
            "files": len(self.files),
            "bytes_code": sum(f.bytes for f in code),
            "bytes_weights": sum(f.bytes for f in weights),
            "weight_files": len(weights),
            "bytes_read": read,
            "share_of_image": read / self.rootfs_bytes if self.rootfs_bytes else 0.0,
            "outputs": self.outputs,
            "warnings": self.warnings,
        }


# -- the trace --------------------------------------------------------------------------------


def _unescape(s: str) -> str:
    # strace prints non-printable bytes as \xNN and quotes as \"
    return (
        bytes(s, "utf-8")
        .decode("unicode_escape")
        .encode("latin-1")
        .decode("utf-8", "surrogateescape")
    )


def _joined(lines: Iterable[str]) -> Iterator[tuple[str, str, str, str, str | None]]:
    """``(pid, call, args, ret, decoded fd)`` per finished syscall; lines split by -f
    (``<unfinished ...>`` / ``resumed>``) are joined."""
    pending: dict[str, str] = {}
    for raw in lines:
        line = raw.rstrip("\n")
        m0 = re.match(r"^(\d+) +(.*)$", line)
        if not m0:
            continue
        pid, rest = m0.groups()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        resumed = re.match(r"^<\.\.\. \w+ resumed>(.*)$", rest)
        if resumed:
            rest = pending.pop(pid, "") + resumed.group(1)
        m = _LINE.match(f"{pid} {rest}")
        if m:
            yield m.group(1), m.group(2), m.group(3), m.group(4), m.group(5)


def _helper_pids(calls: Iterable[tuple[str, str, str, str, str | None]]) -> set[str]:
    """The pids of the sandbox's helpers (setpriv, bwrap and the PID namespace's init, which
    bwrap clones with CLONE_NEWPID): the first traced process and the children it and they
    clone, their pids as the tracer sees them. Every other pid in the trace is the
    sandboxed command or a process it started (the clones of the namespace's init and its
    descendants return pids of the new namespace, which mean nothing outside it, so they are
    never followed). Computed over the whole trace (a child's first line may precede its
    parent's clone result), keeping only the clones: a command that opens files in a loop
    for the whole --timeout writes millions of lines, and holding them cost ~330 bytes each
    (1.5 GB at 300 s)."""
    first: str | None = None
    clones: set[tuple[str, str, bool]] = set()  # (parent, child, with a new PID namespace)
    for pid, call, args, ret, _ in calls:
        if first is None:
            first = pid
        if call in ("clone", "clone3", "fork", "vfork") and ret.isdigit() and int(ret) > 0:
            clones.add((pid, ret, "CLONE_NEWPID" in args))
    if first is None:
        return set()
    helpers = {first}
    ns_init: set[str] = set()
    grew = True
    while grew:
        grew = False
        for pid, ret, newpid in clones:
            if pid in helpers and pid not in ns_init and ret not in helpers:
                helpers.add(ret)
                if newpid:
                    ns_init.add(ret)
                grew = True
    return helpers


def parse_strace(
    lines: Callable[[], Iterable[str]], root: str, sandboxed: bool = True
) -> Iterator[tuple[str, str]]:
    """``(kind, path)`` in trace order, absolute in the image's terms. ``kind``: ``open`` (a
    file opened for reading, from the fd strace decoded with -y), ``exec`` (a successful
    execve). Sandboxed, the command sees the image root as ``/`` (pivot_root), so strace
    decodes its paths in the image's terms already, and only the command's processes count
    (not :func:`_helper_pids`). Unsandboxed (``--unsafe-no-sandbox``), the paths under
    ``root`` count. ``lines()`` gives the trace's lines afresh: read twice as a stream (the
    helpers first), never held whole."""
    root = root.rstrip("/")
    helpers = _helper_pids(_joined(lines())) if sandboxed else set()
    for pid, call, args, ret, decoded in _joined(lines()):
        if sandboxed and pid in helpers:
            continue
        if call in ("open", "openat", "openat2") and decoded:
            flags = args.split(",")
            if any("O_WRONLY" in f for f in flags) or "O_DIRECTORY" in args:
                continue
            path = _unescape(decoded)
            if sandboxed:
                if path.startswith("/"):
                    yield "open", path
            elif path == root or path.startswith(root + "/"):
                yield "open", path[len(root) :] or "/"
        elif call in ("execve", "execveat") and ret == "0":
            s = _FIRST_STR.search(args)
            if not s:
                continue
            path = _unescape(s.group(1))
            if sandboxed:
                if path.startswith("/"):
                    yield "exec", path
            elif path.startswith(root + "/"):
                yield "exec", path[len(root) :]


_PATH_MAX = 4096  # Linux: no path the kernel resolves is longer, nor has more components


def resolve_in_root(root: Path, path: str) -> str | None:
    """``path`` with its symlinks followed as the image sees them (never above ``root``);
    None when it does not name a regular file there. The path comes from the traced
    command (the audit hook's log is whatever it wrote) and the links from the image: a
    path or a link target longer than the kernel resolves, or more than 40 links, names
    nothing (before, an over-long one raised ENAMETOOLONG: exit 1; a million components
    took quadratic time)."""
    if len(path) > _PATH_MAX:
        return None
    parts = deque(p for p in path.split("/") if p not in ("", "."))
    done: list[str] = []
    hops = 0
    try:
        while parts:
            seg = parts.popleft()
            if seg == "..":
                if done:
                    done.pop()
                continue
            host = root.joinpath(*done, seg)
            mode = os.lstat(host).st_mode  # missing: the kernel could not have opened it
            if stat.S_ISLNK(mode):
                hops += 1
                if hops > 40:
                    return None
                target = os.readlink(host)
                if target.startswith("/"):
                    done = []
                parts.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
                if len(parts) > _PATH_MAX:
                    return None
                continue
            if parts and not stat.S_ISDIR(mode):
                return None  # a file or nothing in the middle: the kernel stops there too
            done.append(seg)
        return "/" + "/".join(done) if done and stat.S_ISREG(mode) else None
    except OSError:  # ENAMETOOLONG, EACCES: no file the command could have read there
        return None


def elf_interpreter(path: Path) -> str | None:
    """PT_INTERP of an ELF executable (the dynamic loader the kernel maps, no open syscall)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF":
                return None
            is64, little = head[4] == 2, head[5] == 1
            e = "<" if little else ">"
            if is64:
                (phoff,) = struct.unpack(e + "Q", head[32:40])
                phentsize, phnum = struct.unpack(e + "HH", head[54:58])
            else:
                (phoff,) = struct.unpack(e + "I", head[28:32])
                phentsize, phnum = struct.unpack(e + "HH", head[42:46])
            for i in range(min(phnum, 64)):
                f.seek(phoff + i * phentsize)
                ph = f.read(phentsize)
                (p_type,) = struct.unpack(e + "I", ph[:4])
                if p_type != 3:
                    continue
                if is64:
                    (offset,) = struct.unpack(e + "Q", ph[8:16])
                    (size,) = struct.unpack(e + "Q", ph[32:40])
                else:
                    (offset,) = struct.unpack(e + "I", ph[4:8])
                    (size,) = struct.unpack(e + "I", ph[16:20])
                f.seek(offset)
                return f.read(min(size, 4096)).split(b"\0", 1)[0].decode("utf-8", "replace")
    except (OSError, struct.error):
        return None
    return None


def ordered_files(events: Iterable[tuple[str, str]], root: Path) -> list[str]:
    """First-read order, each file once, symlinks resolved; an exec brings its interpreter."""
    seen: dict[str, None] = {}
    # A command reopens the same files (a loop can for the whole timeout): each path's
    # lstats once, in a bounded memo (it may also open endless distinct names in /tmp).
    resolve = functools.lru_cache(maxsize=4096)(lambda p: resolve_in_root(root, p))
    for kind, path in events:
        real = resolve(path)
        if real is None:
            continue
        seen.setdefault(real, None)
        if kind == "exec":
            interp = elf_interpreter(root / real.lstrip("/"))
            if interp:
                real_interp = resolve_in_root(root, interp)
                if real_interp is not None:
                    seen.setdefault(real_interp, None)
    return list(seen)


# -- running the server -----------------------------------------------------------------------

_HOOK = r"""
import os, sys, threading, time
_log = open(os.environ["SPOTSTART_PROFILE_LOG"], "a", buffering=1)
def _hook(event, args):
    try:
        if event == "open" and args and isinstance(args[0], (str, bytes)):
            mode = args[1] if len(args) > 1 else "r"
            if mode is None or "w" not in str(mode) and "a" not in str(mode):
                _log.write(os.path.abspath(os.fsdecode(args[0])) + "\n")
        elif event == "os.exec" and args and isinstance(args[0], (str, bytes)):
            _log.write(os.fsdecode(args[0]) + "\n")
    except Exception:
        pass
sys.addaudithook(_hook)
_log.write(os.path.realpath(sys.executable) + "\n")
def _modules():
    known = set()
    while True:
        for m in list(sys.modules.values()):
            f = getattr(m, "__file__", None)
            if f and f not in known:
                known.add(f)
                if f.endswith(".so"):
                    _log.write(os.path.abspath(f) + "\n")
        time.sleep(0.05)
threading.Thread(target=_modules, daemon=True).start()
"""


@dataclass
class _Server:
    """The running command: its outermost process (strace or the sandbox's helpers), the
    sandbox's PID-namespace init once known, and the readiness probe inside its network."""

    proc: subprocess.Popen[bytes]
    init: sandbox.SandboxInit | None
    probe_inside: bool
    probe: subprocess.Popen[bytes] | None = None


class _LogWatch:
    """Matches --ready-log against the server's output as it grows, a bounded window at a
    time: the output is the image's to choose, and may be endless."""

    _WINDOW = 64 << 10

    def __init__(self, path: Path, pattern: str | None) -> None:
        self._path, self._offset, self._carry = path, 0, ""
        self._pattern = re.compile(pattern) if pattern else None

    def matched(self) -> bool:
        if self._pattern is None:
            return False
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                while data := f.read(self._WINDOW):
                    self._offset += len(data)
                    lines = (self._carry + data.decode("utf-8", "replace")).split("\n")
                    self._carry = lines.pop()[-self._WINDOW :]
                    if any(self._pattern.search(line) for line in lines):
                        return True
        except OSError:
            pass
        return False


def _tail(path: Path, n: int = 300) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4 * n))
            return f.read().decode("utf-8", "replace").strip()[-n:]
    except OSError:
        return ""


def _url_ready(url: str) -> bool:
    # A loopback URL never through the host's http_proxy: the proxy cannot see this host's
    # loopback, and the server would never be seen ready.
    host = urllib.parse.urlsplit(url).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if sandbox.is_loopback(host) else []
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=1.0) as r:
            return bool(200 <= r.status < 300)
    except (OSError, ValueError):
        return False


def _probe_ready(opts: ProfileOptions, server: _Server) -> bool:
    assert opts.ready_url is not None
    if not server.probe_inside:
        return _url_ready(opts.ready_url)
    if server.probe is None:
        assert server.init is not None
        pid = server.init.poll()
        if pid is None:
            return False
        server.probe = sandbox.start_probe(opts.ready_url, pid)
    code = server.probe.poll()
    if code is None:
        return False
    if code == 0:
        return True
    # The probe ends on its own only when it cannot enter the sandbox: gone already (the
    # server exited: reported as such below) or refused.
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.proc.wait(timeout=5)
    if server.proc.poll() is not None:
        return False
    err = server.probe.stderr.read(500).decode("utf-8", "replace") if server.probe.stderr else ""
    raise UsageError(
        f"--ready-url: the probe could not enter the sandbox's network: {err.strip()!r}"
    )


def _ready(opts: ProfileOptions, log_path: Path, server: _Server, start: float) -> float:
    watch = _LogWatch(log_path, opts.ready_log)
    deadline = start + opts.timeout_s
    while True:
        if server.init is not None:
            server.init.poll()
        if server.proc.poll() is not None:
            raise NotReady(
                f"the server exited with {server.proc.returncode} before it was ready; last "
                f"output: {_tail(log_path)!r}"
            )
        if watch.matched() or (opts.ready_url and _probe_ready(opts, server)):
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise NotReady(
                f"the server was not ready within {opts.timeout_s:g} s "
                f"({opts.ready_url or opts.ready_log}); raise --timeout"
            )
        time.sleep(0.05)


def _stop(server: _Server) -> None:
    """End every process the command started. Sandboxed: kill the PID namespace's init (the
    kernel then kills the whole namespace, setsid daemons included) and wait for the tracer
    to see them go; bwrap's helpers die with it (--die-with-parent). Unsandboxed, only the
    process group can be reached: a daemon that left it survives."""
    proc = server.proc
    if server.probe is not None:
        server.probe.kill()
        server.probe.wait()
    if server.init is not None:
        server.init.poll()
        if server.init.pid is not None:
            server.init.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        server.init.close()
    elif proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    # Whatever is left (bwrap before it started the sandbox, a stuck tracer, the unsandboxed
    # command's group): killing the outer bwrap kills the sandbox with it (--die-with-parent).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tracer(opts: ProfileOptions) -> str:
    if opts.tracer != "auto":
        if opts.tracer == "strace" and shutil.which("strace") is None:
            raise UsageError("--tracer strace: strace is not installed (apt-get install strace)")
        return opts.tracer
    return "strace" if shutil.which("strace") else "audit-hook"


def _read_hook_log(hook_dir: Path) -> list[str]:
    """The audit hook's log, written by the sandboxed command: it may have made it a link or
    a FIFO, or made it huge."""
    try:
        fd = os.open(hook_dir / "reads.txt", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        return f.read(64 << 20).decode("utf-8", "replace").splitlines()


def trace(opts: ProfileOptions, root: Path, work: Path) -> tuple[list[str], str, float]:
    tracer = _tracer(opts)
    sandboxed = opts.isolation != "none"
    if sandboxed:
        sandbox.check_tools(opts.share_network)
        if opts.ready_url:
            sandbox.check_ready_url(opts.ready_url, opts.share_network)
    command = list(opts.command)
    env = dict(opts.env)
    hook_dir: Path | None = None
    if tracer == "audit-hook":
        hook_dir = work / "hook"
        hook_dir.mkdir(mode=0o700)
        (hook_dir / "sitecustomize.py").write_text(_HOOK)
        inner = sandbox.HOOK_MOUNT if sandboxed else str(hook_dir)
        env["PYTHONPATH"] = inner + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
        env["SPOTSTART_PROFILE_LOG"] = inner + "/reads.txt"
    prefix: list[str] = []
    if tracer == "strace":
        trace_path = work / "strace.txt"
        prefix = [
            "strace",
            "-f",
            "-qq",
            "-z",
            "-y",
            "-s",
            "4096",
            "-e",
            "signal=none",
            "-e",
            "trace=open,openat,openat2,execve,execveat,clone,clone3,fork,vfork",
            "-o",
            str(trace_path),
            "--",
        ]
    seconds = _run(opts, prefix, command, env, root, work, hook_dir)
    if tracer == "strace":
        with contextlib.ExitStack() as files:

            def lines() -> Iterable[str]:
                return files.enter_context(open(trace_path, errors="replace"))

            events = parse_strace(lines, str(root), sandboxed)
            return ordered_files(events, root), tracer, seconds
    assert hook_dir is not None
    reads = _read_hook_log(hook_dir)
    root_prefix = str(root).rstrip("/")
    hook_events = []
    for p in reads:
        if sandboxed:
            hook_events.append(("open", p))
        elif p.startswith(root_prefix + "/"):
            hook_events.append(("open", p[len(root_prefix) :]))
    return ordered_files(hook_events, root), tracer, seconds


def _run(
    opts: ProfileOptions,
    prefix: list[str],
    command: list[str],
    env: dict[str, str],
    root: Path,
    work: Path,
    hook_dir: Path | None,
) -> float:
    """Start the command (in its sandbox, under the tracer's ``prefix``), wait until it is
    ready, and end it with everything it started."""
    log_path = work / "server.log"
    start = time.monotonic()
    fds: list[int] = []
    try:
        init: sandbox.SandboxInit | None = None
        if opts.isolation == "none":
            argv = [*prefix, *command]
            popen_env = {**os.environ, **env}
        else:
            mount_point = sandbox.prepare_work(work, hook_dir)
            spec = sandbox.SandboxSpec(root, mount_point, env, hook_dir, opts.share_network)
            info_read, info_write = os.pipe()
            init = sandbox.SandboxInit(info_read)
            fds.append(info_write)
            argv = [*prefix, *sandbox.wrap(command, spec, info_write)]
            # the helpers' own environment; the command's is the spec's alone (--clearenv)
            popen_env = dict(os.environ)
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=popen_env,
                    start_new_session=True,
                    pass_fds=fds,
                    cwd=root if opts.isolation == "none" else None,
                    preexec_fn=sandbox.dies_with_caller() if init and prefix else None,
                )
            except FileNotFoundError as exc:
                if init is not None:
                    init.close()
                raise UsageError(f"cannot start {argv[0]}: {exc}") from None
    finally:
        for fd in fds:
            os.close(fd)
    probe_inside = init is not None and not opts.share_network
    server = _Server(proc, init, probe_inside)
    try:
        return _ready(opts, log_path, server, start)
    finally:
        _stop(server)


def _rootfs_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                with contextlib.suppress(OSError):
                    total += os.path.getsize(p)
    return total


def _unpack(facts: _ImageFacts, work: Path, platform: str) -> Path:
    """`--image`: skopeo copies it to an OCI layout, umoci unpacks it rootless."""
    for tool in ("skopeo", "umoci"):
        if shutil.which(tool) is None:
            raise UsageError(
                f"--image needs {tool} (apt-get install skopeo umoci); or unpack it "
                "yourself and pass --rootfs"
            )
    src = facts.transport
    layout = work / "oci"
    os_, _, arch = platform.partition("/")
    out = subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--insecure-policy",
            *(["--src-tls-verify=false"] if facts.plain_http else []),
            "--override-os",
            os_,
            "--override-arch",
            arch.split("/")[0],
            src,
            f"oci:{layout}:profile",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise UsageError(f"--image {src}: skopeo could not read it: {out.stderr.strip()[-300:]}")
    bundle = work / "bundle"
    out = subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:profile", str(bundle)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise UsageError(f"--image {src}: umoci could not unpack it: {out.stderr.strip()[-300:]}")
    return bundle / "rootfs"


def run_profile(opts: ProfileOptions) -> ProfileResult:
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    facts = _read_image(opts) if opts.image is not None else None
    with tempfile.TemporaryDirectory(prefix="spotstart-profile-") as tmp:
        work = Path(tmp)
        if opts.rootfs is not None:
            root = opts.rootfs.resolve()
            if not root.is_dir():
                raise UsageError(f"--rootfs {opts.rootfs}: not a directory")
        else:
            assert facts is not None
            root = _unpack(facts, work, opts.platform)
        paths, tracer, seconds = trace(opts, root, work)
        # The profiled command could swap its log for a link: read it with none followed,
        # write it with none followed at the output's name (spotstart.safefs).
        with os.fdopen(safefs.open_beneath(work, "server.log"), "rb") as log:
            safefs.write_output(opts.out_dir / "server.log", log)
        files = []
        for p in paths:
            size = (root / p.lstrip("/")).stat().st_size
            kind = "weights" if rules.is_weight_file(p, size) else "code"
            files.append(ProfiledFile(p, size, kind))
        result = ProfileResult(files, tracer, seconds, _rootfs_bytes(root))
    result.outputs = prefetch.write_all(opts.out_dir, result.files)
    if facts is not None:
        code = [f.path for f in result.files if f.kind == "code"]
        result.warnings += prefetch.check_against_image(code, facts.tree, facts.layer_bytes)
    else:
        result.warnings.append(
            "profiled from --rootfs only: give --image too for the checks against the image "
            "(missing paths, SOCI's zTOC minimum and order)"
        )
    if not any(f.kind == "code" for f in result.files):
        result.warnings.append("no code or library file was recorded: was the command traced?")
    weights = [f for f in result.files if f.kind == "weights"]
    if weights:
        result.warnings.append(
            f"{len(weights)} weight files ({sum(f.bytes for f in weights)} bytes) were read from "
            "the image: they are left out of the prefetch lists; fetch them at start with "
            "`spotstart fetch` instead of shipping them in a layer"
        )
    safefs.write_output(
        opts.out_dir / "profile.json", json.dumps(_profile_doc(opts, result), indent=2) + "\n"
    )
    return result


@dataclass(frozen=True)
class _ImageFacts:
    """What `--image` tells the profile: its tree and layer sizes (for the checks) and how
    skopeo names it (to unpack it). Read once, before the server runs."""

    tree: MergedTree
    layer_bytes: list[int]
    transport: str
    plain_http: bool


def _read_image(opts: ProfileOptions) -> _ImageFacts:
    from spotstart.image.audit import AuditOptions, compressed_sizes, open_image, scan
    from spotstart.image.oci import Platform

    assert opts.image is not None
    with open_image(opts.image, AuditOptions(platform=Platform.parse(opts.platform))) as image:
        tree, stats, _ = scan(image)
        sizes = [
            c if c is not None else st.bytes_uncompressed
            for c, st in zip(compressed_sizes(image, stats), stats, strict=True)
        ]
        host = image.transport.removeprefix("docker://").split("/", 1)[0]
        local = image.kind == "registry" and host.split(":")[0] in ("127.0.0.1", "localhost")
        return _ImageFacts(tree, sizes, image.transport, local)


def _profile_doc(opts: ProfileOptions, result: ProfileResult) -> dict[str, object]:
    return {
        "command": list(opts.command),
        **result.summary(),
        "files": [{"path": f.path, "bytes": f.bytes, "kind": f.kind} for f in result.files],
    }
