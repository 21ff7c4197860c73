"""Red team of the image builder (container/, issue 22). It runs as root; the attackers:
another local user who can write where it caches or builds (a shared cache, /tmp), an index
or proxy that serves other wheels than the locked ones, a Debian mirror on plain http, and
a developer's checkout holding files that are not the package's (a local secret beside the
examples, a stale module an earlier build left in build/lib). Each test drives the real
script; the slow end-to-end build is tests/image/test_container_build.py."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import stat
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINER = REPO / "container"


def _stub_bin(tmp_path: Path, names: tuple[str, ...]) -> tuple[Path, Path]:
    """Stand-ins for buildah/debootstrap that only record that they ran."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    for name in names:
        script = bindir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >>{calls}\nexit 1\n')
        script.chmod(0o755)
    return bindir, calls


def _build_with_cache(tmp_path: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    bindir, _ = _stub_bin(tmp_path, ("buildah", "debootstrap"))
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "SPOTSTART_IMAGE_CACHE": str(cache),
        "TMPDIR": str(tmp_path),
    }
    return subprocess.run(
        [str(CONTAINER / "build.sh"), str(tmp_path / "oci")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _debootstrap_ran(tmp_path: Path) -> bool:
    calls = tmp_path / "calls"
    return calls.exists() and "debootstrap" in calls.read_text()


def test_a_cache_other_users_can_write_is_refused_before_root_writes_or_reads_it(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    shared.chmod(0o777)  # another user's planted symlink or swapped tar would be ours
    res = _build_with_cache(tmp_path, shared)
    assert res.returncode == 2, res.stderr
    assert "SPOTSTART_IMAGE_CACHE" in res.stderr
    assert not _debootstrap_ran(tmp_path)
    assert list(shared.iterdir()) == []


def test_a_cache_under_a_writable_non_sticky_directory_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)  # no sticky bit: anyone may rename our cache away and put theirs
    cache = parent / "cache"
    res = _build_with_cache(tmp_path, cache)
    assert res.returncode == 2, res.stderr
    assert not _debootstrap_ran(tmp_path)


def test_a_private_cache_under_sticky_tmp_is_accepted(tmp_path: Path) -> None:
    # the refusal above is no refusal of everything: a 0700 cache of ours under a sticky
    # world-writable directory (as /tmp) passes the check and goes on to debootstrap
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    res = _build_with_cache(tmp_path, sticky / "cache")
    assert "SPOTSTART_IMAGE_CACHE" not in res.stderr, res.stderr
    assert _debootstrap_ran(tmp_path)
    assert stat.S_IMODE((sticky / "cache").stat().st_mode) == 0o700


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    return clone


def test_the_image_wheel_holds_the_tracked_files_only(checkout: Path, tmp_path: Path) -> None:
    stale = checkout / "build" / "lib" / "spotstart" / "stale_module.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("raise SystemExit('a module deleted from src long ago')\n")
    secret = checkout / "src" / "spotstart" / "examples" / "local-secret.yaml"
    secret.write_text("token: hunter2\n")
    out = tmp_path / "app"
    res = subprocess.run(
        [str(CONTAINER / "wheel.sh"), str(checkout), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    [wheel] = out.glob("spotstart-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "spotstart/stale_module.py" not in names
    assert "spotstart/examples/local-secret.yaml" not in names
    assert "spotstart/examples/fleet.yaml" in names and "spotstart/py.typed" in names
    tracked = subprocess.run(
        ["git", "-C", str(checkout), "ls-files", "src/spotstart"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    package = {n for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert package == {t.removeprefix("src/") for t in tracked}


def _hostile_setuptools(version: str, marker: Path) -> bytes:
    """A wheel named as the locked setuptools whose build backend writes ``marker``."""
    code = f"open({str(marker)!r}, 'w').write('ran as uid %d' % __import__('os').getuid())\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("setuptools/__init__.py", code)
        z.writestr("setuptools/build_meta.py", code)
        info = f"setuptools-{version}.dist-info"
        z.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: setuptools\nVersion: {version}\n"
        )
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    return buf.getvalue()


@pytest.fixture
def hostile_index(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    lock = (CONTAINER / "build-requirements.lock").read_text()
    version = next(
        line.split("==")[1].split()[0]
        for line in lock.splitlines()
        if line.startswith("setuptools==")
    )
    marker = tmp_path / "BACKEND-RAN"
    name = f"setuptools-{version}-py3-none-any.whl"
    blob = _hostile_setuptools(version, marker)
    digest = hashlib.sha256(blob).hexdigest()
    page = f'<html><body><a href="/files/{name}#sha256={digest}">{name}</a></body></html>'

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/files/"):
                body, ctype = blob, "application/octet-stream"
            else:  # every project page offers the hostile setuptools (wheel, too)
                body, ctype = page.encode(), "text/html"
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/", marker
    finally:
        server.shutdown()
        server.server_close()


def test_an_index_serving_another_setuptools_never_runs_it(
    checkout: Path, tmp_path: Path, hostile_index: tuple[str, Path]
) -> None:
    url, marker = hostile_index
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL=url,
        PIP_NO_CACHE_DIR="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
    )
    res = subprocess.run(
        [str(CONTAINER / "wheel.sh"), str(checkout), str(tmp_path / "app")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert not marker.exists(), marker.read_text()
    assert res.returncode != 0
    assert "HASH" in res.stderr.upper(), res.stderr[-2000:]


def test_debootstrap_without_the_archive_keyring_stops_before_the_mirror(tmp_path: Path) -> None:
    """A host with no debian-archive-keyring: debootstrap's default is a warning ("Cannot
    check Release signature") and an unsigned install from the plain-http mirror."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("debootstrap", "unshare")):
        pytest.skip("needs root, debootstrap and unshare (a mount namespace)")
    requests: list[str] = []

    class Mirror(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {
            **os.environ,
            "SPOTSTART_IMAGE_MIRROR": f"http://127.0.0.1:{server.server_address[1]}/debian",
            "TMPDIR": str(tmp_path),
        }
        out = tmp_path / "base.tar"
        res = subprocess.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",  # the host's keyrings hidden in this mount namespace only
                'mount -t tmpfs none /usr/share/keyrings && exec "$0" "$1"',
                str(CONTAINER / "base.sh"),
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
    if "mount" in res.stderr and "permission denied" in res.stderr.lower():
        pytest.skip("no mount namespace here")
    assert res.returncode != 0
    assert requests == [], requests
    assert not out.exists()
