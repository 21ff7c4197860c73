"""What an inference server's answer says about the request it ends: an OpenAI-style
completion the engine aborted (``"finish_reason": "abort"``: vLLM on SIGTERM, SGLang), or a
refusal of a request the engine never started (vLLM shutting down with ``--shutdown-timeout``).
Pure: bytes in, verdicts out; guard/proxy.py reads the bodies and acts on the verdicts.

Read by structure (each SSE event's JSON, a JSON answer's ``choices``), not by byte pattern:
JSON escapes every ``"`` a model generates, but vLLM also echoes objects the client gave (the
Responses API's ``metadata`` and ``tools``), so ``"finish_reason":"abort"`` can be a real key
and value that the client wrote. The byte pattern is kept only for what is too big to hold (a
JSON answer over the buffer, an SSE event over 64 KiB), scanned as it passes."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

# vLLM and SGLang write compact JSON ("finish_reason":"abort"); a little whitespace is allowed
# for servers that pretty-print. The longest match is 15 + 8 + 1 + 8 + 7 = 39 bytes.
_ABORT = re.compile(rb'"finish_reason"[ \t\r\n]{0,8}:[ \t\r\n]{0,8}"abort"')
# vLLM's error event inside a 200 stream (its engine died under the request: a SIGTERM that
# reached the engine core first): data: {"error": {"message": ..., "code": 500}} then [DONE]
_ERROR_EVENT = re.compile(rb'data:[ ]?\{"error"[ \t]{0,8}:')
_TAIL_BYTES = 48  # kept from one chunk to the next: longer than any match

# vLLM's answer to a request that arrives once its SIGTERM handler has begun shutting down
# with --shutdown-timeout > 0 (asyncio's executor, refusing the request's first step): HTTP
# 500, while /health still answers 200. The engine never started the request: safe to retry.
SHUTDOWN_REFUSAL = b"cannot schedule new futures after shutdown"

REFUSAL_PEEK_BYTES = 64 * 1024  # the most of a 500's body read to recognise a refusal


EVENT_BYTES = 64 << 10  # an SSE event held to read its JSON; a longer one: scanned as bytes
_EOL = re.compile(rb"[\r\n]")


def _verdict(data: bytes) -> tuple[bool, bool]:
    """(aborted, errored) for one JSON document as an OpenAI-style server writes it: some
    ``choices[i].finish_reason`` is "abort"; or the document is an error (``{"error": {...}}``,
    vLLM's error event). Read by structure, not by bytes: vLLM echoes client-given objects as
    JSON (the Responses API's ``metadata``, ``tools``, ``text.format.schema``), so a client can
    put a real ``"finish_reason":"abort"`` key and value anywhere but in ``choices``."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return False, False
    if not isinstance(doc, dict):
        return False, False
    choices = doc.get("choices")
    aborted = isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices
    )
    errored = choices is None and isinstance(doc.get("error"), dict)
    return aborted, errored


class AbortScanner:
    """Watches a streamed body, chunk by chunk, for a choice that ended with ``finish_reason``
    "abort" (and for vLLM's error event). An SSE stream (``sse=True``) is read event by event:
    each event's ``data:`` lines are held until its blank line and read as JSON; an event
    longer than ``EVENT_BYTES`` (a client can make one: a completion with ``echo``, a long
    prompt's token ids) is not held but scanned with the byte pattern as it passes, and the
    next event is read as JSON again. Otherwise (a JSON answer streamed because it did not fit
    the buffer) the byte pattern for the whole body. Held: at most ``EVENT_BYTES`` (+ 48
    bytes); the stream itself is never held back.

    Example::

        scan = AbortScanner()
        for chunk in body_chunks:
            scan.feed(chunk)
        scan.aborted  # True once an event said the engine aborted the generation
    """

    def __init__(self, sse: bool = True) -> None:
        self._aborted = False
        self._errored = False  # an error event in the stream: the generation failed
        self._bytes_mode = not sse
        self._tail = b""
        self._line = bytearray()  # an unfinished line
        self._line_skipped = False  # part of the unfinished line was scanned, not held
        self._data: list[bytes] = []  # the current event's data lines
        self._size = 0
        self._skipping = False  # the current event is too long to hold: scanned as bytes
        self._cr = False  # the last chunk ended in \r: a \n first in the next belongs to it

    @property
    def aborted(self) -> bool:
        return self._aborted or self._pending()[0]

    @property
    def errored(self) -> bool:
        return self._errored or self._pending()[1]

    def feed(self, chunk: bytes) -> None:
        if self._aborted or not chunk:
            return
        if self._bytes_mode:
            self._scan_bytes(chunk)
            return
        pos = 1 if self._cr and chunk[:1] == b"\n" else 0
        self._cr = False
        n = len(chunk)
        while pos < n and not self._aborted:
            eol = _EOL.search(chunk, pos)
            if eol is None:
                self._hold_partial(chunk[pos:])
                return
            end = eol.start()
            if self._line_skipped:  # the end of a line too long to hold
                self._scan_bytes(chunk[pos:end])
                self._line_skipped = False
                self._line.clear()
                line = None
            elif self._line:
                self._line += chunk[pos:end]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = chunk[pos:end]
            if line is not None:
                self._on_line(line)
            pos = end + 1
            if chunk[end] == 13:  # \r: a \r\n is one line end
                if pos < n and chunk[pos] == 10:
                    pos += 1
                elif pos == n:
                    self._cr = True

    def _hold_partial(self, piece: bytes) -> None:
        if self._line_skipped:
            self._scan_bytes(piece)
        elif self._size + len(self._line) + len(piece) > EVENT_BYTES:
            self._skip_event()
            self._scan_bytes(bytes(self._line))
            self._scan_bytes(piece)
            self._line.clear()
            self._line_skipped = True
        else:
            self._line += piece

    def _on_line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            value = line[5:]
            if value[:1] == b" ":
                value = value[1:]
            if self._skipping:
                self._scan_bytes(value)
                return
            self._data.append(value)
            self._size += len(value)
            if self._size > EVENT_BYTES:
                self._skip_event()
        # comments (":..."), event:, id:, retry: say nothing about the generation

    def _skip_event(self) -> None:
        if not self._skipping:
            self._skipping = True
            for held in self._data:
                self._scan_bytes(held)
            self._data.clear()
            self._size = 0

    def _dispatch(self) -> None:
        data = b"\n".join(self._data)
        self._data.clear()
        self._size = 0
        self._skipping = False
        # parsed only when it could say something (most token events cannot)
        if (b'"abort"' in data or b'"error"' in data) and data != b"[DONE]":
            aborted, errored = _verdict(data)
            self._aborted = self._aborted or aborted
            self._errored = self._errored or errored

    def _pending(self) -> tuple[bool, bool]:
        """The verdict of an event the stream ended in without its blank line."""
        if self._bytes_mode or self._aborted or self._skipping:
            return False, False
        data = list(self._data)
        line = bytes(self._line)
        if line.startswith(b"data:") and not self._line_skipped:
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        return _verdict(b"\n".join(data)) if data else (False, False)

    def _scan_bytes(self, chunk: bytes) -> None:
        # the boundary (a match split across two chunks), then the chunk itself: no copy of
        # the whole chunk is made
        if self._aborted or not chunk:
            return
        edge = self._tail + chunk[:_TAIL_BYTES]
        if _ABORT.search(edge) or _ABORT.search(chunk):
            self._aborted = True
            return
        if not self._errored and (_ERROR_EVENT.search(edge) or _ERROR_EVENT.search(chunk)):
            self._errored = True
        if len(chunk) >= _TAIL_BYTES:
            self._tail = chunk[-_TAIL_BYTES:]
        else:
            self._tail = (self._tail + chunk)[-_TAIL_BYTES:]


def body_aborted(body: bytes) -> bool:
    """A whole body (a non-streaming completion, or a buffered SSE stream) records an aborted
    generation: some choice ended with ``finish_reason`` "abort"."""
    if body.lstrip()[:1] == b"{":
        return b'"abort"' in body and _verdict(body)[0]
    scan = AbortScanner()
    scan.feed(body)
    return scan.aborted


def is_shutdown_refusal(status: int, body: bytes) -> bool:
    """The engine refused the request because it is shutting down (it never started it): a 500
    whose whole body is an OpenAI-style error whose message is exactly vLLM's. Not a search
    for the words: a 500 can carry text the client chose (an error echoing the prompt), and a
    false reading would keep a healthy engine from its clients."""
    if status != 500 or len(body) > REFUSAL_PEEK_BYTES or SHUTDOWN_REFUSAL not in body:
        return False
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError)
        return False
    error = answer.get("error") if isinstance(answer, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return isinstance(message, str) and message.strip() == SHUTDOWN_REFUSAL.decode()


def is_json(content_type: str) -> bool:
    """``application/json`` or a ``+json`` type, parameters ignored."""
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or mime.endswith("+json")


def is_event_stream(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def aborted_answer(retry_after_s: int) -> tuple[int, dict[str, str], bytes]:
    """What the client gets instead of a 200 whose completion the engine aborted: a 503 in the
    shape of an OpenAI error (its SDKs retry a 503, honouring Retry-After)."""
    body = {
        "error": {
            "message": "the server stopped this generation before it finished (it is shutting "
            "down); retry on another replica",
            "type": "ServiceUnavailable",
            "code": 503,
        }
    }
    return _error(retry_after_s, body)


def refused_answer(retry_after_s: int, why: str) -> tuple[int, dict[str, str], bytes]:
    """A 503 for a request the engine never started (shutting down, not accepting
    connections): the client may send it again elsewhere."""
    body = {"error": {"message": f"{why}; retry on another replica", "type": "ServiceUnavailable"}}
    return _error(retry_after_s, body)


def _error(retry_after_s: int, body: Mapping[str, object]) -> tuple[int, dict[str, str], bytes]:
    headers = {"Retry-After": str(retry_after_s), "Content-Type": "application/json"}
    return 503, headers, (json.dumps(body) + "\n").encode()
