"""Telling a router in front which streams the guard will cut, and when: the request header it
sends (``X-Spotstart-Continue: 1``), the SSE comment the guard writes into such a stream when a
drain starts, and where in a stream that comment may go. Pure: bytes in, offsets out;
guard/proxy.py writes. Not a parser of events: only their boundaries are tracked.

The comment goes between two events, never inside one (a blank line inside an event would end
it early): only at a point where the upstream's bytes so far end with a blank line (an event's
end, ``\\n\\n`` or ``\\r\\n\\r\\n`` or a mix, or the stream's start). A ``\\r`` last in a chunk
may be the first half of ``\\r\\n``: the decision waits for the next byte."""

from __future__ import annotations

import re

CONTINUE_HEADER = "X-Spotstart-Continue"  # sent by `spotstart route`; never forwarded
REPLICA_HEADER = "X-Spotstart-Replica"  # the guard's identity, on answers to such requests

_EOL = re.compile(rb"\r\n|\n|\r")


def drain_comment(deadline_ms: int) -> bytes:
    """The one SSE comment a stream gets when the drain starts: ``deadline_ms`` is how long
    from now until the guard cuts this stream. A client's SSE parser ignores it (a line that
    starts with ``:``); the blank line after it dispatches nothing."""
    return b": spotstart-drain deadline_ms=%d\n\n" % max(0, deadline_ms)


def wants_continue(value: str | None) -> bool:
    """The request asks for the drain comment (its value is exactly ``1``)."""
    return value is not None and value.strip() == "1"


class EventBoundary:
    """Where the events of an SSE stream end, fed the upstream's bytes as they pass.

    Example::

        >>> b = EventBoundary()
        >>> b.feed(b"data: 1")  # the stream's start is a boundary
        0
        >>> b.feed(b"\\n\\ndata: 2")  # right after the event's blank line
        2
        >>> b.at_boundary  # mid-event
        False
    """

    __slots__ = ("_blank", "_cr", "_line_start")

    def __init__(self) -> None:
        self._line_start = True  # the bytes so far end a line (or there are none)
        self._blank = True  # ... and that line was empty: an event (or nothing) just ended
        self._cr = False  # the last byte was a \r: a \n next belongs to it

    @property
    def at_boundary(self) -> bool:
        """A comment may be written now: the bytes so far end with a complete event (or are
        none), and no ``\\r`` is waiting for its possible ``\\n``."""
        return self._blank and not self._cr

    def feed(self, chunk: bytes) -> int | None:
        """Take ``chunk`` (the next bytes of the stream); returns the first offset in it
        (0..len) at which a comment may be inserted, or None if there is none."""
        if not chunk:
            return 0 if self.at_boundary else None
        first: int | None = None
        pos = 0
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                pos = 1  # the \n of the \r\n the last chunk ended in: nothing new
            if self._blank:
                first = pos
        elif self._blank:
            first = 0
        n = len(chunk)
        for m in _EOL.finditer(chunk, pos):
            if m.start() > pos:
                self._line_start = False
            self._blank = self._line_start
            self._line_start = True
            pos = m.end()
            if self._blank and first is None and not (pos == n and m.group() == b"\r"):
                first = pos
        if pos < n:
            self._line_start = self._blank = False
        elif n and chunk[-1:] == b"\r":
            self._cr = True
        return first
