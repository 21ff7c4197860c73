"""A bounded reader of server-sent events (the upstream's SSE stream, a stranger's bytes for
the router's purposes): lines and events have size limits, comments are reported (the guard's
``: spotstart-drain`` notice), and an event is only ever handed out whole. Not a writer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Comment", "Event", "SSEError", "SSEReader"]


class SSEError(ValueError):
    """The stream broke a bound (a line or an event too long) or is not SSE."""


@dataclass(frozen=True)
class Comment:
    """A comment line (``: text``), between events or inside one."""

    text: str


@dataclass(frozen=True)
class Event:
    """One dispatched event: its ``data:`` lines joined by newlines."""

    data: str


class SSEReader:
    """Feed bytes, get whole events. Memory: at most ``max_line_bytes`` of an unfinished line
    plus ``max_event_bytes`` of the event being gathered.

    >>> r = SSEReader()
    >>> r.feed(b'data: {"a": 1}\\n\\n: note\\n\\n')
    [Event(data='{"a": 1}'), Comment(text='note')]
    """

    def __init__(self, max_line_bytes: int = 1 << 20, max_event_bytes: int = 4 << 20) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_event_bytes = max_event_bytes
        self._partial = bytearray()
        self._data: list[str] = []
        self._event_bytes = 0
        self._has_data = False

    @property
    def between_events(self) -> bool:
        """True when no event is half gathered (no data line since the last dispatch)."""
        return not self._has_data and not self._partial

    def feed(self, chunk: bytes) -> list[Event | Comment]:
        out: list[Event | Comment] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                rest = chunk[start:]
                if len(self._partial) + len(rest) > self.max_line_bytes:
                    raise SSEError(f"an SSE line longer than {self.max_line_bytes} bytes")
                self._partial += rest
                return out
            piece = chunk[start:nl]
            start = nl + 1
            if len(self._partial) + len(piece) > self.max_line_bytes:
                raise SSEError(f"an SSE line longer than {self.max_line_bytes} bytes")
            if self._partial:
                line = bytes(self._partial) + piece
                self._partial.clear()
            else:
                line = piece
            if line.endswith(b"\r"):
                line = line[:-1]
            item = self._line(line)
            if item is not None:
                out.append(item)

    def _line(self, raw: bytes) -> Event | Comment | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SSEError("an SSE line that is not UTF-8") from exc
        if not line:
            if not self._has_data:
                return None
            event = Event("\n".join(self._data))
            self._data.clear()
            self._event_bytes = 0
            self._has_data = False
            return event
        if line.startswith(":"):
            return Comment(line[1:].strip())
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._event_bytes += len(raw) + 1
            if self._event_bytes > self.max_event_bytes:
                raise SSEError(f"an SSE event larger than {self.max_event_bytes} bytes")
            self._data.append(value)
            self._has_data = True
        # event:, id:, retry: and unknown fields carry nothing the router uses
        return None
