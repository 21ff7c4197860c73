"""Red-team attacks on the files spotstart writes where others can write: names no file can
hold (a NUL, an unencodable surrogate) given to safefs, an index and files planted in DEST by
another user, a part file that is a hard link to a file outside DEST, a predictable temporary
name at ``manifest --out``, and a directory swapped for a link in a tight loop while fetch
runs. Each runs with both of safefs's resolvers where it reaches safefs.

The planted files belong to uid 65534 (chown, as root in CI): an attacker is another user."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart import FetchConfig, fetch, safefs
from spotstart.errors import LocalIOError, UnsafePath
from spotstart.fetch import NullProgress
from spotstart.fetch.config import Concurrency
from spotstart.fetch.journal import JournalHeader, PartFile
from tests.conftest import error_line, isolated_environ, run_cli
from tests.test_safefs import resolver  # noqa: F401 - the fixture both resolvers run under

MiB = 1 << 20
SMALL = FetchConfig(chunk_bytes=MiB)
STRANGER = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's files needs root")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    s = tmp_path / "src"
    (s / "sub").mkdir(parents=True)
    (s / "m.safetensors").write_bytes(os.urandom(2 * MiB + 5))
    (s / "sub" / "extra.bin").write_bytes(os.urandom(1000))
    return s


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "outside"
    o.mkdir()
    (o / "victim").write_bytes(b"precious" * 1000)
    return o


def _same(a: Path, b: Path) -> bool:
    return hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


# -- names no file can hold ------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["m.safetensors\x00.evil", "a\x00/b", "\ud800", "sub/\udfff"])
def test_a_name_no_file_can_hold_is_an_oserror_with_either_resolver(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    rel: str,
) -> None:
    """A NUL went through openat2 cut short (``"m.safetensors\\0.evil"`` opened
    ``m.safetensors``, another file than the one named) and through the walk as a
    ValueError (exit 1 for a caller that handles OSError); a lone surrogate the same."""
    (tmp_path / "m.safetensors").write_bytes(b"weights")
    (tmp_path / "a").mkdir()
    (tmp_path / "sub").mkdir()
    for call in (
        lambda: safefs.open_beneath(tmp_path, rel),
        lambda: safefs.create_exclusive(tmp_path, rel),
        lambda: safefs.makedirs_beneath(tmp_path, rel),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EINVAL


# -- an index and files planted in DEST by another user ---------------------------------------


def _index_of_a_real_fetch(src: Path, tmp_path: Path) -> dict[str, dict[str, object]]:
    honest = tmp_path / "honest"
    fetch(str(src), honest, SMALL)
    files = json.loads((honest / ".spotstart" / "index.json").read_text())["files"]
    assert isinstance(files, dict)
    return files


@as_root
def test_an_index_planted_by_another_user_is_never_believed(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    src: Path,
) -> None:
    """DEST is another user's (``/tmp/models`` made by them first): they write
    ``.spotstart/index.json`` naming the object versions and their own files of the same
    sizes and mtimes. Before, fetch took every file as cached and exited 0 with their bytes
    (no file finished, so the index was never saved, where the directory was refused)."""
    entries = _index_of_a_real_fetch(src, tmp_path)
    dest = tmp_path / "dest"
    (dest / ".spotstart").mkdir(parents=True)
    (dest / "sub").mkdir()
    for rel, entry in entries.items():
        forged = dest / rel
        forged.write_bytes(b"\xee" * int(str(entry["size"])))
        mtime_ns = int(str(entry["mtime_ns"]))
        os.utime(forged, ns=(mtime_ns, mtime_ns))
    (dest / ".spotstart" / "index.json").write_text(json.dumps({"version": 1, "files": entries}))
    for p in [dest, *dest.rglob("*")]:
        os.chown(p, STRANGER, STRANGER, follow_symlinks=False)
    with pytest.raises(UnsafePath, match="not by us"):
        fetch(str(src), dest, SMALL)


@as_root
def test_a_file_another_user_put_at_a_cached_name_is_fetched_again(
    tmp_path: Path, src: Path
) -> None:
    """Our own index and state directory, but a model subdirectory another user can write:
    they swap the file for theirs with the same size and mtime. Before, the rerun took it
    as the cached file (size and mtime matched) and exit 0 with their bytes."""
    dest = tmp_path / "dest"
    fetch(str(src), dest, SMALL)
    final = dest / "sub" / "extra.bin"
    st = final.stat()
    os.chown(dest / "sub", STRANGER, STRANGER)  # the subdirectory is theirs
    forged = dest / "sub" / ".forged"
    forged.write_bytes(b"\xee" * st.st_size)
    os.chown(forged, STRANGER, STRANGER)
    os.utime(forged, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(forged, final)
    report = fetch(str(src), dest, SMALL)
    assert _same(final, src / "sub" / "extra.bin")
    assert final.stat().st_uid == os.geteuid()
    assert report.files_fetched >= 1


# -- a resumed part file that is a hard link ---------------------------------------------------


@pytest.mark.parametrize("linked", ["part", "journal"])
def test_a_part_file_that_is_a_hard_link_is_never_resumed_into(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    outside: Path,
    linked: str,
) -> None:
    """A resume opens the part file O_RDWR and writes the missing chunks into it: where the
    part file is a hard link (to a file outside DEST of the object's size, beside a journal
    that matches), those writes landed in the other file. Now a part file with another
    link, or not ours, is started afresh."""
    size = 3 * MiB
    header = JournalHeader(source="file:///x", size=size, version="v1", chunk_bytes=MiB)
    final = tmp_path / "dest" / "m.safetensors"
    first = PartFile(final, header, fsync=False)
    assert first.open() == {}
    first.close()  # an interrupted run: a part file and a journal holding the header
    victim = outside / "victim"
    name = first.part if linked == "part" else first.journal_path
    # the victim holds what the name held: the journal's header, or the part's size
    victim.write_bytes(name.read_bytes() + b"0 0badf00d\n" * (linked == "journal"))
    before = victim.read_bytes()
    os.unlink(name)
    os.link(victim, name)
    again = PartFile(final, header, fsync=False)
    assert again.open() == {}
    os.pwrite(again.fd, b"chunk", 0)
    again.commit({1: 0x1234})
    again.close()
    assert victim.read_bytes() == before
    assert os.stat(name).st_nlink == 1


# -- manifest --out beside a predictable temporary name --------------------------------------


def test_manifest_out_is_not_stopped_by_a_name_planted_at_its_temporary(
    tmp_path: Path, src: Path
) -> None:
    """``manifest --out`` wrote through ``.NAME.<pid>.tmp`` (pid guessable): another user
    who planted that name (here every pid a short run could have) made it fail."""
    out_dir = tmp_path / "shared"
    out_dir.mkdir()
    out = out_dir / "m.manifest.json"
    result = run_cli(["manifest", f"file://{src}/", "--out", str(out)])
    assert result.code == 0, result.stderr
    assert json.loads(out.read_bytes())
    # the same again with every name the old scheme could pick for a nearby pid planted
    out.unlink()
    first = os.getpid()
    for pid in range(first, first + 400):
        os.symlink(tmp_path / "outside-never", out_dir / f".{out.name}.{pid}.tmp")
    result = run_cli(["manifest", f"file://{src}/", "--out", str(out)])
    assert result.code == 0, error_line(result.stderr)
    assert json.loads(out.read_bytes())
    assert not (tmp_path / "outside-never").exists()


# -- a directory swapped for a link while fetch runs ----------------------------------------


def _exchange(dirfd: int, a: str, b: str) -> None:
    """renameat2(RENAME_EXCHANGE): ``a`` and ``b`` trade places atomically."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(dirfd, a.encode(), dirfd, b.encode(), 2) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def _swapping(parent: Path, name: str, target: Path) -> Iterator[list[int]]:
    """A thread that swaps ``parent/name`` (a directory) with a link to ``target`` as fast
    as it can until the block ends; yields a list holding the number of swaps."""
    os.symlink(target, parent / f".{name}.link")
    stop = threading.Event()
    swaps = [0]
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)

    def run() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                _exchange(fd, name, f".{name}.link")
                swaps[0] += 1

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield swaps
    finally:
        stop.set()
        t.join()
        # leave the directory at its name
        if (parent / name).is_symlink():
            _exchange(fd, name, f".{name}.link")
        os.close(fd)


@pytest.mark.parametrize("where", ["sub", ".spotstart", ".spotstart/parts"])
def test_a_directory_swapped_with_a_link_in_a_loop_never_lets_a_byte_out(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    src: Path,
    outside: Path,
    where: str,
) -> None:
    """Every directory fetch writes beneath, traded with a link to a directory outside
    DEST by renameat2(RENAME_EXCHANGE) in a tight loop while fetch runs (bounded: 25 runs,
    or 20 s): each run either finishes with the right bytes or stops with one of our
    errors; nothing ever appears outside."""
    dest = tmp_path / "dest"
    fetch(str(src), dest, SMALL)  # every directory exists
    swapped = dest / where
    deadline = time.monotonic() + 20
    outcomes: dict[str, int] = {}
    with _swapping(swapped.parent, swapped.name, outside) as swaps:
        for _ in range(25):
            for rel in ("m.safetensors", "sub/extra.bin"):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    os.unlink(dest / rel)
            try:
                fetch(str(src), dest, SMALL)
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except (UnsafePath, LocalIOError) as exc:
                name = type(exc).__name__
                outcomes[name] = outcomes.get(name, 0) + 1
            assert sorted(p.name for p in outside.iterdir()) == ["victim"], outcomes
            if time.monotonic() > deadline:
                break
    assert swaps[0] > 0
    assert (outside / "victim").read_bytes() == b"precious" * 1000


# -- object names that are markup or terminal control -----------------------------------------


def test_object_names_that_are_markup_or_control_codes_are_shown_as_text(tmp_path: Path) -> None:
    """Names a bucket's writer chooses: ``x[/dim]y.bin`` was read as rich markup by the
    progress lines (MarkupError: exit 1 after the bytes landed), an escape sequence went to
    the operator's terminal as is, a newline forged a line of output."""
    src = tmp_path / "src"
    (src / "x[").mkdir(parents=True)
    names = ["x[/dim]y.bin", "\x1b]0;pwned\x07title.bin", "forged\nline.bin", "[bold]b.bin"]
    for name in names:
        (src / name).write_bytes(name.encode())
    dest = tmp_path / "dest"
    for _ in range(2):  # fetched, then each already current
        result = run_cli(["fetch", str(src) + "/", str(dest)])
        assert result.code == 0, result.stderr
        assert "\x1b" not in result.stderr and "\x07" not in result.stderr
        assert "dim]y.bin" in result.stderr
        assert "[bold]b.bin" in result.stderr
        assert not any(line.startswith("line.bin") for line in result.stderr.splitlines())
    for name in names:
        assert (dest / name).read_bytes() == name.encode()


# -- DEST itself swapped for a link mid-run ---------------------------------------------------


def test_dest_swapped_for_a_link_mid_run_redirects_no_file(
    resolver: str,  # noqa: F811
    tmp_path: Path,
    outside: Path,
) -> None:
    """Whoever can write DEST's parent (a DEST they made first in a shared directory) moves
    it away once the first file is done and puts a link to a directory of their choice (say
    /etc/cron.d) at its name. DEST was resolved once, but each file opened it again by path:
    the rest of the files (names the bucket's writer chose) were created through the link."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i:02d}").write_bytes(os.urandom(1000 + i))
    shared = tmp_path / "shared"
    shared.mkdir()
    dest = shared / "dest"
    moved = shared / "moved"
    swapped: list[str] = []

    class Swapper(NullProgress):
        def on_file_done(self, rel: str, *, cached: bool) -> None:
            if not swapped:
                os.rename(dest, moved)
                os.symlink(outside, dest)
                swapped.append(rel)

    cfg = FetchConfig(chunk_bytes=MiB, concurrency=Concurrency(streams=1))
    with contextlib.suppress(UnsafePath, LocalIOError):
        fetch(str(src), dest, cfg, progress=Swapper())
    assert swapped
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"precious" * 1000
    for p in moved.iterdir():
        if p.is_file():
            assert _same(p, src / p.name)


@as_root
def test_a_complete_dest_fetched_by_root_is_current_for_another_user(
    tmp_path: Path, src: Path
) -> None:
    """Root's state directory and files are trusted as ours are (root could write anything
    anyway): an init container's fetch as root, then a rerun as the server's user, copies
    nothing and exits 0."""
    top = Path(tempfile.mkdtemp(prefix="spotstart-redteam-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)  # the other user must reach it
        shutil.copytree(src, top / "src")
        dest = top / "dest"
        fetch(str(top / "src"), dest, SMALL)
        result = run_cli_as(STRANGER, ["fetch", f"{top}/src/", str(dest), "--json"])
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["files_fetched"] == 0
    finally:
        shutil.rmtree(top, ignore_errors=True)


def run_cli_as(uid: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    return subprocess.run(
        [*drop, sys.executable, "-m", "spotstart.cli.main", *args],
        env=isolated_environ(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd="/",
    )


RACER = r"""
import os, sys, time
dest, outside, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + seconds
n = 0
print("racing", flush=True)
while time.monotonic() < deadline:
    n += 1
    try:
        os.rename(os.path.join(dest, ".spotstart"), os.path.join(dest, f".gone-{n}"))
    except OSError:
        pass
    try:
        os.mkdir(os.path.join(dest, ".spotstart"), 0o777)
        os.chmod(os.path.join(dest, ".spotstart"), 0o777)
        os.symlink(outside, os.path.join(dest, ".spotstart", "parts"))
    except OSError:
        pass
print("swaps", n, flush=True)
"""


@as_root
def test_another_user_racing_to_replace_the_state_directory_gets_no_byte_out(
    resolver: str,  # noqa: F811
) -> None:
    """Another user who can write DEST (mode 0777) renames our fresh .spotstart away and
    makes their own, with parts -> a directory of theirs, in a loop while fetch runs
    (between our mkdir and open, or between two files): every run ends with the right
    bytes or exit 8, and nothing lands in their directory."""
    top = Path(tempfile.mkdtemp(prefix="spotstart-redteam-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        src = top / "src"
        src.mkdir()
        for i in range(6):
            (src / f"f{i}").write_bytes(os.urandom(1000 + i))
        dest, theirs = top / "dest", top / "theirs"
        dest.mkdir(mode=0o777)
        os.chmod(dest, 0o777)
        theirs.mkdir()
        os.chown(theirs, STRANGER, STRANGER)
        drop = ["setpriv", f"--reuid={STRANGER}", f"--regid={STRANGER}", "--clear-groups", "--"]
        racer = subprocess.Popen(
            [*drop, sys.executable, "-c", RACER, str(dest), str(theirs), "15"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert racer.stdout is not None and racer.stdout.readline() == "racing\n"
            outcomes: dict[str, int] = {}
            for _ in range(30):
                if racer.poll() is not None:
                    break
                for p in dest.glob("f*"):
                    p.unlink()
                try:
                    fetch(str(src), dest, SMALL)
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                    for i in range(6):
                        assert _same(dest / f"f{i}", src / f"f{i}")
                except (UnsafePath, LocalIOError) as exc:
                    outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                assert list(theirs.iterdir()) == [], outcomes
        finally:
            racer.kill()
            racer.communicate()
        assert outcomes.get("UnsafePath", 0) > 0, outcomes  # the race was met
    finally:
        shutil.rmtree(top, ignore_errors=True)
