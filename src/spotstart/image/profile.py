"""`spotstart image profile`: start a server from an unpacked image root without privileges,
record the files it reads in first-read order until it is ready, and write the prefetch lists
lazy-pulling snapshotters take (formats in ``prefetch.py``).

Tracing starts before the first exec (``strace -f`` wraps the isolation helpers, so the
dynamic loader's reads are caught; the kernel's own reads of the executable and its ELF
interpreter are added from the execve). Only paths inside the root count: the helpers' host
reads are dropped. Without strace, Python servers are traced by an audit hook instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spotstart.errors import NotReady, UsageError
from spotstart.image import prefetch, rules
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
    isolation: str = "auto"  # auto, chroot, userns, none
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


def parse_strace(lines: Iterable[str], root: str) -> Iterator[tuple[str, str]]:
    """``(kind, path)`` in trace order, paths inside ``root`` made absolute in the image's
    terms. ``kind``: ``open`` (a file opened for reading, from the fd strace decoded with
    -y), ``exec`` (an execve after the process chrooted into ``root``, or any execve of a
    path under it). Lines split by -f (``<unfinished ...>`` / ``resumed>``) are joined."""
    root = root.rstrip("/")
    pending: dict[str, str] = {}
    inside: set[str] = set()
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
        if not m:
            continue
        _, call, args, ret, decoded = m.groups()
        if call in ("clone", "clone3", "fork", "vfork") and int(ret) > 0 and pid in inside:
            inside.add(ret)
        elif call == "chroot" and ret == "0":
            s = _FIRST_STR.search(args)
            if s and os.path.realpath(_unescape(s.group(1))) == os.path.realpath(root):
                inside.add(pid)
        elif call in ("open", "openat", "openat2") and decoded:
            flags = args.split(",")
            if any("O_WRONLY" in f for f in flags) or "O_DIRECTORY" in args:
                continue
            host = _unescape(decoded)
            if host == root or host.startswith(root + "/"):
                yield "open", host[len(root) :] or "/"
        elif call in ("execve", "execveat") and ret == "0":
            s = _FIRST_STR.search(args)
            if not s:
                continue
            path = _unescape(s.group(1))
            if pid in inside and path.startswith("/"):
                yield "exec", path
            elif path.startswith(root + "/"):
                yield "exec", path[len(root) :]


def resolve_in_root(root: Path, path: str) -> str | None:
    """``path`` with its symlinks followed as the image sees them (never above ``root``);
    None when it does not name a regular file there."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while parts:
        seg = parts.pop(0)
        if seg == "..":
            if done:
                done.pop()
            continue
        host = root.joinpath(*done, seg)
        if host.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(host)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(seg)
    final = root.joinpath(*done)
    return "/" + "/".join(done) if final.is_file() else None


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
    for kind, path in events:
        real = resolve_in_root(root, path)
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


def _isolation(opts: ProfileOptions, root: Path) -> str:
    if opts.isolation != "auto":
        return opts.isolation
    return "chroot" if os.geteuid() == 0 else "userns"


def _wrap(command: list[str], root: Path, isolation: str) -> list[str]:
    if isolation == "none":
        return command
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if isolation == "userns":
        unshare[1:1] = ["--user", "--map-root-user"]
    # /dev, /proc and /sys of the host, bound into the root in a private mount namespace
    # (gone when the server is), so a server finds /dev/null and /proc/self.
    script = (
        'for d in dev proc sys; do [ -d "$0/$d" ] && mount --rbind "/$d" "$0/$d" 2>/dev/null; '
        'done; exec chroot "$0" "$@"'
    )
    return [*unshare, "--", "/bin/sh", "-c", script, str(root), *command]


def _ready(
    opts: ProfileOptions, log_path: Path, proc: subprocess.Popen[bytes], start: float
) -> float:
    pattern = re.compile(opts.ready_log) if opts.ready_log else None
    deadline = start + opts.timeout_s
    while True:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
            raise NotReady(
                f"the server exited with {proc.returncode} before it was ready; last output: "
                f"{tail.strip()[-300:]!r}"
            )
        if (
            pattern is not None
            and log_path.exists()
            and pattern.search(log_path.read_text(errors="replace"))
        ):
            return time.monotonic() - start
        if opts.ready_url:
            try:
                with urllib.request.urlopen(opts.ready_url, timeout=1.0) as r:
                    if 200 <= r.status < 300:
                        return time.monotonic() - start
            except (OSError, ValueError):
                pass
        if time.monotonic() > deadline:
            raise NotReady(
                f"the server was not ready within {opts.timeout_s:g} s "
                f"({opts.ready_url or opts.ready_log}); raise --timeout"
            )
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers the server left in its group


def _tracer(opts: ProfileOptions) -> str:
    if opts.tracer != "auto":
        if opts.tracer == "strace" and shutil.which("strace") is None:
            raise UsageError("--tracer strace: strace is not installed (apt-get install strace)")
        return opts.tracer
    return "strace" if shutil.which("strace") else "audit-hook"


def trace(opts: ProfileOptions, root: Path, work: Path) -> tuple[list[str], str, float]:
    tracer = _tracer(opts)
    isolation = _isolation(opts, root)
    command = list(opts.command)
    env = dict(os.environ)
    log_path = work / "server.log"
    hook_dir: Path | None = None
    if tracer == "strace":
        trace_path = work / "strace.txt"
        argv = [
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
            "trace=open,openat,openat2,execve,execveat,chroot,clone,clone3,fork,vfork",
            "-o",
            str(trace_path),
            "--",
            *_wrap(command, root, isolation),
        ]
    else:
        # The hook lives inside the root for the run (a chroot sees nothing else), under a
        # name no image uses, and is removed after.
        hook_dir = Path(tempfile.mkdtemp(prefix=".spotstart-hook-", dir=root))
        (hook_dir / "sitecustomize.py").write_text(_HOOK)
        inner = "/" + hook_dir.name if isolation != "none" else str(hook_dir)
        env["PYTHONPATH"] = inner + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        env["SPOTSTART_PROFILE_LOG"] = inner + "/reads.txt"
        argv = _wrap(command, root, isolation)
    try:
        seconds = _run(opts, argv, env, root, isolation, log_path)
        if tracer == "strace":
            with open(trace_path, errors="replace") as f:
                return ordered_files(parse_strace(f, str(root)), root), tracer, seconds
        assert hook_dir is not None
        reads_file = hook_dir / "reads.txt"
        reads = reads_file.read_text(errors="replace").splitlines() if reads_file.exists() else []
    finally:
        if hook_dir is not None:
            shutil.rmtree(hook_dir, ignore_errors=True)
    prefix = str(root).rstrip("/")
    events = []
    for p in reads:
        if isolation != "none":
            events.append(("open", p))
        elif p.startswith(prefix + "/"):
            events.append(("open", p[len(prefix) :]))
    hook_name = "/" + hook_dir.name
    return [f for f in ordered_files(events, root) if not f.startswith(hook_name)], tracer, seconds


def _run(
    opts: ProfileOptions,
    argv: list[str],
    env: dict[str, str],
    root: Path,
    isolation: str,
    log_path: Path,
) -> float:
    start = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                cwd=root if isolation == "none" else None,
            )
        except FileNotFoundError as exc:
            raise UsageError(f"cannot start {argv[0]}: {exc}") from None
        try:
            return _ready(opts, log_path, proc, start)
        finally:
            _stop(proc)


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
        shutil.copy(work / "server.log", opts.out_dir / "server.log")
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
    (opts.out_dir / "profile.json").write_text(
        json.dumps(_profile_doc(opts, result), indent=2) + "\n"
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
