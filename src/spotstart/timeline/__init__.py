"""`spotstart timeline`: where every second of a replica's start went, from three sources
merged on one clock:

- spotstart's phase events (:mod:`spotstart.events`: fetch, load, guard's server start and
  drain), JSON lines;
- what Kubernetes records, as ``kubectl get -o json`` writes it (a Pod, Event, Node or
  Karpenter NodeClaim, a ``List`` or ``*List`` of them): the Node's creation and Ready
  condition, the NodeClaim's Launched/Registered/Initialized conditions, the Pod's creation,
  PodScheduled, init containers' start/finish, containers' start and the Ready condition, and
  the kubelet's ``Pulled`` event ("Successfully pulled image ... in 11m2.3s");
- the server's log: vLLM's start-up lines (start, model loading, weights, warm-up and
  compile, engine-init, API server up, shutdown: :mod:`spotstart.timeline.serverlog`).

With ``guard --engine-cache`` the guard's events say whether the engine started warm (its
compile caches restored) or cold: the ``engine-init`` phase and vLLM's own "init engine ...
took" span are named ``(warm)`` or ``(cold)``, and the cache restore is a phase of its own
on the critical path (:func:`engine_phases`).

The phases, the critical path from the first start to Ready (each phase's share, gaps named
as such), and the picture: PNG (matplotlib), self-contained HTML (inline SVG), Chrome trace
JSON (opens in Perfetto / chrome://tracing). Pure except the readers of files and writers."""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from spotstart import safefs, untrusted_json
from spotstart.errors import UsageError
from spotstart.timeline import serverlog


@dataclass(frozen=True)
class Phase:
    name: str
    start: float  # unix seconds
    end: float
    source: str  # "spotstart", "kubernetes", "server-log"
    pod: str = ""
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


def parse_time(text: str) -> float:
    """RFC 3339 as Kubernetes writes it (``2026-12-01T10:00:00Z``, fractions allowed)."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"not an RFC 3339 time: {text[:64]!r}") from exc
    return (t if t.tzinfo is not None else t.replace(tzinfo=UTC)).timestamp()


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_go_duration(text: str) -> float:
    """Seconds of a Go ``time.Duration`` string, as the kubelet prints it (``11m2.345s``)."""
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


# -- reading untrusted files --------------------------------------------------------------------
#
# Every file is untrusted: a log carries whatever the server printed (prompts included), an
# events file whatever wrote it, a Kubernetes dump whatever the cluster's users named things.
# Logs and events are read as streams, a line at a time, each line bounded; bytes that are
# not UTF-8 become U+FFFD. A Kubernetes document is read whole but bounded, and parsed with
# its nesting bounded. A record of the wrong shape (a field of the wrong type, an impossible
# time, NaN) is skipped and counted, never a crash: the timeline of the rest still stands, and
# the count says something was left out.

MAX_LINE_BYTES = 1 << 20  # a log or events line longer than this is skipped (and counted)
# A Kubernetes JSON file: ~4,000 pods with managedFields, ~60,000 events. Parsed, a document
# takes about 10x its size in memory (a hostile one of tiny values up to 30x: at most
# untrusted_json.MAX_VALUES values are parsed, ~400 MB); each is turned into records and
# dropped before the next.
MAX_DOCUMENT_BYTES = 64 << 20
MAX_PHASES = 10_000  # the critical path is quadratic in phases; a rollout of 1,000 pods fits
_EARLIEST, _LATEST = 946_684_800.0, 7_258_118_400.0  # 2000-01-01 .. 2200-01-01, unix seconds
_MAX_TEXT = 500  # characters of a name or detail kept


class Malformed(ValueError):
    """One record of the wrong shape; it is skipped and counted."""


@dataclass
class Skipped:
    """What was left out, by kind of record, with the first reason of each kind."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, reason: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first.setdefault(kind, reason)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def line(self) -> str:
        """One line for a warning: ``skipped 3 records: 2 events lines (first: ...), ...``."""
        parts = [f"{n} {kind} (first: {self.first[kind]})" for kind, n in self.counts.items()]
        return f"skipped {sum(self.counts.values())} malformed record(s): " + "; ".join(parts)


@dataclass(frozen=True)
class Collected:
    phases: list[Phase]
    skipped: Skipped


def _text(value: object, what: str, *, required: bool = False) -> str:
    """A string field: absent or null is "", anything else not a string is Malformed.
    Control characters become "?" (names reach terminals and pictures), long ones are cut."""
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise Malformed(f"{what} is {type(value).__name__}, not a string")
    clean = "".join(c if c.isprintable() else "?" for c in value[:_MAX_TEXT])
    return clean + ("..." if len(value) > _MAX_TEXT else "")


def _seconds(value: object, what: str) -> float:
    """A unix time in seconds (a JSON number between 2000 and 2200)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Malformed(f"{what} is {type(value).__name__}, not a number")
    t = float(value)
    if not _EARLIEST <= t <= _LATEST:
        raise Malformed(f"{what} {t!r} is not a time between 2000 and 2200")
    return t


def _when(value: object, what: str) -> float | None:
    """An RFC 3339 time field: absent or null is None; anything else wrong is Malformed."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise Malformed(f"{what} is not an RFC 3339 time")
    try:
        t = parse_time(value)
    except ValueError as exc:
        raise Malformed(f"{what}: {exc}") from None
    return _seconds(t, what)


def _obj(parent: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Malformed(f"{what}.{key} is {type(value).__name__}, not an object")
    return value


def _objs(parent: dict[str, Any], key: str, what: str) -> list[dict[str, Any]]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise Malformed(f"{what}.{key} is not a list of objects")
    return value


# -- spotstart's events -----------------------------------------------------------------------


def event_phase(e: object) -> Phase:
    """One phase event (:mod:`spotstart.events`) as a Phase; Malformed if any field is of the
    wrong type or value."""
    if not isinstance(e, dict):
        raise Malformed("not a JSON object")
    if "phase" not in e:
        raise Malformed("no 'phase'")
    start, end = _seconds(e.get("start"), "start"), _seconds(e.get("end"), "end")
    if end < start:
        raise Malformed(f"end {end} is before start {start}")
    detail = _text(e.get("detail"), "detail")
    size = e.get("bytes")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 1 << 63:
            raise Malformed("bytes is not a byte count")
        if size:
            detail = f"{size / 1e9:.2f} GB; {detail}".rstrip("; ")
    return Phase(
        _text(e["phase"], "phase", required=True),
        start,
        end,
        "spotstart",
        _text(e.get("pod"), "pod"),
        detail,
    )


def from_events(text: str) -> list[Phase]:
    """The phases of an events file's text; a malformed line raises ValueError (Malformed,
    JSONRejected). :func:`read` skips such lines instead."""
    return [
        event_phase(untrusted_json.parse(line, what="events line"))
        for line in text.splitlines()
        if line.strip()
    ]


# -- Kubernetes objects -----------------------------------------------------------------------


@dataclass(frozen=True)
class PodRecord:
    name: str
    created: float
    node: str
    conditions: dict[str, float]
    init: tuple[tuple[str, float, float], ...]  # name, started, finished
    started: tuple[float, ...]  # the containers' running.startedAt


@dataclass(frozen=True)
class NodeRecord:
    name: str
    created: float
    ready: float | None


@dataclass(frozen=True)
class ClaimRecord:
    node: str
    created: float
    conditions: dict[str, float]


@dataclass(frozen=True)
class PullRecord:
    pod: str
    image: str
    start: float
    end: float


def _conditions(obj: dict[str, Any], what: str) -> dict[str, float]:
    out = {}
    for c in _objs(_obj(obj, "status", what), "conditions", f"{what}.status"):
        when = _when(c.get("lastTransitionTime"), f"{what} condition time")
        if c.get("status") == "True" and when is not None:
            out[_text(c.get("type"), f"{what} condition type", required=True)] = when
    return out


def _created(obj: dict[str, Any], what: str) -> tuple[str, float]:
    meta = _obj(obj, "metadata", what)
    created = _when(meta.get("creationTimestamp"), f"{what} creationTimestamp")
    if created is None:
        raise Malformed(f"{what} has no creationTimestamp")
    return _text(meta.get("name"), f"{what} name"), created


def pod_record(obj: dict[str, Any]) -> PodRecord:
    name, created = _created(obj, "Pod")
    status = _obj(obj, "status", "Pod")
    init = []
    for c in _objs(status, "initContainerStatuses", "Pod.status"):
        t = _obj(_obj(c, "state", "initContainerStatus"), "terminated", "state")
        began = _when(t.get("startedAt"), "terminated.startedAt")
        ended = _when(t.get("finishedAt"), "terminated.finishedAt")
        if began is not None and ended is not None:
            init.append((_text(c.get("name"), "initContainerStatus name"), began, ended))
    started = []
    for c in _objs(status, "containerStatuses", "Pod.status"):
        running = _obj(_obj(c, "state", "containerStatus"), "running", "state")
        began = _when(running.get("startedAt"), "running.startedAt")
        if began is not None:
            started.append(began)
    return PodRecord(
        name,
        created,
        _text(_obj(obj, "spec", "Pod").get("nodeName"), "spec.nodeName"),
        _conditions(obj, "Pod"),
        tuple(init),
        tuple(started),
    )


def node_record(obj: dict[str, Any]) -> NodeRecord:
    name, created = _created(obj, "Node")
    return NodeRecord(name, created, _conditions(obj, "Node").get("Ready"))


def claim_record(obj: dict[str, Any]) -> ClaimRecord:
    _, created = _created(obj, "NodeClaim")
    node = _text(_obj(obj, "status", "NodeClaim").get("nodeName"), "status.nodeName")
    return ClaimRecord(node, created, _conditions(obj, "NodeClaim"))


_PULLED = re.compile(r'Successfully pulled image "([^"]{1,500})" in ([0-9a-zµ.]{1,64})')
_MAX_PULL_S = 7 * 86400.0


def pull_record(obj: dict[str, Any]) -> PullRecord | None:
    """A kubelet ``Pulled`` event with its duration; None for any other event (or "already
    present on machine": no pull)."""
    if obj.get("reason") != "Pulled":
        return None
    message = obj.get("message")
    m = _PULLED.search(message) if isinstance(message, str) else None
    if not m:
        return None
    when = next(
        (
            t
            for key in ("lastTimestamp", "eventTime", "firstTimestamp")
            if (t := _when(obj.get(key), f"Event {key}")) is not None
        ),
        None,
    )
    if when is None:
        return None
    try:
        took = parse_go_duration(m.group(2))
    except ValueError as exc:
        raise Malformed(str(exc)) from None
    if not 0.0 <= took <= _MAX_PULL_S:
        raise Malformed(f"a pull of {took!r} s")
    pod = _text(_obj(obj, "involvedObject", "Event").get("name"), "involvedObject.name")
    return PullRecord(pod, _text(m.group(1), "image"), when - took, when)


@dataclass
class KubeObjects:
    pods: list[PodRecord] = field(default_factory=list)
    pulls: list[PullRecord] = field(default_factory=list)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    claims: list[ClaimRecord] = field(default_factory=list)


def _items(doc: Any, skipped: Skipped) -> list[dict[str, Any]]:
    if isinstance(doc, dict) and "items" in doc:
        items = doc["items"]
        if not isinstance(items, list):
            skipped.add("List", "items is not a list")
            return []
        good = [i for i in items if isinstance(i, dict)]
        for _ in range(len(items) - len(good)):
            skipped.add("List item", "not an object")
        return good
    return [doc] if isinstance(doc, dict) else []


def sort_kube(docs: list[Any], skipped: Skipped | None = None) -> KubeObjects:
    """The Pods, Nodes, NodeClaims and kubelet Pulled events of ``docs``, each validated;
    one of the wrong shape is left out and counted in ``skipped``."""
    skipped = skipped if skipped is not None else Skipped()
    k = KubeObjects()
    for doc in docs:
        add_kube(k, doc, skipped)
    return k


def add_kube(k: KubeObjects, doc: Any, skipped: Skipped) -> None:
    """The objects of one document (an object or a ``List``) added to ``k``."""
    for obj in _items(doc, skipped):
        kind = obj.get("kind")
        try:
            if kind == "Pod":
                k.pods.append(pod_record(obj))
            elif kind == "Event":
                pull = pull_record(obj)
                if pull is not None:
                    k.pulls.append(pull)
            elif kind == "Node":
                node = node_record(obj)
                k.nodes[node.name] = node
            elif kind == "NodeClaim":
                k.claims.append(claim_record(obj))
        except Malformed as exc:
            skipped.add(str(kind), str(exc))


def from_pod(pod: PodRecord, k: KubeObjects) -> list[Phase]:
    """The phases Kubernetes recorded for one pod, its node's included."""
    out: list[Phase] = []

    def add(phase: str, start: float | None, end: float | None, detail: str = "") -> None:
        if start is not None and end is not None and end >= start:
            out.append(Phase(phase, start, end, "kubernetes", pod.name, detail))

    for claim in k.claims:
        if pod.node and claim.node == pod.node:
            c = claim.conditions
            add("node: launch", claim.created, c.get("Launched"), "Karpenter NodeClaim")
            add("node: register", c.get("Launched"), c.get("Registered"))
            add("node: initialize", c.get("Registered"), c.get("Initialized"))
    node = k.nodes.get(pod.node) if pod.node else None
    if node is not None and not any(p.name.startswith("node:") for p in out):
        add("node: boot to Ready", node.created, node.ready, pod.node)
    add("scheduling", pod.created, pod.conditions.get("PodScheduled"))
    for pull in k.pulls:
        if pull.pod == pod.name:
            add(f"image pull: {pull.image}", pull.start, pull.end)
    for name, began, ended in pod.init:
        add(f"init: {name}", began, ended)
    if pod.started:
        add("containers start to Ready", max(pod.started), pod.conditions.get("Ready"))
    if "Ready" in pod.conditions:
        ready = pod.conditions["Ready"]
        out.append(Phase("Ready", ready, ready, "kubernetes", pod.name))
    return out


# -- the server's log -------------------------------------------------------------------------

# What vLLM logs while it starts, and how its times are read: spotstart.timeline.serverlog.


def _phase(span: serverlog.LogSpan, pod: str) -> Phase:
    return Phase(
        span.name,
        _seconds(span.start, f"{span.name} start"),
        _seconds(span.end, f"{span.name} end"),
        "server-log",
        pod,
        span.detail,
    )


def log_phase(line: str, year: int, pod: str = "") -> Phase | None:
    """vLLM's timing line (``INFO 12-01 10:02:03 [...] Loading weights took 12.3 seconds``)
    as a Phase; None for any other line; Malformed for a timing line with an impossible time.
    Its time carries no year or zone: ``year`` given, UTC (vLLM's containers log UTC)."""
    try:
        span = serverlog.took_span(line, year)
    except serverlog.BadTime as exc:
        raise Malformed(str(exc)) from None
    return None if span is None else _phase(span, pod)


def from_server_log(text: str, year: int, pod: str = "") -> list[Phase]:
    """The phases of a vLLM log's text (:mod:`spotstart.timeline.serverlog`): its timing
    lines and the spans between its start-up lines; lines with impossible times left out."""
    reader = serverlog.ServerLogReader(year)
    out = []
    for line in text.splitlines():
        with contextlib.suppress(serverlog.BadTime, Malformed):
            out += [_phase(s, pod) for s in reader.feed(line)]
    with contextlib.suppress(Malformed):
        out += [_phase(s, pod) for s in reader.close()]
    return out


# -- reading files ----------------------------------------------------------------------------


def _lines(f: BinaryIO, skipped: Skipped, what: str) -> Iterator[tuple[int, str]]:
    """Each line of ``f`` (decoded, bad bytes replaced) with its number; a line over
    ``MAX_LINE_BYTES`` is passed over without being held, and counted."""
    number = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
            skipped.add(what, f"line {number} is over {MAX_LINE_BYTES} bytes")
            continue
        yield number, raw.decode("utf-8", "replace")


def _first_line(f: BinaryIO) -> str:
    """The first line that is not blank, bounded; the file is rewound."""
    try:
        while raw := f.readline(MAX_LINE_BYTES):
            if raw.strip():
                return raw.decode("utf-8", "replace").strip()
        return ""
    finally:
        f.seek(0)


def _kind_of(first: str) -> str:
    if not first.startswith(("{", "[")):
        return "log"
    if first.startswith("{"):
        try:
            doc = untrusted_json.parse(first, what="")
        except ValueError:
            return "json"
        if isinstance(doc, dict) and "phase" in doc:
            return "events"
    return "json"


def _read_events(
    f: BinaryIO, p: Path, pod: str | None, phases: list[Phase], skipped: Skipped
) -> None:
    good, bad = 0, Skipped()
    for number, line in _lines(f, bad, "events lines"):
        if not line.strip():
            continue
        try:
            phase = event_phase(untrusted_json.parse(line, what=f"{p.name}:{number}"))
        except untrusted_json.JSONRejected as exc:
            bad.add("events lines", str(exc))
            continue
        except Malformed as exc:
            bad.add("events lines", f"{p.name}:{number}: {exc}")
            continue
        good += 1
        if pod is None or phase.pod in ("", pod):
            phases.append(phase)
            if len(phases) > MAX_PHASES:
                raise UsageError(f"{p}: over {MAX_PHASES} phases; pick one pod with --pod")
    if not good and bad:
        first = next(iter(bad.first.values()))
        raise UsageError(f"{p}: neither Kubernetes JSON nor phase events ({first})")
    for kind, n in bad.counts.items():
        for _ in range(n):
            skipped.add(kind, bad.first[kind])


def _read_document(f: BinaryIO, p: Path) -> Any:
    data = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise UsageError(
            f"{p}: over {MAX_DOCUMENT_BYTES >> 20} MiB of JSON; narrow it "
            "(kubectl get pod NAME, or -l/--field-selector)"
        )
    try:
        return untrusted_json.parse(data.removeprefix(b"\xef\xbb\xbf"), what=str(p))
    except ValueError as exc:
        raise UsageError(f"neither Kubernetes JSON nor phase events: {exc}") from None


def _read_log(
    f: BinaryIO,
    p: Path,
    reader: serverlog.ServerLogReader,
    pod: str,
    phases: list[Phase],
    skipped: Skipped,
) -> None:
    def add(spans: list[serverlog.LogSpan], number: int) -> None:
        for span in spans:
            try:
                phases.append(_phase(span, pod))
            except Malformed as exc:
                skipped.add("log lines", f"{p.name}:{number}: {exc}")
        if len(phases) > MAX_PHASES:
            raise UsageError(f"{p}: over {MAX_PHASES} phases")

    number = 0
    for number, line in _lines(f, skipped, "log lines"):
        try:
            spans = reader.feed(line)
        except serverlog.BadTime as exc:
            skipped.add("log lines", f"{p.name}:{number}: {exc}")
            continue
        add(spans, number)
    add(reader.close(), number)


def _open_regular(p: Path) -> BinaryIO:
    """``p`` for reading if it is a regular file: a FIFO blocked the open for ever and a
    device (/dev/zero, /dev/urandom) was read as a log without end. UsageError otherwise."""
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{p}: not a regular file (save the output to a file first)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read(paths: list[Path], pod: str | None = None, year: int | None = None) -> Collected:
    """Every phase the files hold (each file's kind found from its first line: phase events,
    a Kubernetes JSON document, else a server log); with ``pod`` only that pod's (events
    without a pod name are kept: one process, one pod). Records of the wrong shape are left
    out and counted in ``skipped``; a file that holds nothing usable is a UsageError."""
    phases: list[Phase] = []
    skipped = Skipped()
    k = KubeObjects()
    logs: list[Path] = []
    for p in paths:
        try:
            with _open_regular(p) as f:
                kind = _kind_of(_first_line(f))
                if kind == "events":
                    _read_events(f, p, pod, phases, skipped)
                elif kind == "json":
                    add_kube(k, _read_document(f, p), skipped)
                else:
                    logs.append(p)
        except OSError as exc:
            raise UsageError(f"{p}: {exc.strerror or exc}") from None
    pods = [x for x in k.pods if pod is None or x.name == pod]
    if pod is not None and k.pods and not pods:
        raise UsageError(f"--pod {pod}: no such pod in the files")
    for x in pods:
        phases.extend(from_pod(x, k))
        if len(phases) > MAX_PHASES:
            raise UsageError(f"over {MAX_PHASES} phases; pick one pod with --pod")
    if logs:
        # vLLM's stamps carry no year: --year, else the year the other records begin in, else
        # this one (a log that would begin in the future is then last year's)
        latest = None
        if year is None:
            known = [x.created for x in pods] or [p.start for p in phases]
            if not known:
                latest = time.time()
            year = datetime.fromtimestamp(min(known or [time.time()]), UTC).year
        name = pods[0].name if len(pods) == 1 else ""
        for p in logs:
            try:
                with _open_regular(p) as f:
                    reader = serverlog.ServerLogReader(year, latest)
                    _read_log(f, p, reader, name, phases, skipped)
            except OSError as exc:
                raise UsageError(f"{p}: {exc.strerror or exc}") from None
    if pod is not None:
        phases = [p for p in phases if p.pod in ("", pod)]
    if not phases:
        raise UsageError("no phases found in the files (events, Kubernetes JSON, server logs)")
    return Collected(sorted(engine_phases(phases), key=lambda p: (p.start, p.end)), skipped)


# -- the engine's start: warm or cold --------------------------------------------------------

ENGINE_INIT = "engine-init"  # the guard's event: the server's start to its first ready
CACHE_RESTORE = "engine-cache-restore"  # spotstart.enginecache's event
LOG_ENGINE_INIT = "server: engine-init"  # vLLM's "init engine (...) took N s"
_TEMPERATURES = ("warm", "cold")


def engine_phases(phases: list[Phase]) -> list[Phase]:
    """The guard's ``engine-init`` events named by their temperature (``engine-init
    (warm)``: the cache restore was a hit), vLLM's engine-init span inside one named the same
    way, and the guard's ``server-start`` cut at the first cache restore or engine start
    inside it, so that the restore shows as its own phase on the critical path (the critical
    path takes the phase that started first: uncut, server-start hid both).

    Near-linear in the phases (sorted lookups per pod): an events file or a rollout of many
    pods, up to MAX_PHASES, costs no pairwise comparison of every phase with every other."""
    inits = [
        (i, p)
        for i, p in enumerate(phases)
        if p.source == "spotstart" and p.name == ENGINE_INIT and p.detail in _TEMPERATURES
    ]
    init_at = {i for i, _ in inits}
    inits_by_pod = _by_pod(p for _, p in inits)
    starts_by_pod = _by_pod(
        p for p in phases if p.source == "spotstart" and p.name in (ENGINE_INIT, CACHE_RESTORE)
    )
    out = []
    for n, p in enumerate(phases):
        if n in init_at:
            p = Phase(f"{p.name} ({p.detail})", p.start, p.end, p.source, p.pod, p.detail)
        elif p.source == "server-log" and p.name == LOG_ENGINE_INIT:
            temp = _first_overlap(inits_by_pod, p)
            if temp is not None:
                p = Phase(f"{p.name} ({temp})", p.start, p.end, p.source, p.pod, p.detail)
        elif p.source == "spotstart" and p.name == "server-start":
            inside = _first_start_within(starts_by_pod, p)
            if inside is not None:
                p = Phase(
                    p.name,
                    p.start,
                    inside,
                    p.source,
                    p.pod,
                    "the guard's start until the engine cache restore or the server's start",
                )
        out.append(p)
    return out


class _Sorted:
    """Phases of one pod sorted by start, with the running maximum of their ends."""

    def __init__(self, phases: list[Phase]) -> None:
        self.phases = sorted(phases, key=lambda p: p.start)
        self.starts = [p.start for p in self.phases]
        self.max_end: list[float] = []
        for p in self.phases:
            self.max_end.append(max(p.end, self.max_end[-1]) if self.max_end else p.end)


def _by_pod(phases: Iterable[Phase]) -> dict[str, _Sorted]:
    groups: dict[str, list[Phase]] = {}
    for p in phases:
        groups.setdefault(p.pod, []).append(p)
    return {pod: _Sorted(group) for pod, group in groups.items()}


def _pods_of(by_pod: dict[str, _Sorted], p: Phase) -> list[_Sorted]:
    """The groups of the pods p may belong with: its own and the unnamed one; every pod
    for a phase without a pod."""
    if not p.pod:
        return list(by_pod.values())
    return [g for pod in dict.fromkeys((p.pod, "")) if (g := by_pod.get(pod)) is not None]


def _first_overlap(by_pod: dict[str, _Sorted], p: Phase) -> str | None:
    """The detail of the earliest-starting engine-init of p's pod that overlaps p."""
    best: Phase | None = None
    for g in _pods_of(by_pod, p):
        hi = bisect.bisect_right(g.starts, p.end)  # candidates start no later than p's end
        if hi == 0 or g.max_end[hi - 1] < p.start:
            continue
        # the first of them (by start) whose end reaches p's start: max_end is monotone
        j = bisect.bisect_left(g.max_end, p.start, 0, hi)
        while j < hi and g.phases[j].end < p.start:
            j += 1
        if j < hi and (best is None or g.phases[j].start < best.start):
            best = g.phases[j]
    return best.detail if best is not None else None


def _first_start_within(by_pod: dict[str, _Sorted], p: Phase) -> float | None:
    """The earliest start of a restore or engine-init of p's pod inside [p.start, p.end]."""
    found = [
        g.starts[i]
        for g in _pods_of(by_pod, p)
        if (i := bisect.bisect_left(g.starts, p.start)) < len(g.starts) and g.starts[i] <= p.end
    ]
    return min(found) if found else None


def collect(paths: list[Path], pod: str | None = None, year: int | None = None) -> list[Phase]:
    """The phases of :func:`read`, without what was skipped."""
    return read(paths, pod, year).phases


# -- the critical path ------------------------------------------------------------------------


def critical_path(phases: list[Phase], tol_s: float = 0.5) -> list[Phase]:
    """From the end (Ready, or the last phase's end) back to the first start: at each point
    the phase covering it (ending within ``tol_s`` of it) that started earliest, cut to end
    where the next one took over; a stretch no phase covers is a gap phase ("(unaccounted)").
    Contiguous, in time order: the durations add up to the whole."""
    spans = [p for p in phases if p.seconds > 0]
    if not spans:
        return []
    ready = [p.start for p in phases if p.name == "Ready"]
    t = max(ready) if ready else max(p.end for p in spans)
    first = min(p.start for p in spans)
    path: list[Phase] = []
    while t > first + 1e-9:
        covering = [p for p in spans if p.start < t - 1e-9 and p.end >= t - tol_s]
        if covering:
            best = min(covering, key=lambda p: (p.start, -p.end))
            # its share of the path: from its start to where the next one took over
            path.append(Phase(best.name, best.start, t, best.source, best.pod, best.detail))
            t = best.start
            continue
        earlier = [p for p in spans if p.end < t - tol_s]
        if not earlier:
            break
        prev = max(earlier, key=lambda p: p.end)
        path.append(Phase("(unaccounted)", prev.end, t, "gap", prev.pod))
        t = prev.end
    return list(reversed(path))


def summary(phases: list[Phase]) -> dict[str, Any]:
    path = critical_path(phases)
    total = (path[-1].end - path[0].start) if path else 0.0
    return {
        "start": path[0].start if path else None,
        "total_s": round(total, 3),
        "phases": [asdict(p) | {"seconds": round(p.seconds, 3)} for p in phases],
        "critical_path": [
            {
                "name": p.name,
                "seconds": round(p.seconds, 3),
                "share": round(p.seconds / total, 4) if total else 0.0,
                "source": p.source,
            }
            for p in path
        ],
    }


# -- pictures ---------------------------------------------------------------------------------

COLORS = {
    "kubernetes": "#4c72b0",
    "spotstart": "#55a868",
    "server-log": "#c44e52",
    "gap": "#bbbbbb",
}
# the engine's start by temperature, and the cache restore: whatever their source
PHASE_COLORS = {"(warm)": "#f0a030", "(cold)": "#5a8fd8", CACHE_RESTORE: "#8c6bb1"}


def color(p: Phase) -> str:
    """A phase's fill: warm and cold engine starts and the cache restore stand out."""
    for mark, fill in PHASE_COLORS.items():
        if p.name.endswith(mark) or p.name == mark:
            return fill
    return COLORS.get(p.source, "#8172b2")


def chrome_trace(phases: list[Phase]) -> dict[str, Any]:
    """Trace Event Format: complete ("X") events in microseconds from the first start."""
    t0 = min(p.start for p in phases)
    events = [
        {
            "name": p.name,
            "cat": p.source,
            "ph": "X" if p.seconds > 0 else "i",
            "ts": round((p.start - t0) * 1e6),
            **({"dur": round(p.seconds * 1e6)} if p.seconds > 0 else {"s": "p"}),
            "pid": p.pod or "node",
            "tid": p.source,
            "args": {"detail": p.detail, "start_unix": p.start},
        }
        for p in phases
    ]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


# Rows of the PNG: each is 50 pixels of a picture drawn whole in memory (2,000 rows made a
# 1210x99176 image: 1 GB and 35 s; the 10,000 phases a timeline may hold, gigabytes).
MAX_PNG_ROWS = 200


def _png_rows(rows: list[Phase], crit: set[tuple[str, float]]) -> list[Phase]:
    """At most MAX_PNG_ROWS of ``rows``, in their order: the critical path's first, then
    the longest of the others."""
    if len(rows) <= MAX_PNG_ROWS:
        return rows
    ranked = sorted(
        range(len(rows)),
        key=lambda i: ((rows[i].name, rows[i].start) not in crit, -rows[i].seconds),
    )
    return [rows[i] for i in sorted(ranked[:MAX_PNG_ROWS])]


def write_png(phases: list[Phase], path: Path, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "the PNG needs matplotlib: pip install 'spotstart[plan]' (HTML and trace need none)"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(p.start for p in phases)
    crit = {(p.name, p.start) for p in critical_path(phases)}
    rows = [p for p in phases if p.seconds > 0]
    shown = _png_rows(rows, crit)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(shown) + 1.6))
    for i, p in enumerate(shown):
        ax.barh(
            i,
            p.seconds,
            left=p.start - t0,
            color=color(p),
            edgecolor="black" if (p.name, p.start) in crit else "none",
            linewidth=1.5,
        )
        ax.text(p.end - t0, i, f" {p.seconds:.1f}s", va="center", fontsize=8)
    for p in phases:
        if p.name == "Ready":
            ax.axvline(p.start - t0, color="black", linestyle="--", linewidth=1)
    # "$" opens matplotlib's mathtext: names from the files are shown as written
    labels = [(f"{p.name} ({p.pod})" if p.pod else p.name).replace("$", r"\$") for p in shown]
    ax.set_yticks(range(len(shown)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the first phase (black edge: critical path)")
    heading = (title or "cold start timeline").replace("$", r"\$")
    if len(shown) < len(rows):
        heading += f"\n{len(shown)} of {len(rows)} phases: all in timeline.html and the trace"
    ax.set_title(heading)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    safefs.write_output(path, buf.getvalue())  # atomic, and never through a link


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def html(phases: list[Phase], title: str = "") -> str:
    """One self-contained page: an SVG Gantt chart and the critical path's table."""
    t0 = min(p.start for p in phases)
    span = max(p.end for p in phases) - t0 or 1.0
    rows = [p for p in phases if p.seconds > 0]
    width, left, row_h = 900, 260, 22
    scale = (width - left - 60) / span
    crit = {(p.name, p.start) for p in critical_path(phases)}
    bars = []
    for i, p in enumerate(rows):
        y = 10 + i * row_h
        x = left + (p.start - t0) * scale
        w = max(1.0, p.seconds * scale)
        stroke = ' stroke="black" stroke-width="2"' if (p.name, p.start) in crit else ""
        label = _esc(f"{p.name} ({p.pod})" if p.pod else p.name)
        bars.append(
            f'<text x="{left - 6}" y="{y + 15}" text-anchor="end" font-size="12">{label}</text>'
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 6}" '
            f'fill="{color(p)}"{stroke}>'
            f"<title>{_esc(p.detail or p.name)}: {p.seconds:.2f} s</title></rect>"
            f'<text x="{x + w + 4:.1f}" y="{y + 14}" font-size="11">{p.seconds:.1f}s</text>'
        )
    height = 30 + len(rows) * row_h
    s = summary(phases)
    table = "".join(
        f"<tr><td>{_esc(c['name'])}</td><td>{c['seconds']:.1f}</td>"
        f"<td>{100 * c['share']:.0f}%</td></tr>"
        for c in s["critical_path"]
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        + _esc(title or "spotstart timeline")
        + "</title></head><body style='font-family:sans-serif'>"
        + f"<h2>{_esc(title or 'cold start timeline')}</h2>"
        + f"<p>{s['total_s']:.1f} s from the first phase to Ready; black outline: the "
        "critical path.</p>"
        + f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>"
        + "".join(bars)
        + "</svg><h3>Critical path</h3><table border='1' cellpadding='4'>"
        + "<tr><th>phase</th><th>s</th><th>share</th></tr>"
        + table
        + "</table></body></html>\n"
    )


def write_all(phases: list[Phase], out: Path, title: str = "") -> dict[str, Path]:
    """timeline.png, timeline.html, timeline.trace.json and timeline.json under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "png": out / "timeline.png",
        "html": out / "timeline.html",
        "trace": out / "timeline.trace.json",
        "json": out / "timeline.json",
    }
    # Each written atomically, never through a link at its name (spotstart.safefs).
    safefs.write_output(paths["html"], html(phases, title))
    safefs.write_output(paths["trace"], json.dumps(chrome_trace(phases)))
    safefs.write_output(paths["json"], json.dumps(summary(phases), indent=1))
    write_png(phases, paths["png"], title)  # last: the one that needs matplotlib
    return paths
