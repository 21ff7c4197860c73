"""`image profile -o DIR`: a link planted at any output name (profile.json, server.log, a
prefetch list) is refused in one line (exit 8), never written through; the victim outside
DIR stays as it was. tmp_path is no sticky world-writable directory, so
fs.protected_symlinks does not hide a followed link, as root (CI) or not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotstart.emulate.servers import free_port
from tests.conftest import error_line, run_cli
from tests.image import pyroot

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("name", ["profile.json", "server.log", "soci-prefetch.json"])
def test_profile_refuses_a_link_at_an_output_name(tmp_path: Path, name: str) -> None:
    root = pyroot.build(tmp_path / "root")
    victim = tmp_path / "outside" / "victim"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    out = tmp_path / "profile"
    out.mkdir()
    os.symlink(victim, out / name)
    port = free_port()
    result = run_cli(
        [
            "image",
            "profile",
            "--rootfs",
            str(root),
            "--tracer",
            "audit-hook",
            "--ready-url",
            f"http://127.0.0.1:{port}/",
            "-o",
            str(out),
            "--",
            "/usr/bin/python3",
            "/app/server.py",
            str(port),
        ],
        timeout_s=200,
    )
    assert result.code == 8, result.stderr
    line = error_line(result.stderr)
    assert name in line and "symlink" in line
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim"]
