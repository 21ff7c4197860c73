"""Files a user names on the command line (`timeline --out DIR`, `--metrics-textfile`,
`--events`) are never written through a link planted at their name: the name is refused in
one line (exit 8), or, for the events log that must never fail a run, left alone; the
victim outside stays as it was.

tmp_path is no sticky world-writable directory, so fs.protected_symlinks and
fs.protected_hardlinks (which guard only those) do not hide a followed link, as root (CI) or
not."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import error_line, run_cli

FIX = Path(__file__).parents[1] / "timeline" / "fixtures"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "outside" / "victim"
    v.parent.mkdir()
    v.write_bytes(b"precious")
    return v


@pytest.fixture
def src(tmp_path: Path) -> Path:
    s = tmp_path / "src"
    s.mkdir()
    (s / "m.bin").write_bytes(os.urandom(100_000))
    return s


@pytest.mark.parametrize("name", ["timeline.html", "timeline.json", "timeline.png"])
def test_timeline_refuses_a_link_at_an_output_name(tmp_path: Path, victim: Path, name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / name)
    res = run_cli(["timeline", str(FIX / "events.jsonl"), "--out", str(out)])
    assert res.code == 8, res.stderr
    line = error_line(res.stderr)
    assert name in line and "symlink" in line
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary left


def test_metrics_textfile_refuses_a_link_at_its_name(
    tmp_path: Path, victim: Path, src: Path
) -> None:
    prom = tmp_path / "node" / "spotstart.prom"
    prom.parent.mkdir()
    os.symlink(victim, prom)
    res = run_cli(["fetch", str(src), str(tmp_path / "d"), "--metrics-textfile", str(prom)])
    assert res.code == 8, res.stderr
    assert "--metrics-textfile" in error_line(res.stderr)
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in prom.parent.iterdir()) == ["spotstart.prom"]


def test_the_metrics_textfile_replaces_a_file_at_its_name_atomically(
    tmp_path: Path, victim: Path, src: Path
) -> None:
    prom = tmp_path / "node" / "spotstart.prom"
    prom.parent.mkdir()
    os.link(victim, prom)  # a hard link: replaced by the new file, the old inode untouched
    res = run_cli(["fetch", str(src), str(tmp_path / "d"), "--metrics-textfile", str(prom)])
    assert res.code == 0, res.stderr
    assert "spotstart_fetch_exit_code" in prom.read_text()
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_events_are_never_appended_through_a_planted_name(
    tmp_path: Path, victim: Path, src: Path, plant: str
) -> None:
    events = tmp_path / "shared" / "events.jsonl"
    events.parent.mkdir()
    if plant == "symlink":
        os.symlink(victim, events)
    elif plant == "hardlink":
        os.link(victim, events)
    else:
        os.mkfifo(events)  # no reader: an open for writing would block forever
    res = run_cli(["fetch", str(src), str(tmp_path / "d"), "--events", str(events)])
    assert res.code == 0, res.stderr  # a timeline is worth less than the fetch it describes
    assert (tmp_path / "d" / "m.bin").read_bytes() == (src / "m.bin").read_bytes()
    assert victim.read_bytes() == b"precious"


def test_events_append_to_a_plain_file_of_ours(tmp_path: Path, src: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("")
    res = run_cli(["fetch", str(src), str(tmp_path / "d"), "--events", str(events)])
    assert res.code == 0, res.stderr
    phases = [json.loads(line)["phase"] for line in events.read_text().splitlines()]
    assert "fetch" in phases


def test_k8s_render_refuses_a_link_at_a_manifest_name(tmp_path: Path, victim: Path) -> None:
    example = Path(__file__).parents[2] / "examples" / "deploy.yaml"
    out = tmp_path / "manifests"
    out.mkdir()
    os.symlink(victim, out / "Kustomization")
    res = run_cli(["k8s", "render", "--config", str(example), "--cloud", "gke", "-o", str(out)])
    assert res.code == 8, res.stderr
    assert "Kustomization" in error_line(res.stderr)
    assert victim.read_bytes() == b"precious"
