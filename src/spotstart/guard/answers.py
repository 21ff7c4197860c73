"""What an inference server's answer says about the request it ends: an OpenAI-style
completion the engine aborted (``"finish_reason": "abort"``: vLLM on SIGTERM, SGLang), or a
refusal of a request the engine never started (vLLM shutting down with ``--shutdown-timeout``).
Pure: bytes in, verdicts out; guard/proxy.py reads the bodies and acts on the verdicts.

Not a JSON or SSE parser: the byte pattern is enough because JSON escapes every ``"`` inside
a string (``\\"``), so ``"finish_reason":"abort"`` in the raw bytes is a key and its value,
never text a model generated or a prompt echoed back."""

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


class AbortScanner:
    """Watches a streamed body, chunk by chunk, for ``"finish_reason":"abort"``; holds at most
    ``_TAIL_BYTES`` of it between chunks (a stream is never held back, only looked at).

    Example::

        scan = AbortScanner()
        for chunk in body_chunks:
            scan.feed(chunk)
        scan.aborted  # True once an event said the engine aborted the generation
    """

    def __init__(self) -> None:
        self.aborted = False
        self.errored = False  # an error event in the stream: the generation failed
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if self.aborted or not chunk:
            return
        # the boundary (a match split across two chunks), then the chunk itself: no copy of
        # the whole chunk is made
        edge = self._tail + chunk[:_TAIL_BYTES]
        if _ABORT.search(edge) or _ABORT.search(chunk):
            self.aborted = True
            return
        if not self.errored and (_ERROR_EVENT.search(edge) or _ERROR_EVENT.search(chunk)):
            self.errored = True
        if len(chunk) >= _TAIL_BYTES:
            self._tail = chunk[-_TAIL_BYTES:]
        else:
            self._tail = (self._tail + chunk)[-_TAIL_BYTES:]


def body_aborted(body: bytes) -> bool:
    """A whole body (a non-streaming completion, or a buffered SSE stream) records an aborted
    generation: some choice ended with ``finish_reason`` "abort"."""
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
