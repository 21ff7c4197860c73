"""Red team of `spotstart timeline`: the outputs with hostile names (HTML and the trace), the
PNG of a rollout's worth of phases, line endings and encodings nobody expects, JSON that
packs millions of values in a few MB, times at the ends of the calendar. Any bytes in: exit
0 or 2, one line, bounded memory."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from tests.conftest import error_line, run_cli

T0 = 1796119441.0
EVIL = "<script>alert(1)</script>\"'&<img src=x onerror=alert(2)>"


def _events(path: Path, events: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_hostile_names_are_text_in_the_html_and_the_trace(tmp_path: Path) -> None:
    """A phase, a pod and a title that are HTML: escaped in the self-contained page (no
    element of theirs), kept as written in the trace and the summary."""
    events = _events(
        tmp_path / "e.jsonl",
        [{"v": 1, "phase": EVIL, "pod": EVIL, "start": T0, "end": T0 + 5}],
    )
    out = tmp_path / "out"
    res = run_cli(["timeline", str(events), "--out", str(out), "--title", EVIL])
    assert res.code == 0, res.stderr
    page = (out / "timeline.html").read_text()
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;'&amp;&lt;img" in page
    trace = json.loads((out / "timeline.trace.json").read_text())
    assert trace["traceEvents"][0]["name"] == EVIL


def test_the_png_of_thousands_of_phases_stays_a_picture(tmp_path: Path) -> None:
    """2,000 phases (a 1,000-pod rollout's worth; 10,000 are allowed): one 50-pixel row
    each made a 1210x99176 PNG drawn whole in memory (1 GB, 35 s). The PNG shows the
    critical path and the longest others, at most 200 rows; HTML and trace hold all."""
    events = _events(
        tmp_path / "e.jsonl",
        [
            {"v": 1, "phase": f"p{i}", "start": T0 + i, "end": T0 + i + 1 + (i % 7)}
            for i in range(2000)
        ],
    )
    out = tmp_path / "out"
    res = run_cli(["timeline", str(events), "--out", str(out), "--json"])
    assert res.code == 0, res.stderr
    head = (out / "timeline.png").read_bytes()[:24]
    width, height = struct.unpack(">II", head[16:24])
    assert height < 0.45 * 200 * 110 + 2000, (width, height)
    assert len(json.loads((out / "timeline.trace.json").read_text())["traceEvents"]) == 2000


def test_a_log_with_cr_only_line_ends_is_read(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    line = b"INFO 12-01 10:02:03 [loader.py:1] Loading weights took 12.3 seconds"
    log.write_bytes(b"INFO 12-01 10:00:00 start\r" + line + b"\rINFO 12-01 10:02:04 done\r")
    res = run_cli(["timeline", str(log), "--year", "2026", "--json"])
    assert res.code == 0, res.stderr
    assert [p["name"] for p in json.loads(res.stdout)["phases"]] == ["server: load weights"]


def test_a_utf16_log_is_one_line_exit_2(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    text = "INFO 12-01 10:02:03 [loader.py:1] Loading weights took 12.3 seconds\n"
    log.write_bytes(text.encode("utf-16"))
    res = run_cli(["timeline", str(log), "--year", "2026"])
    assert res.code == 2, res.stderr
    assert "no phases found" in error_line(res.stderr)


def test_a_kubernetes_file_of_millions_of_empty_objects_is_one_line_exit_2(
    tmp_path: Path,
) -> None:
    doc = tmp_path / "pods.json"
    doc.write_text("[" + "{}," * 5_000_000 + "{}]")
    res = run_cli(["timeline", str(doc)])
    assert res.code == 2, res.stderr
    assert "more than 4,000,000 values" in error_line(res.stderr)


def test_times_at_the_ends_of_the_calendar_are_skipped_not_a_crash(tmp_path: Path) -> None:
    pods = {
        "kind": "List",
        "items": [
            {
                "kind": "Pod",
                "metadata": {"name": "p", "creationTimestamp": when},
                "status": {
                    "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": when}]
                },
            }
            for when in (
                "9999-12-31T23:59:59-14:00",
                "0001-01-01T00:00:00+14:00",
                "2026-02-30T00:00:00Z",
                "+2026-12-01T10:00:00Z",
            )
        ],
    }
    doc = tmp_path / "pods.json"
    doc.write_text(json.dumps(pods))
    events = _events(
        tmp_path / "e.jsonl",
        [
            {"v": 1, "phase": "a", "start": 1e308, "end": 1e308},
            {"v": 1, "phase": "b", "start": -1e308, "end": 0},
            {"v": 1, "phase": "c", "start": 2**64, "end": 2**65},
            {"v": 1, "phase": "ok", "start": T0, "end": T0 + 1},
        ],
    )
    res = run_cli(["timeline", str(doc), str(events), "--json"])
    assert res.code == 0, res.stderr
    assert "Traceback" not in res.stderr and "spotstart: warning:" in res.stderr
    assert [p["name"] for p in json.loads(res.stdout)["phases"]] == ["ok"]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_is_one_line_exit_2(tmp_path: Path, kind: str) -> None:
    """A FIFO with no writer blocked the open for ever; /dev/zero was read as a log
    without end (a megabyte line skipped, and the next, for ever)."""
    if kind == "fifo":
        path = tmp_path / "pods.json"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    res = run_cli(["timeline", str(path)], timeout_s=60)
    assert res.code == 2, res.stderr
    assert "not a regular file" in error_line(res.stderr)
