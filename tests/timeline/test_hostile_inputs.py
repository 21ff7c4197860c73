"""`spotstart timeline` on files nobody vetted: a log is what the server printed (prompts
included), an events file what wrote it, a Kubernetes dump what the cluster's users named
things. Bytes that are not UTF-8, JSON nested absurdly deep, NaN, a field of the wrong type
anywhere in a Kubernetes object, a line of hundreds of MB: the timeline of the rest is drawn
and what was left out is counted in one warning line (exit 0), or the whole file is refused
with one line (exit 2); never exit 1, never a traceback, never the whole file in memory."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotstart import timeline
from spotstart.errors import UsageError
from tests.conftest import error_line, isolated_environ, run_cli

FIX = Path(__file__).parent / "fixtures"
POD = "llm-spot-5d9c7-x2tq"
FILES = [
    FIX / n for n in ("objects.json", "events.json", "nodeclaim.json", "server.log", "events.jsonl")
]
WRONG: list[Any] = [42, -1.5, "x", "", [], [1, "a"], {}, {"a": [None]}, None, True]


def _warning(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("spotstart: warning:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_log_with_a_byte_that_is_not_utf8_is_read(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    text = (FIX / "server.log").read_bytes()
    log.write_bytes(b"INFO 12-01 10:05:36 caf\xe9 au lait\n" + text)  # latin-1 e-acute
    res = run_cli(["timeline", *map(str, FILES[:3]), str(log), "--pod", POD, "--json"])
    assert res.code == 0, res.stderr
    names = {p["name"] for p in json.loads(res.stdout)["phases"]}
    assert {"server: load weights", "server: engine-init"} <= names


def test_malformed_event_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    """NaN, Infinity, a start that is a string, absurd nesting, a line over 1 MiB: each is
    left out and counted; the good line is drawn."""
    good = (FIX / "events.jsonl").read_text().strip()
    bad = [
        '{"v": 1, "phase": "fetch", "start": NaN, "end": 1796119529.0}',
        '{"v": 1, "phase": "load", "start": 1796119441.0, "end": Infinity}',
        '{"v": 1, "phase": "load", "start": "10:00", "end": 1796119529.0}',
        '{"v": 1, "phase": ["x"], "start": 1796119441.0, "end": 1796119529.0}',
        '{"v": 1, "phase": "x", "start": 1796119441.0, "end": 1796119529.0, "bytes": 1e999}',
        '{"phase": "deep", "detail": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"phase": "long", "detail": "' + "x" * (2 << 20) + '"}',
    ]
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join([good, *bad]) + "\n")
    res = run_cli(["timeline", str(events), "--json"])
    assert res.code == 0, res.stderr
    assert [p["name"] for p in json.loads(res.stdout)["phases"]] == ["fetch"]
    assert json.loads(res.stdout)["skipped"] == {"events lines": len(bad)}
    warning = _warning(res.stderr)
    assert "skipped 7 malformed record(s)" in warning and "NaN is not a JSON number" in warning


def test_a_file_of_nothing_but_bad_events_is_one_line_exit_2(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"phase": "fetch", "start": NaN, "end": 1}\n')
    res = run_cli(["timeline", str(events)])
    assert res.code == 2, res.stderr
    assert "neither Kubernetes JSON nor phase events" in error_line(res.stderr)


def test_a_kubernetes_document_nested_absurdly_deep_is_one_line_exit_2(tmp_path: Path) -> None:
    """A whole document cannot be half-read: refused, before it is parsed."""
    doc = tmp_path / "pods.json"
    doc.write_text('{"kind": "List", "items": ' + "[" * 200_000 + "]" * 200_000 + "}")
    res = run_cli(["timeline", str(doc), str(FIX / "events.jsonl")])
    assert res.code == 2, res.stderr
    assert "nested deeper than 64 levels" in error_line(res.stderr)


def test_a_pod_whose_conditions_is_a_string_is_skipped_and_counted(tmp_path: Path) -> None:
    objects = json.loads((FIX / "objects.json").read_text())
    other = next(i for i in objects["items"] if i["kind"] == "Pod" and i["metadata"]["name"] != POD)
    other["status"]["conditions"] = "Ready"
    path = tmp_path / "objects.json"
    path.write_text(json.dumps(objects))
    res = run_cli(["timeline", str(path), *map(str, FILES[1:]), "--json"])
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["skipped"] == {"Pod": 1}
    assert "Pod.status.conditions is not a list of objects" in _warning(res.stderr)
    assert any(p["pod"] == POD for p in json.loads(res.stdout)["phases"])


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize("fixture", ["objects.json", "events.json", "nodeclaim.json"])
def test_any_field_of_any_wrong_type_never_crashes(fixture: str, tmp_path: Path) -> None:
    """Every field of every object in the recorded files, set in turn to each wrong type:
    the read ends in phases (the object skipped and counted, or the value unused) or a
    UsageError; nothing else."""
    original = json.loads((FIX / fixture).read_text())
    others = [f for f in FILES if f.name != fixture]
    target = tmp_path / fixture
    tried = 0
    for path in _paths(original):
        for value in WRONG:
            target.write_text(json.dumps(_set(original, path, value)))
            try:
                got = timeline.read([target, *others])
            except UsageError:
                continue
            tried += 1
            assert got.phases
            timeline.summary(got.phases)
            timeline.html(got.phases)
            timeline.chrome_trace(got.phases)
    assert tried > 100


def test_a_100_mb_line_is_skipped_without_being_held(tmp_path: Path) -> None:
    """A log of one 200 MB line (no newline for 200 MB) and the timing lines: the line is
    passed over in 1 MiB reads and counted; the run's peak memory stays far below the file."""
    log = tmp_path / "server.log"
    with open(log, "wb") as f:
        f.write(b"INFO 12-01 10:05:30 prompt: ")
        for _ in range(200):
            f.write(b"A" * (1 << 20))
        f.write(b"\n")
        f.write((FIX / "server.log").read_bytes())
    args = [*map(str, FILES[:3]), str(log), "--pod", POD, "--json"]
    probe = (
        "import resource, subprocess, sys\n"
        "cmd = [sys.executable, '-m', 'spotstart.cli.main', 'timeline', *sys.argv[1:]]\n"
        "p = subprocess.run(cmd, capture_output=True, text=True)\n"
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(p.stderr)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *args],
        capture_output=True,
        text=True,
        env=isolated_environ(),
        check=False,
        timeout=120,
    )
    code, peak_kib = map(int, out.stdout.split())
    assert code == 0, out.stderr
    assert "line 1 is over 1048576 bytes" in _warning(out.stderr)
    assert peak_kib < 150 * 1024, peak_kib  # the file is 200 MB; reading it whole took 3x that


def test_phase_names_are_printed_not_interpreted(tmp_path: Path) -> None:
    """A name that is rich markup (or a mathtext "$") is shown as written in the table and
    the PNG; a control character becomes "?"."""
    events = tmp_path / "events.jsonl"
    events.write_text(
        json.dumps(
            {"v": 1, "phase": "[/red]$x[bold]\x1b[2J", "start": 1796119441.0, "end": 1796119529.0}
        )
        + "\n"
    )
    res = run_cli(["timeline", str(events), "--out", str(tmp_path / "out")])
    assert res.code == 0, res.stderr
    assert "[/red]$x[bold]?[2J" in res.stdout and "\x1b" not in res.stdout


def test_an_impossible_time_in_a_timing_line_is_counted() -> None:
    line = "INFO 13-45 10:06:10 [default_loader.py:262] Loading weights took 30.25 seconds"
    with pytest.raises(timeline.Malformed):
        timeline.log_phase(line, 2026)
    assert timeline.from_server_log(line + "\n", 2026) == []


def test_a_log_line_built_to_backtrack_is_read_in_linear_time() -> None:
    """Repeated stamps and phrases without their numbers: the patterns' repetitions are
    bounded, so a 1 MiB line of them is matched in one pass (a regression here hangs)."""
    line = ("12-01 10:00:00 Model loading took " * 30_000)[: 1 << 20]
    assert timeline.log_phase(line, 2026) is None


def _read_bytes(data: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_bytes(data)
        try:
            got = timeline.read([p])
        except UsageError as exc:
            assert "\n" not in str(exc)
            return
        timeline.summary(got.phases)
        timeline.html(got.phases)


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=30,
)
_KEYS = [
    "kind",
    "items",
    "metadata",
    "status",
    "spec",
    "conditions",
    "creationTimestamp",
    "phase",
    "start",
    "end",
    "bytes",
    "reason",
    "message",
    "involvedObject",
    "nodeName",
    "containerStatuses",
    "initContainerStatuses",
    "lastTransitionTime",
    "state",
]
_KUBEISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(
        ["Pod", "Event", "Node", "NodeClaim", "True", "Pulled", "2026-12-01T10:00:00Z"]
    )
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_any_bytes_end_in_phases_or_a_usage_error(data: bytes) -> None:
    _read_bytes(data, "f")
    _read_bytes(b"{" + data, "f")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_KUBEISH, _JSONISH)
def test_fuzz_kubernetes_and_event_shapes_end_in_phases_or_a_usage_error(
    kube: Any, event: Any
) -> None:
    _read_bytes(json.dumps(kube).encode(), "k.json")
    _read_bytes(
        json.dumps({"phase": "x", **(event if isinstance(event, dict) else {})}).encode(), "e"
    )


def test_a_kubernetes_document_over_64_mib_is_refused_unread(tmp_path: Path) -> None:
    doc = tmp_path / "pods.json"
    with open(doc, "w") as f:
        f.write('{"kind": "List", "items": [')
        f.write(" " * (65 << 20))
        f.write("]}")
    res = run_cli(["timeline", str(doc), str(FIX / "events.jsonl")])
    assert res.code == 2, res.stderr
    assert "over 64 MiB of JSON" in error_line(res.stderr)
