"""`spotstart timeline`: where every second of a replica's start went, from three sources
merged on one clock:

- spotstart's phase events (:mod:`spotstart.events`: fetch, load, guard's server start and
  drain), JSON lines;
- what Kubernetes records, as ``kubectl get -o json`` writes it (a Pod, Event, Node or
  Karpenter NodeClaim, a ``List`` or ``*List`` of them): the Node's creation and Ready
  condition, the NodeClaim's Launched/Registered/Initialized conditions, the Pod's creation,
  PodScheduled, init containers' start/finish, containers' start and the Ready condition, and
  the kubelet's ``Pulled`` event ("Successfully pulled image ... in 11m2.3s");
- the server's log: vLLM's "Loading weights took", "Model loading took ... and X seconds",
  "init engine (...) took" lines.

The phases, the critical path from the first start to Ready (each phase's share, gaps named
as such), and the picture: PNG (matplotlib), self-contained HTML (inline SVG), Chrome trace
JSON (opens in Perfetto / chrome://tracing). Pure except the readers of files and writers."""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spotstart import safefs
from spotstart.errors import UsageError


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
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"not an RFC 3339 time: {text!r}") from exc


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_go_duration(text: str) -> float:
    """Seconds of a Go ``time.Duration`` string, as the kubelet prints it (``11m2.345s``)."""
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


# -- spotstart's events -----------------------------------------------------------------------


def from_events(text: str) -> list[Phase]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        e = json.loads(line)
        if not isinstance(e, dict) or "phase" not in e:
            raise ValueError("not a spotstart phase event")
        detail = str(e.get("detail") or "")
        if e.get("bytes"):
            detail = f"{int(e['bytes']) / 1e9:.2f} GB; {detail}".rstrip("; ")
        out.append(
            Phase(
                str(e["phase"]),
                float(e["start"]),
                float(e["end"]),
                "spotstart",
                str(e.get("pod") or ""),
                detail,
            )
        )
    return out


# -- Kubernetes objects -----------------------------------------------------------------------


def _items(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, dict) and isinstance(doc.get("items"), list):
        return [i for i in doc["items"] if isinstance(i, dict)]
    return [doc] if isinstance(doc, dict) else []


def _conditions(obj: dict[str, Any]) -> dict[str, float]:
    out = {}
    for c in obj.get("status", {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("lastTransitionTime"):
            out[str(c["type"])] = parse_time(c["lastTransitionTime"])
    return out


_PULLED = re.compile(r'Successfully pulled image "([^"]+)" in ([0-9a-zµ.]+)')


@dataclass
class KubeObjects:
    pods: list[dict[str, Any]]
    events: list[dict[str, Any]]
    nodes: dict[str, dict[str, Any]]
    nodeclaims: list[dict[str, Any]]


def sort_kube(docs: list[Any]) -> KubeObjects:
    k = KubeObjects([], [], {}, [])
    for doc in docs:
        for obj in _items(doc):
            kind = obj.get("kind", "")
            if kind == "Pod":
                k.pods.append(obj)
            elif kind == "Event":
                k.events.append(obj)
            elif kind == "Node":
                k.nodes[obj["metadata"]["name"]] = obj
            elif kind == "NodeClaim":
                k.nodeclaims.append(obj)
    return k


def from_pod(pod: dict[str, Any], k: KubeObjects) -> list[Phase]:
    """The phases Kubernetes recorded for one pod, its node's included."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    name = str(meta.get("name", ""))
    created = parse_time(meta["creationTimestamp"])
    cond = _conditions(pod)
    out: list[Phase] = []

    def add(phase: str, start: float | None, end: float | None, detail: str = "") -> None:
        if start is not None and end is not None and end >= start:
            out.append(Phase(phase, start, end, "kubernetes", name, detail))

    node_name = spec.get("nodeName")
    for claim in k.nodeclaims:
        if claim.get("status", {}).get("nodeName") == node_name:
            c = _conditions(claim)
            made = parse_time(claim["metadata"]["creationTimestamp"])
            add("node: launch", made, c.get("Launched"), "Karpenter NodeClaim")
            add("node: register", c.get("Launched"), c.get("Registered"))
            add("node: initialize", c.get("Registered"), c.get("Initialized"))
    node = k.nodes.get(node_name or "")
    if node is not None and not any(p.name.startswith("node:") for p in out):
        made = parse_time(node["metadata"]["creationTimestamp"])
        add("node: boot to Ready", made, _conditions(node).get("Ready"), str(node_name))
    add("scheduling", created, cond.get("PodScheduled"))
    for ev in k.events:
        involved = ev.get("involvedObject", {})
        if involved.get("name") != name or ev.get("reason") != "Pulled":
            continue
        m = _PULLED.search(ev.get("message", ""))
        if not m:
            continue  # "already present on machine": no pull
        when = ev.get("lastTimestamp") or ev.get("eventTime") or ev.get("firstTimestamp")
        if not when:
            continue
        end = parse_time(str(when))
        add(f"image pull: {m.group(1)}", end - parse_go_duration(m.group(2)), end)
    for c in status.get("initContainerStatuses") or []:
        t = (c.get("state") or {}).get("terminated") or {}
        if t.get("startedAt") and t.get("finishedAt"):
            add(f"init: {c['name']}", parse_time(t["startedAt"]), parse_time(t["finishedAt"]))
    started = [
        parse_time(s["state"]["running"]["startedAt"])
        for s in status.get("containerStatuses") or []
        if (s.get("state") or {}).get("running", {}).get("startedAt")
    ]
    if started:
        add("containers start to Ready", max(started), cond.get("Ready"))
    if "Ready" in cond:
        out.append(Phase("Ready", cond["Ready"], cond["Ready"], "kubernetes", name))
    return out


# -- the server's log -------------------------------------------------------------------------

_VLLM = re.compile(
    r"(?P<mo>\d{2})-(?P<d>\d{2}) (?P<t>\d{2}:\d{2}:\d{2})(?:\.\d+)?\b.*?"
    r"(?P<what>Loading weights took|Model loading took .*? and|init engine \(.*?\) took)"
    r" (?P<s>\d+(?:\.\d+)?) ?s(?:econds)?"
)
_NAMES = {
    "Loading": "server: load weights",
    "Model": "server: model loading",
    "init": "server: init engine",
}


def from_server_log(text: str, year: int, pod: str = "") -> list[Phase]:
    """vLLM's timing lines (``INFO 12-01 10:02:03 [...] Loading weights took 12.3 seconds``);
    their times carry no year or zone: ``year`` given, UTC (vLLM's containers log UTC)."""
    out = []
    for line in text.splitlines():
        m = _VLLM.search(line)
        if not m:
            continue
        end = (
            datetime.strptime(f"{year}-{m['mo']}-{m['d']} {m['t']}", "%Y-%m-%d %H:%M:%S")
            .replace(tzinfo=UTC)
            .timestamp()
        )
        name = _NAMES[m["what"].split()[0]]
        out.append(Phase(name, end - float(m["s"]), end, "server-log", pod, line.strip()[:160]))
    return out


# -- reading files ----------------------------------------------------------------------------


def collect(paths: list[Path], pod: str | None = None, year: int | None = None) -> list[Phase]:
    """Every phase the files hold (kind found from each file's content); with ``pod`` only
    that pod's (events without a pod name are kept: one process, one pod)."""
    phases: list[Phase] = []
    docs: list[Any] = []
    logs: list[str] = []
    for p in paths:
        try:
            text = p.read_text()
        except OSError as exc:
            raise UsageError(f"{p}: {exc.strerror}") from None
        head = text.lstrip()[:1]
        if head in ("{", "["):
            try:
                doc = json.loads(text)
            except json.JSONDecodeError:
                doc = None
            if doc is not None and isinstance(doc, dict) and "phase" not in doc:
                docs.append(doc)
                continue
            try:
                phases.extend(from_events(text))
                continue
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{p}: neither Kubernetes JSON nor phase events ({exc})") from None
        logs.append(text)
    k = sort_kube(docs)
    pods = [x for x in k.pods if pod is None or x.get("metadata", {}).get("name") == pod]
    if pod is not None and k.pods and not pods:
        raise UsageError(f"--pod {pod}: no such pod in the files")
    try:
        for x in pods:
            phases.extend(from_pod(x, k))
    except (KeyError, ValueError) as exc:
        raise UsageError(f"Kubernetes objects: {exc}") from None
    if logs:
        if year is None:
            created = [parse_time(x["metadata"]["creationTimestamp"]) for x in pods]
            year = datetime.fromtimestamp(
                min(created)
                if created
                else phases[0].start
                if phases
                else datetime.now(UTC).timestamp(),
                UTC,
            ).year
        name = pods[0]["metadata"]["name"] if len(pods) == 1 else ""
        for text in logs:
            phases.extend(from_server_log(text, year, name))
    if pod is not None:
        phases = [p for p in phases if p.pod in ("", pod)]
    if not phases:
        raise UsageError("no phases found in the files (events, Kubernetes JSON, server logs)")
    return sorted(phases, key=lambda p: (p.start, p.end))


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
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.6))
    for i, p in enumerate(rows):
        ax.barh(
            i,
            p.seconds,
            left=p.start - t0,
            color=COLORS.get(p.source, "#8172b2"),
            edgecolor="black" if (p.name, p.start) in crit else "none",
            linewidth=1.5,
        )
        ax.text(p.end - t0, i, f" {p.seconds:.1f}s", va="center", fontsize=8)
    for p in phases:
        if p.name == "Ready":
            ax.axvline(p.start - t0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [f"{p.name} ({p.pod})" if p.pod else p.name for p in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the first phase (black edge: critical path)")
    ax.set_title(title or "cold start timeline")
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
            f'fill="{COLORS.get(p.source, "#8172b2")}"{stroke}>'
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
