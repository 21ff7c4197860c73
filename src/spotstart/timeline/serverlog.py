"""vLLM's log as start-up phases: a reader fed one line at a time that turns the lines vLLM
prints while it starts (and stops) into spans with their logged times. Pure: no files, no
clock. Not a general log parser: lines it does not know are passed over.

What vLLM (0.9 to 0.32, GPU and CPU builds) prints, and what each becomes::

    (APIServer pid=5751) INFO 12-06 14:28:02 [api_utils.py:286] non-default args: {...}
      -> a run starts (its first timed line: the Python imports before it are not logged)
    (Worker pid=6225) INFO 12-06 14:28:44 [cpu_model_runner.py:68] Starting to load model /m...
      -> "server: start-up" ends, "server: model loading" starts
    ... Loading weights took 0.01 seconds                      -> "server: load weights"
    ... Model loading took 14.99 GiB memory and 31.48 seconds  -> "server: model loading" (GPU)
    ... Warming up model for the compilation... / Warming up done.  -> "server: warm-up" (CPU)
    ... torch.compile took 12.1 s in total (0.9: takes)      -> "server: torch.compile"
    ... Initial profiling/warmup run took 1.35 s               -> "server: profiling run"
    ... Graph capturing finished in 9 secs, took 0.5 GiB       -> "server: CUDA graphs"
    ... init engine (profile, create kv cache, warmup model) took 38.64 s -> "server: engine-init"
    ... Starting vLLM server on http://...  (0.9: Starting vLLM API server 0 on ...)
      -> "server: API start" (from the end of init engine) and the instant "server: API up"
    ... [shutdown] ...  (first to last)                        -> "server: shutdown"

Times: vLLM stamps ``MM-DD HH:MM:SS`` (its default ``--log-format`` date), in the container's
local time (UTC unless TZ is set) and without a year. The year is the caller's (``--year``, or
the year of the other records); a month that goes back by half a year or more (12-31 ->
01-01) is the next year. A line led by an RFC 3339 time, as ``kubectl logs --timestamps``
writes it, takes that time instead: it has a year and a zone. Stamps are to the second (cut,
not rounded), so a span between two lines is right to +-1 s; a "took X s" span has its exact
length and an end known to the second.

Untrusted input: a log holds what clients sent when vLLM logs requests. A line counts only
when vLLM's own head (``[(proc) ]LEVEL MM-DD HH:MM:SS [file:line] ``) starts it, so a prompt
that quotes a timing line inside a request's log line is not read as one (vLLM writes prompts
with repr: no raw line break). Every repetition in the patterns is bounded (time linear in a
line's length), a carriage return ends a line too (progress bars), a "took" longer than a day
is refused, and the reader keeps O(1) state per run."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

MAX_TOOK_S = 86_400.0  # a phase of a start-up longer than a day is not one
_HALF_YEAR_MONTHS = 6


class BadTime(ValueError):
    """A line vLLM would print, with a time that cannot be (month 13, a took of a week)."""


@dataclass(frozen=True)
class LogSpan:
    name: str
    start: float  # unix seconds
    end: float
    detail: str


# The head of a vLLM line: an optional kubectl --timestamps time, an optional process tag
# ("(APIServer pid=1)", "(Worker_TP0 pid=9)", "(EngineCore_DP0 pid=8)"), the level, the stamp,
# the source ("[file.py:12]" since 0.6, "file.py:12]" before). match() at the line's start.
_HEAD = re.compile(
    r"(?:(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)) )?"
    r"(?:\((?P<proc>[^()\n]{1,80})\) )?"
    r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) (?P<mo>\d\d)-(?P<d>\d\d) "
    r"(?P<t>\d\d:\d\d:\d\d)(?:[.,]\d{1,6})? (?:\[[^\]\n]{1,200}\] |[\w.-]{1,100}:\d{1,6}\] )?)?"
)
# a "[tag] " some messages start with ("[backbone] ", "[shutdown] ")
_TAG = re.compile(r"\[(?P<tag>[^\]\n]{1,80})\] ")
_NUM = r"(?P<s>\d{1,9}(?:\.\d{1,9})?)"
_TOOK: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(rf"Loading weights took {_NUM} ?s"), "server: load weights"),
    (re.compile(rf"Model loading took [^\n]{{0,80}}? and {_NUM} ?s"), "server: model loading"),
    (re.compile(rf"init engine \([^)\n]{{0,200}}\) took {_NUM} ?s"), "server: engine-init"),
    (re.compile(rf"torch\.compile (?:took|takes) {_NUM} ?s"), "server: torch.compile"),
    (re.compile(rf"Initial profiling/warmup run took {_NUM} ?s"), "server: profiling run"),
    (re.compile(rf"Graph capturing finished in {_NUM} ?s"), "server: CUDA graphs"),
)
_RUN_STARTS = ("non-default args:", "vLLM API server version")
_LOAD_STARTS = "Starting to load model"
_WARM_STARTS, _WARM_ENDS = "Warming up model for the compilation", "Warming up done"
_API_UP = re.compile(r"Starting vLLM (?:API )?server\b")
# uvicorn's own line: no time of its own (the last time logged before it stands in)
_UVICORN_UP = re.compile(r"INFO: {1,8}Application startup complete\.")


def took_span(line: str, year: int) -> LogSpan | None:
    """The span of one "took" line (``INFO 12-01 10:02:03 [...] Loading weights took 12.3
    seconds``), ending at the line's time; None for any other line; BadTime for a took line
    with an impossible time."""
    return ServerLogReader(year).took(line)


@dataclass
class _Run:
    """What one start of vLLM has logged so far (the times of its markers)."""

    first: float | None = None
    load_start: float | None = None
    weights_end: float | None = None
    model_loading_logged: bool = False
    warm_start: float | None = None
    engine_done: float | None = None
    api_up: float | None = None
    shutdown: list[float] = field(default_factory=list)

    @property
    def started_loading(self) -> bool:
        return self.load_start is not None or self.api_up is not None


class ServerLogReader:
    """Feed it a log's lines in order (:meth:`feed`), then :meth:`close`; each returns the
    spans completed so far. ``latest``: where the year is a guess from today's date, a log
    that would begin after it (plus a day) is taken to be from the year before."""

    def __init__(self, year: int, latest: float | None = None) -> None:
        self.year = year
        self._latest = latest
        self._month: int | None = None
        self._last: float | None = None  # the last time logged
        self._run = _Run()

    # -- one line ---------------------------------------------------------------------------

    def _time(self, head: re.Match[str]) -> float | None:
        """The line's time: the RFC 3339 one where there is one, else vLLM's stamp."""
        if head["iso"]:
            try:
                iso = datetime.fromisoformat(head["iso"].replace("Z", "+00:00")[:35])
            except ValueError as exc:
                raise BadTime(f"a line's time: {exc}") from None
            return iso.timestamp()
        if head["mo"] is None:
            return None
        month = int(head["mo"])
        if self._month is not None and self._month - month >= _HALF_YEAR_MONTHS:
            self.year += 1  # 12-31 23:59:59 -> 01-01 00:00:00
        t = self._stamp(month, head)
        if self._month is None and self._latest is not None and t > self._latest + 86_400:
            self.year -= 1  # a guessed year: the log cannot begin in the future
            t = self._stamp(month, head)
        self._month = month
        return t

    def _stamp(self, month: int, head: re.Match[str]) -> float:
        try:
            h, m, s = (int(x) for x in head["t"].split(":"))
            return datetime(self.year, month, int(head["d"]), h, m, s, tzinfo=UTC).timestamp()
        except ValueError as exc:
            raise BadTime(f"a line's time: {exc}") from None

    def _split(self, line: str) -> tuple[float | None, str, str]:
        """(time or None, tag or "", message) of one line."""
        head = _HEAD.match(line)
        assert head is not None  # every part of it is optional
        when = self._time(head)
        message = line[head.end() :]
        tag = _TAG.match(message)
        if tag:
            return when, tag["tag"], message[tag.end() :]
        return when, "", message

    def took(self, line: str) -> LogSpan | None:
        """The "took" span of ``line`` alone."""
        when, _, message = self._split(line)
        return None if when is None else _took(message, when, line)

    def feed(self, line: str) -> list[LogSpan]:
        """The spans this line completes. A carriage return inside ``line`` ends a line too."""
        out: list[LogSpan] = []
        for part in _lines(line):
            out += self._feed_one(part)
        return out

    def _feed_one(self, line: str) -> list[LogSpan]:
        if not line.strip():
            return []
        when, tag, message = self._split(line)
        if when is None:
            if _UVICORN_UP.match(message) and self._run.api_up is None and self._last:
                return self._api_up(
                    self._last,
                    "uvicorn: Application startup complete (no "
                    "time on the line: the last time logged before it)",
                )
            return []
        out: list[LogSpan] = []
        run = self._run
        if message.startswith(_RUN_STARTS) and run.started_loading:
            out += self._close_run()  # a restart appended to the same log
            run = self._run
        if run.first is None:
            run.first = when
        self._last = when
        span = _took(message, when, line)
        if span is not None:
            out.append(span)
            if span.name == "server: load weights":
                run.weights_end = when
            elif span.name == "server: model loading":
                run.model_loading_logged = True
            elif span.name == "server: engine-init":
                run.engine_done = when
        elif message.startswith(_LOAD_STARTS) and run.load_start is None:
            run.load_start = when
            out.append(
                LogSpan(
                    "server: start-up",
                    run.first,
                    when,
                    "from vLLM's first timed line to 'Starting to load model' (the Python "
                    "imports before its first line are not logged)",
                )
            )
        elif message.startswith(_WARM_STARTS) and run.warm_start is None:
            run.warm_start = when
            out += self._model_loading(when)
        elif message.startswith(_WARM_ENDS) and run.warm_start is not None:
            out.append(LogSpan("server: warm-up", run.warm_start, when, _clean(line)))
        elif (_API_UP.match(message) or _UVICORN_UP.match(message)) and run.api_up is None:
            out += self._api_up(when, _clean(line))
        elif tag == "shutdown":
            run.shutdown = [run.shutdown[0] if run.shutdown else when, when]
        return out

    def _model_loading(self, until: float) -> list[LogSpan]:
        """The CPU build logs no "Model loading took": from "Starting to load model" to the
        last weights line before the warm-up (or the warm-up itself, with another loader)."""
        run = self._run
        if run.load_start is None or run.model_loading_logged:
            return []
        run.model_loading_logged = True
        end = run.weights_end if run.weights_end is not None else until
        return [
            LogSpan(
                "server: model loading",
                run.load_start,
                end,
                "from 'Starting to load model' to "
                + ("'Loading weights took'" if run.weights_end is not None else "the warm-up"),
            )
        ]

    def _api_up(self, when: float, detail: str) -> list[LogSpan]:
        run = self._run
        run.api_up = when
        out = self._model_loading(when)
        if run.engine_done is not None:
            out.append(
                LogSpan(
                    "server: API start",
                    run.engine_done,
                    when,
                    "from 'init engine ... took' to the API server's start",
                )
            )
        out.append(LogSpan("server: API up", when, when, detail))
        return out

    def _close_run(self) -> list[LogSpan]:
        run, self._run = self._run, _Run()
        if len(run.shutdown) == 2:
            start, end = run.shutdown
            return [LogSpan("server: shutdown", start, end, "vLLM's [shutdown] lines")]
        return []

    def close(self) -> list[LogSpan]:
        """The spans only the end of the log completes (the last run's shutdown)."""
        return self._close_run()


def _took(message: str, when: float, line: str) -> LogSpan | None:
    for pattern, name in _TOOK:
        m = pattern.match(message)
        if m:
            took = float(m["s"])
            if took > MAX_TOOK_S:
                raise BadTime(f"{name}: {took} s is not a start-up phase")
            return LogSpan(name, when - took, when, _clean(line))
    return None


def _lines(text: str) -> Iterator[str]:
    """``text`` split at CR, LF and CRLF only (never at the other characters str.splitlines
    takes: a prompt's U+2028 is not a line break)."""
    yield from re.split(r"\r\n?|\n", text)


def _clean(line: str) -> str:
    """A line as a detail: at most 160 characters, control characters as "?"."""
    cut = line.strip()[:160]
    return "".join(c if c.isprintable() else "?" for c in cut)
