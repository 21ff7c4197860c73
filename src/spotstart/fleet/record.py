"""Your own fleet as a spot-capacity trace: what a running fleet observed per zone (spot
replicas alive, preemption notices, a spot pod unschedulable for want of capacity) in, one
trace file per zone in the format `spotstart plan` replays out, with the ``fleet.yaml`` that
replays them. `TraceRecorder` is the pure tick logic; `TraceDirectory` is the only I/O. Not a
reader of public traces (`traces.py`), nor a watcher of anything (the controller and
`spotstart plan record` feed it).

What ``k`` means in a recorded trace (plan's ``capacity: count`` reading: ``k`` spot nodes
obtainable in that zone during the tick; more live spot replicas than ``k`` are preempted, a
launch beyond ``k`` fails):

* **exhausted** ticks, where the zone showed it had no more: a preemption notice in the zone,
  or a spot pod unschedulable (for longer than the stockout delay) while the zone was one the
  pod could go to: ``k`` = the fewest spot replicas alive in the zone during the tick. A replay
  holding more there is preempted down to it; one asking for more fails, as ours did.
* other ticks: the zone granted every node we asked for and more may have been there; ``k`` =
  max(the most spot replicas alive in the tick, ``assumed_nodes``). ``assumed_nodes`` (the
  fleet's target by default) is the recording's assumption, written in the metadata: a policy
  replayed on the trace may hold up to that many spot replicas in a zone that never said no.
* ticks with no observation at all (the recorder was not running: between a restart and its
  first observation) repeat the zone's last recorded ``k``; counted as ``filled_ticks``.

Memory: one 4-byte int per zone per tick (``MAX_TICKS`` x ``MAX_ZONES`` x 4 B = 38 MB at most;
a month at 60 s in two zones is 346 KB); a file is rewritten whole on each flush.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import secrets
import stat
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotstart import safefs, untrusted_json
from spotstart.errors import DiskFull, LocalIOError, UnsafePath
from spotstart.fleet.config import check_target
from spotstart.fleet.errors import ConfigError

FORMAT = "spotstart-record/1"
# A zone name becomes a file name: a DNS label ([a-z0-9-], no dash at either end, 63 at most),
# as the clouds' zone names are (us-east1-b, us-east-1a, eastus-1). Nothing else is written.
ZONE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_ZONES = 16
MAX_TICKS = 600_000  # a year at 60 s is 525,600
# plan reads traces ticking 1 s to a day (fleet.traces.MIN/MAX_GAP_SECONDS; not imported:
# that module brings numpy, this one is the controller's)
MIN_GAP_S = 1.0
MAX_GAP_S = 86_400.0
MAX_NODES = 2**31 - 1  # a tick's k, held as a 32-bit int
CONFIG_NAME = "fleet.yaml"
CONFIG_MARK = b"# Recorded by spotstart"  # the first bytes of every fleet.yaml a recording writes
LOCK_NAME = ".record.lock"
# What a resumed trace file may hold: MAX_TICKS numbers (up to 7 characters and a comma each)
# and its metadata.
MAX_FILE_BYTES = MAX_TICKS * 8 + (64 << 10)


# TraceDirectory._write's temporary names: .NAME.PID.HEX8.tmp
_TMP = re.compile(r"\.(?:[a-z0-9-]{1,63}\.json|fleet\.yaml)\.[0-9]+\.[0-9a-f]{8}\.tmp")


class RecordError(ConfigError):
    """A recording cannot be made or resumed: a zone name that cannot be a file name, too many
    zones, a directory recorded with another tick or by another process (exit code 2)."""


class RecordingBusy(RecordError):
    """Another process holds the recording's lock (a controller standby waits for it)."""


def check_zone(name: object) -> str:
    """``name`` if it can name a zone's trace file; RecordError otherwise (never sanitised into
    another name: two zones must not share a file)."""
    if not isinstance(name, str) or not ZONE_NAME.fullmatch(name):
        shown = repr(name)[:80]
        raise RecordError(
            f"zone {shown}: not a recordable zone name (lowercase letters, digits and '-', "
            "1-63 characters, no '-' at either end)"
        )
    return name


@dataclass(frozen=True)
class ZoneObservation:
    """What the fleet showed of one zone at one moment. ``spot_alive``: our spot replicas on a
    node in the zone and not under notice (ready or still starting: either way the zone
    granted the node); ``notices``: preemption notices first seen since the last observation;
    ``unschedulable``: a spot pod that could go to this zone has found no node for longer than
    the stockout delay."""

    zone: str
    spot_alive: int
    notices: int = 0
    unschedulable: bool = False


@dataclass
class ZoneStats:
    """Per zone totals kept in the trace's metadata."""

    notices: int = 0
    unschedulable_seconds: float = 0.0
    exhausted_ticks: int = 0
    filled_ticks: int = 0


@dataclass
class _Zone:
    data: array[int]
    stats: ZoneStats = field(default_factory=ZoneStats)
    alive: int | None = None  # the last observed count; None: not observed since (re)start
    unschedulable: bool = False
    tick_min: int | None = None
    tick_max: int | None = None
    tick_exhausted: bool = False

    def open_tick(self) -> None:
        self.tick_min = self.tick_max = self.alive
        self.tick_exhausted = self.unschedulable


class TraceRecorder:
    """Observations in, ticks of ``gap_s`` out, one ``k`` per zone per tick (module docstring).

    Tick ``i`` covers ``[start_s + i * gap_s, start_s + (i + 1) * gap_s)``; it is closed (its
    ``k`` final) once an observation or :meth:`close_until` passes its end. Observations are
    states: a zone's alive count and its unschedulable flag hold until observed again.
    ``history`` (zone -> recorded ``k``, all of one length) resumes a recording.

    Example::

        rec = TraceRecorder(["us-east1-b"], gap_s=60, start_s=t0, assumed_nodes=2)
        rec.observe(t0 + 5, [ZoneObservation("us-east1-b", spot_alive=2)])
        rec.observe(t0 + 70, [ZoneObservation("us-east1-b", spot_alive=1, notices=1)])
        rec.close_until(t0 + 120)
        rec.data("us-east1-b")  # [2, 1]: the first tick never said no, the second did
    """

    def __init__(
        self,
        zones: Sequence[str],
        *,
        gap_s: float,
        start_s: float,
        assumed_nodes: int,
        history: Mapping[str, Sequence[int]] | None = None,
        stats: Mapping[str, ZoneStats] | None = None,
        max_ticks: int = MAX_TICKS,
    ) -> None:
        if not MIN_GAP_S <= gap_s <= MAX_GAP_S:  # NaN too
            raise RecordError(
                f"record gap: must be {MIN_GAP_S:g} to {MAX_GAP_S:g} s (a tick plan reads), "
                f"got {gap_s!r}"
            )
        if not math.isfinite(start_s):
            raise RecordError(f"record start: not a time ({start_s!r})")
        if not 0 <= assumed_nodes <= MAX_NODES:
            # a tick's k is a 32-bit int: more raised OverflowError at the first tick closed,
            # in the controller at every reconcile (no scaling at all)
            raise RecordError(
                f"assumed nodes: must be 0 to {MAX_NODES:,} per zone, got {assumed_nodes}"
            )
        history = history or {}
        names = list(dict.fromkeys([*zones, *history]))
        if not names:
            raise RecordError("record: no zones to record")
        if len(names) > MAX_ZONES:
            raise RecordError(f"record: {len(names)} zones, at most {MAX_ZONES} are recorded")
        for name in names:
            check_zone(name)
        lengths = {len(v) for v in history.values()}
        if len(lengths) > 1:
            raise RecordError("record: resumed zone traces differ in length")
        done = lengths.pop() if lengths else 0
        if done > max_ticks:
            raise RecordError(f"record: {done} ticks recorded, over the {max_ticks} tick limit")
        self.gap_s = float(gap_s)
        self.start_s = float(start_s)
        self.assumed_nodes = int(assumed_nodes)
        self.max_ticks = max_ticks
        self.full = False  # max_ticks reached: later observations are dropped
        self._zones: dict[str, _Zone] = {}
        for name in names:
            past = history.get(name)
            data = array("i", past if past is not None else [self.assumed_nodes] * done)
            z = _Zone(
                data, ZoneStats(**vars(stats[name])) if stats and name in stats else ZoneStats()
            )
            if past is None:
                z.stats.filled_ticks += done
            z.open_tick()
            self._zones[name] = z
        self._ticks = done
        self._last_s = self._tick_start(done)

    @property
    def zones(self) -> tuple[str, ...]:
        return tuple(self._zones)

    @property
    def ticks(self) -> int:
        """Ticks closed (recorded) so far."""
        return self._ticks

    def data(self, zone: str) -> list[int]:
        return list(self._zones[zone].data)

    def stats(self, zone: str) -> ZoneStats:
        return self._zones[zone].stats

    def end_s(self) -> float:
        """The end of the last closed tick."""
        return self._tick_start(self._ticks)

    def _tick_start(self, i: int) -> float:
        return self.start_s + i * self.gap_s

    def _advance(self, at_s: float) -> None:
        """Account unschedulable time up to ``at_s`` (within the open tick)."""
        dt = at_s - self._last_s
        if dt > 0:
            for z in self._zones.values():
                if z.unschedulable:
                    z.stats.unschedulable_seconds += dt
            self._last_s = at_s

    def close_until(self, at_s: float) -> int:
        """Close every tick that ends at or before ``at_s``; returns how many closed."""
        closed = 0
        while not self.full and self._tick_start(self._ticks + 1) <= at_s:
            self._advance(self._tick_start(self._ticks + 1))
            for z in self._zones.values():
                z.data.append(self._k(z))
                z.open_tick()
            self._ticks += 1
            closed += 1
            if self._ticks >= self.max_ticks:
                self.full = True
        return closed

    def _k(self, z: _Zone) -> int:
        if z.tick_min is None or z.tick_max is None:
            z.stats.filled_ticks += 1
            return z.data[-1] if len(z.data) else self.assumed_nodes
        if z.tick_exhausted:
            z.stats.exhausted_ticks += 1
            return z.tick_min
        return max(z.tick_max, self.assumed_nodes)

    def observe(self, at_s: float, observations: Iterable[ZoneObservation]) -> int:
        """Apply what was seen at ``at_s`` (unix seconds); returns the ticks it closed. A time
        before the recording's start or before an earlier observation (a clock stepped back)
        counts as the latest time seen; a zone not being recorded is ignored (the caller
        chose the zones; names from outside never add one)."""
        at_s = max(at_s, self._last_s) if math.isfinite(at_s) else self._last_s
        closed = self.close_until(at_s)
        if self.full:
            return closed
        self._advance(at_s)
        for o in observations:
            z = self._zones.get(o.zone)
            if z is None:
                continue
            alive = min(max(0, int(o.spot_alive)), MAX_NODES)
            z.alive = alive
            z.tick_min = alive if z.tick_min is None else min(z.tick_min, alive)
            z.tick_max = alive if z.tick_max is None else max(z.tick_max, alive)
            if o.notices > 0:
                z.stats.notices += o.notices
                z.tick_exhausted = True
            z.unschedulable = o.unschedulable
            if o.unschedulable:
                z.tick_exhausted = True
        return closed

    def metadata(self, zone: str, source: str) -> dict[str, Any]:
        """The trace file's metadata: ``gap_seconds`` (what plan reads) and the recording's."""
        s = self._zones[zone].stats
        return {
            "gap_seconds": self.gap_s,
            "format": FORMAT,
            "source": source,
            "zone": zone,
            "start_unix": self.start_s,
            "end_unix": self.end_s(),
            "assumed_nodes": self.assumed_nodes,
            "notices": s.notices,
            "unschedulable_seconds": round(s.unschedulable_seconds, 3),
            "exhausted_ticks": s.exhausted_ticks,
            "filled_ticks": s.filled_ticks,
        }


@dataclass(frozen=True)
class NodeLife:
    """One guard's server on one node: ready from ``ready_s`` until ``ended_s`` (None: still
    up when the log ends); ``preempted`` when a preemption notice ended it."""

    zone: str
    ready_s: float
    ended_s: float | None = None
    preempted: bool = False


# Drain causes that are the cloud taking the node back. A drain event without a ``notice`` key
# comes from a guard older than that key: counted as a preemption (a spot node's guard drains
# mostly for that); a plain SIGTERM (a rollout, a scale-down) is "termination" and is not.
PREEMPTION_NOTICES = frozenset({"preemption", None})


def lives_from_events(zone: str, events: Iterable[Mapping[str, Any]]) -> list[NodeLife]:
    """The lives of one node's server from its guard's phase events (`spotstart.events`):
    ready at a ``server-start``'s end, ended at a ``drain``'s start (the notice) or at the next
    ``server-start``'s start (the guard began again: the last one died without a drain)."""
    lives: list[NodeLife] = []
    up: float | None = None
    for e in sorted(events, key=lambda e: float(e["start"])):
        if e.get("phase") == "server-start":
            if up is not None:
                lives.append(NodeLife(zone, up, max(up, float(e["start"]))))
            up = float(e["end"])
        elif e.get("phase") == "drain" and up is not None:
            ended = max(up, float(e["start"]))
            lives.append(NodeLife(zone, up, ended, e.get("notice") in PREEMPTION_NOTICES))
            up = None
    if up is not None:
        lives.append(NodeLife(zone, up))
    return lives


def record_lives(rec: TraceRecorder, lives: Sequence[NodeLife], until_s: float) -> None:
    """Feed ``rec`` the alive count of each zone at every change ``lives`` make, then close
    the ticks that end by ``until_s``. Guard logs carry no unschedulable time: a zone says no
    only through its notices."""
    changes: list[tuple[float, str, int, bool]] = []
    for life in lives:
        changes.append((life.ready_s, life.zone, 1, False))
        if life.ended_s is not None:
            changes.append((life.ended_s, life.zone, -1, life.preempted))
    changes.sort(key=lambda c: (c[0], c[2]))  # at one time: the ends first
    alive = dict.fromkeys(rec.zones, 0)
    rec.observe(rec.start_s, [ZoneObservation(z, 0) for z in rec.zones])
    i = 0
    while i < len(changes):
        at = changes[i][0]
        notices = dict.fromkeys(rec.zones, 0)
        touched: set[str] = set()
        while i < len(changes) and changes[i][0] == at:
            _, zone, delta, preempted = changes[i]
            if zone in alive:
                alive[zone] = max(0, alive[zone] + delta)
                notices[zone] += int(preempted)
                touched.add(zone)
            i += 1
        rec.observe(at, [ZoneObservation(z, alive[z], notices[z]) for z in sorted(touched)])
    rec.close_until(until_s)


def plan_config_text(
    zones: Sequence[str], *, target: int, notice_s: float | None, source: str
) -> str:
    """The ``fleet.yaml`` that replays a recording (zone names checked: they are written in)."""
    lines = [
        f"{CONFIG_MARK.decode()} ({source[:200]!r}); replay: spotstart plan run --config THIS",
        "# Each zone's trace: k = spot nodes obtainable per tick (see its metadata).",
        "# Prices are placeholders: set your zones' spot and on-demand prices per hour.",
        "capacity: count",
        "traces_dir: .",
        f"target: {{replicas: {max(1, int(target))}}}",
    ]
    if notice_s is not None and math.isfinite(notice_s) and notice_s >= 0:
        lines.append(f"preemption_notice_seconds: {notice_s:g}")
    lines += ["prices: {spot_per_hour: 1.0, on_demand_per_hour: 3.0}", "zones:"]
    for z in zones:
        name = check_zone(z)
        lines.append(f"  - {{name: {name}, trace: {name}.json}}")
    return "\n".join(lines) + "\n"


class TraceDirectory:
    """A recording's directory: one ``ZONE.json`` per zone, ``fleet.yaml``, and a lock held
    while a process records into it (a second recorder is refused, not interleaved). Every
    file is written to a temporary name created ``O_EXCL | O_NOFOLLOW``, fsynced and renamed
    within the directory's descriptor: a reader (or a restart after a crash) sees the old file
    or the new one. The directory itself is the user's choice (taken as given); no name in it
    is followed through a link, on reading or writing.

    Example::

        with TraceDirectory.open("rec", zones=["us-east1-b"], gap_s=60, start_s=time.time(),
                                 assumed_nodes=2, source="k8s controller") as d:
            d.recorder.observe(time.time(), [ZoneObservation("us-east1-b", 2)])
            d.flush()
    """

    def __init__(self, path: Path, dirfd: int, lockfd: int, recorder: TraceRecorder) -> None:
        self.path = path
        self.recorder = recorder
        self._dirfd = dirfd
        self._lockfd = lockfd
        self.source = ""
        self.target = max(1, recorder.assumed_nodes)
        self.notice_s: float | None = None
        self.flushed_ticks = -1

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        zones: Sequence[str],
        gap_s: float,
        start_s: float,
        assumed_nodes: int,
        source: str,
        target: int | None = None,
        notice_s: float | None = None,
    ) -> TraceDirectory:
        """Create ``path`` or resume the recording in it: its start, gap and ticks are kept
        (a different gap is refused); zones are the union of the recorded and ``zones``."""
        for z in zones:
            check_zone(z)
        # the fleet.yaml written names it: one plan would refuse is refused before anything
        check_target("record target", target if target is not None else max(1, assumed_nodes))
        p = Path(os.path.abspath(path))
        try:
            p.mkdir(parents=True, exist_ok=True)
            dirfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _io_error(f"{p}", exc, "cannot use it as a recording directory") from None
        try:
            lockfd = _lock(dirfd, p)
            try:
                recorder = _resume(dirfd, p, zones, gap_s, start_s, assumed_nodes)
            except BaseException:
                os.close(lockfd)
                raise
        except BaseException:
            os.close(dirfd)
            raise
        d = cls(p, dirfd, lockfd, recorder)
        d.source = source
        d.target = target if target is not None else max(1, assumed_nodes)
        d.notice_s = notice_s
        return d

    def flush(self) -> bool:
        """Write every zone's closed ticks and ``fleet.yaml``; False when nothing new (or no
        tick closed yet: plan refuses an empty trace)."""
        rec = self.recorder
        if rec.ticks == self.flushed_ticks or rec.ticks == 0:
            return False
        for zone in rec.zones:
            doc = {"metadata": rec.metadata(zone, self.source), "data": []}
            head = json.dumps(doc, separators=(",", ":"))[: -len("[]}")]
            body = head + "[" + ",".join(map(str, rec.data(zone))) + "]}\n"
            self._write(f"{zone}.json", body.encode())
        text = plan_config_text(
            rec.zones, target=self.target, notice_s=self.notice_s, source=self.source
        )
        self._write(CONFIG_NAME, text.encode())
        self.flushed_ticks = rec.ticks
        return True

    def _write(self, name: str, data: bytes) -> None:
        tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = safefs.create_exclusive(self._dirfd, tmp, 0o644)
            try:
                try:
                    view = memoryview(data)
                    written = 0
                    while written < len(view):
                        written += os.write(fd, view[written:])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                safefs.rename_beneath(self._dirfd, tmp, self._dirfd, name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=self._dirfd)
                raise
        except OSError as exc:
            raise _io_error(str(self.path / name), exc, "cannot write it") from None

    def close(self) -> None:
        """Release the directory (the lock with it); call :meth:`flush` first to keep ticks."""
        if self._dirfd >= 0:
            os.close(self._lockfd)
            os.close(self._dirfd)
            self._dirfd = self._lockfd = -1

    def __enter__(self) -> TraceDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _io_error(where: str, exc: OSError, doing: str = "cannot create it") -> LocalIOError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return UnsafePath(f"{where}: a symlink or a file in the way; refusing to follow it")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{where}: no space left on device; free space and rerun")
    return LocalIOError(f"{where}: {doing} ({exc.strerror or exc})")


def _lock(dirfd: int, p: Path) -> int:
    try:
        fd = safefs.open_beneath(dirfd, LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise _io_error(str(p / LOCK_NAME), exc) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{p / LOCK_NAME}: not a regular file; remove it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RecordingBusy(
                f"{p}: another process is recording into it; give each recorder its own directory"
            ) from None
        raise LocalIOError(f"{p / LOCK_NAME}: cannot lock it ({exc.strerror})") from None
    return fd


def _read_trace(dirfd: int, p: Path, name: str) -> dict[str, Any] | None:
    """A recorded trace file, read without following a link and bounded; None if absent."""
    try:
        # O_NONBLOCK: a FIFO planted at the name fails here instead of hanging the open
        fd = safefs.open_beneath(dirfd, name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _io_error(str(p / name), exc, "cannot read it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{p / name}: not a regular file; remove it")
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise RecordError(f"{p / name}: over {MAX_FILE_BYTES} bytes; not a recording of ours")
    try:
        doc = untrusted_json.parse(raw.decode("utf-8", "replace"), what=str(p / name))
    except ValueError:
        raise RecordError(
            f"{p / name}: not a readable trace; move it away or record into another directory"
        ) from None
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RecordError(
            f"{p / name}: not a spotstart recording (metadata.format != {FORMAT!r}); record "
            "into another directory"
        )
    return dict(doc)


def _check_config_is_ours(dirfd: int, p: Path) -> None:
    """A directory with no recording yet may hold a ``fleet.yaml`` of the user's (``--out .``
    in a project): the first flush renamed ours over it. A regular file is replaced only when
    we wrote it (our first line); a link or a FIFO there is replaced, never followed."""
    try:
        fd = safefs.open_beneath(dirfd, CONFIG_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return  # absent, or a link: the rename replaces the name, the target is untouched
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        head = os.read(fd, len(CONFIG_MARK))
    finally:
        os.close(fd)
    if head != CONFIG_MARK:
        raise RecordError(
            f"{p / CONFIG_NAME}: not one spotstart recorded, and a recording writes its own "
            "there; record into another directory (or move it away)"
        )


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecordError(f"{where}: not a number ({value!r}); record into another directory")
    return float(value)


def _resume(
    dirfd: int,
    p: Path,
    zones: Sequence[str],
    gap_s: float,
    start_s: float,
    assumed_nodes: int,
) -> TraceRecorder:
    listing = os.listdir(dirfd)
    for left in listing:
        if _TMP.fullmatch(left):
            # a writer killed between create and rename left it; the lock says none writes now
            with contextlib.suppress(OSError):
                os.unlink(left, dir_fd=dirfd)
    names = [n[: -len(".json")] for n in listing if n.endswith(".json")]
    recorded = sorted(n for n in names if ZONE_NAME.fullmatch(n))
    if len(recorded) > MAX_ZONES:
        raise RecordError(f"{p}: {len(recorded)} zone traces, at most {MAX_ZONES} are recorded")
    history: dict[str, list[int]] = {}
    stats: dict[str, ZoneStats] = {}
    start: float | None = None
    for zone in recorded:
        doc = _read_trace(dirfd, p, f"{zone}.json")
        if doc is None:
            continue
        meta = doc["metadata"]
        where = str(p / f"{zone}.json")
        gap = _number(meta.get("gap_seconds"), f"{where}: gap_seconds")
        if gap != float(gap_s):
            raise RecordError(
                f"{where}: recorded every {gap:g} s, not {gap_s:g} s; keep --record-gap "
                f"{gap:g} or record into another directory"
            )
        s = _number(meta.get("start_unix"), f"{where}: start_unix")
        if start is not None and s != start:
            raise RecordError(f"{where}: another recording's start; one directory per fleet")
        start = s
        data = doc.get("data")
        if (
            not isinstance(data, list)
            or len(data) > MAX_TICKS
            or not all(type(v) is int and 0 <= v < 2**31 for v in data)
        ):
            raise RecordError(f"{where}: 'data' is not a list of node counts")
        history[zone] = data
        stats[zone] = ZoneStats(
            notices=int(_number(meta.get("notices", 0), f"{where}: notices")),
            unschedulable_seconds=_number(
                meta.get("unschedulable_seconds", 0), f"{where}: unschedulable_seconds"
            ),
            exhausted_ticks=int(_number(meta.get("exhausted_ticks", 0), f"{where}: ticks")),
            filled_ticks=int(_number(meta.get("filled_ticks", 0), f"{where}: ticks")),
        )
    if not history:
        _check_config_is_ours(dirfd, p)
    if history:
        # the files are renamed one by one: a crash between two leaves some a flush ahead;
        # every zone resumes from the ticks all of them hold
        n = min(len(v) for v in history.values())
        history = {z: v[:n] for z, v in history.items()}
    return TraceRecorder(
        zones,
        gap_s=gap_s,
        start_s=start if start is not None else start_s,
        assumed_nodes=assumed_nodes,
        history=history,
        stats=stats,
    )


__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "MAX_NODES",
    "MAX_TICKS",
    "MAX_ZONES",
    "PREEMPTION_NOTICES",
    "NodeLife",
    "RecordError",
    "TraceDirectory",
    "TraceRecorder",
    "ZoneObservation",
    "ZoneStats",
    "check_zone",
    "lives_from_events",
    "plan_config_text",
    "record_lives",
]
