"""safefs: names resolved beneath a root with no symlink followed, by openat2 and by the
component walk (forced through the module's openat2 seam, as on a kernel without it).

The tests plant links in pytest's tmp_path, which is not a sticky world-writable directory,
so ``fs.protected_symlinks`` (which only guards those) never hides a followed link, as root or
not."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart import safefs
from spotstart.errors import LocalIOError, UnsafePath


def _no_openat2(dirfd: int, rel: str, flags: int, mode: int, resolve: int) -> int:
    raise OSError(errno.ENOSYS, "openat2 not implemented")


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(safefs, "_have", None)
    if request.param == "walk":
        monkeypatch.setattr(safefs, "_openat2", _no_openat2)
    elif safefs.resolver() != "openat2":
        pytest.skip("this kernel has no openat2")
    assert safefs.resolver() == request.param
    yield request.param


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "outside" / "victim"
    v.parent.mkdir()
    v.write_bytes(b"precious")
    return v


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def test_opens_a_plain_file_beneath_a_root_that_is_itself_a_link(
    resolver: str, tmp_path: Path, root: Path
) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "f").write_bytes(b"data")
    os.symlink(root, tmp_path / "alias")  # the user's own DEST -> disk link is fine
    fd = safefs.open_beneath(tmp_path / "alias", "sub/f")
    try:
        assert os.read(fd, 10) == b"data"
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_CREAT])
def test_a_link_as_the_last_component_is_refused_and_its_target_untouched(
    resolver: str, root: Path, victim: Path, flags: int
) -> None:
    os.symlink(victim, root / "name")
    with pytest.raises(OSError) as exc:
        safefs.open_beneath(root, "name", flags)
    assert exc.value.errno == errno.ELOOP
    assert victim.read_bytes() == b"precious"


def test_a_link_as_a_parent_component_is_refused(resolver: str, root: Path, victim: Path) -> None:
    (root / "a").mkdir()
    os.symlink(victim.parent, root / "a" / "b")
    with pytest.raises(OSError) as exc:
        safefs.open_beneath(root, "a/b/victim", os.O_WRONLY | os.O_TRUNC)
    assert exc.value.errno == errno.ELOOP
    with pytest.raises(OSError):
        safefs.create_exclusive(root, "a/b/new")
    assert victim.read_bytes() == b"precious"
    assert not (victim.parent / "new").exists()


def test_a_link_to_a_directory_inside_the_root_is_refused_too(resolver: str, root: Path) -> None:
    (root / "real").mkdir()
    os.symlink("real", root / "alias")
    with pytest.raises(OSError) as exc:
        safefs.create_exclusive(root, "alias/f")
    assert exc.value.errno == errno.ELOOP


@pytest.mark.parametrize("rel", ["../victim", "a/../../x", "/etc/passwd", "", "a//b", "./a"])
def test_names_that_leave_the_root_or_are_ambiguous_are_refused(
    resolver: str, root: Path, rel: str
) -> None:
    (root / "a").mkdir()
    with pytest.raises(OSError) as exc:
        safefs.create_exclusive(root, rel)
    assert exc.value.errno in (errno.EXDEV, errno.EINVAL)


def test_create_exclusive_refuses_an_existing_name_even_a_dangling_link(
    resolver: str, root: Path, tmp_path: Path
) -> None:
    target = tmp_path / "would-be-created"
    os.symlink(target, root / "dangling")
    (root / "existing").write_bytes(b"old")
    for name in ("dangling", "existing"):
        with pytest.raises(FileExistsError):
            safefs.create_exclusive(root, name)
    assert not target.exists()
    assert (root / "existing").read_bytes() == b"old"
    fd = safefs.create_exclusive(root, "fresh", 0o640)
    os.close(fd)
    assert stat.S_IMODE((root / "fresh").stat().st_mode) == 0o640 & ~_umask()


def test_makedirs_beneath_creates_missing_levels_and_refuses_a_planted_link(
    resolver: str, root: Path, victim: Path
) -> None:
    fd = safefs.makedirs_beneath(root, "m/n/o")
    os.close(fd)
    assert (root / "m" / "n" / "o").is_dir()
    os.symlink(victim.parent, root / "m" / "evil")
    with pytest.raises(OSError) as exc:
        safefs.makedirs_beneath(root, "m/evil/deeper")
    assert exc.value.errno == errno.ELOOP
    assert sorted(os.listdir(victim.parent)) == ["victim"]


def test_private_dir_is_created_0700_and_an_existing_safe_one_is_reused(
    resolver: str, root: Path
) -> None:
    p = safefs.private_dir(root / "x" / "state")
    assert stat.S_IMODE(p.stat().st_mode) == 0o700
    os.chmod(p, 0o755)  # made by an older spotstart under umask 022: still safe
    assert safefs.private_dir(p) == p
    fd = safefs.private_dir_fd(root, "x/state")
    os.close(fd)


def test_private_dir_refuses_a_link_a_shared_directory_and_a_stranger_s(
    resolver: str, root: Path, victim: Path
) -> None:
    os.symlink(victim.parent, root / "link")
    with pytest.raises(UnsafePath, match="symlink"):
        safefs.private_dir(root / "link")
    (root / "shared").mkdir()
    os.chmod(root / "shared", 0o777)
    with pytest.raises(UnsafePath, match="writable by group or others"):
        safefs.private_dir(root / "shared")
    if os.geteuid() == 0:  # as root: a directory another user made is theirs to plant in
        (root / "theirs").mkdir(mode=0o755)
        os.chown(root / "theirs", 65534, 65534)
        with pytest.raises(UnsafePath, match="owned by uid 65534"):
            safefs.private_dir(root / "theirs")
    assert issubclass(UnsafePath, LocalIOError) and UnsafePath.exit_code == 8


def test_rename_beneath_lands_in_the_directory_held_open_after_its_name_is_swapped(
    resolver: str, root: Path, victim: Path
) -> None:
    d = root / "d"
    d.mkdir()
    dfd = safefs.private_dir_fd(root, "d")
    try:
        os.close(safefs.create_exclusive(dfd, "f.part"))
        # The directory's name now points elsewhere; the fd still holds the original.
        os.rename(d, root / "moved")
        os.symlink(victim.parent, d)
        safefs.rename_beneath(dfd, "f.part", dfd, "victim")
    finally:
        os.close(dfd)
    assert victim.read_bytes() == b"precious"
    assert (root / "moved" / "victim").exists()
    with pytest.raises(OSError):
        safefs.rename_beneath(dfd, "a/b", dfd, "c")


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_write_output_replaces_a_file_atomically_and_refuses_a_link_at_its_name(
    tmp_path: Path, victim: Path
) -> None:
    out = tmp_path / "out.json"
    safefs.write_output(out, "one")
    os.link(out, tmp_path / "other-name")  # a hard link keeps the old bytes: a new inode
    safefs.write_output(out, b"two")
    assert out.read_bytes() == b"two" and (tmp_path / "other-name").read_bytes() == b"one"
    os.symlink(victim, tmp_path / "link.json")
    with pytest.raises(UnsafePath, match=r"link\.json: is a symlink"):
        safefs.write_output(tmp_path / "link.json", b"evil", label="--out link.json")
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    with pytest.raises(LocalIOError, match="no-such-dir"):
        safefs.write_output(tmp_path / "no-such-dir" / "x", b"")


def test_open_append_refuses_links_and_fifos_and_appends_to_a_plain_file(
    tmp_path: Path, victim: Path
) -> None:
    log = tmp_path / "events.jsonl"
    for _ in range(2):
        fd = safefs.open_append(log)
        os.write(fd, b"x\n")
        os.close(fd)
    assert log.read_bytes() == b"x\nx\n"
    os.symlink(victim, tmp_path / "sym")
    os.link(victim, tmp_path / "hard")
    os.mkfifo(tmp_path / "fifo")
    for name in ("sym", "hard", "fifo"):
        with pytest.raises(OSError):
            safefs.open_append(tmp_path / name)
    assert victim.read_bytes() == b"precious"
