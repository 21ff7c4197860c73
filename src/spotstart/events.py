"""Phase events: one small schema that fetch, load and guard emit, and `spotstart timeline`
reads beside what Kubernetes and the server's log record.

One JSON object a line::

    {"v": 1, "phase": "fetch", "start": 1764590000.12, "end": 1764590042.9,
     "bytes": 16000000000, "host": "gke-a100-7f2c", "pod": "llm-spot-5d9c-x2", "detail": "..."}

``start``/``end`` are unix seconds. An emitter may add keys of its own (guard's ``zone``,
``notice``, ``source``: what `spotstart plan record` reads); readers ignore the keys they do
not know. Written where ``--events FILE`` or ``SPOTSTART_EVENTS``
says (``-`` for stderr), appended with O_APPEND in one write a line, so several processes of
one pod may share a file. Nothing is written when neither is set."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

from spotstart import safefs

ENV = "SPOTSTART_EVENTS"
VERSION = 1

_target: str | None = None  # set by a CLI flag; else the environment decides


def configure(target: str | None) -> None:
    """Where this process writes (a path, ``-`` for stderr, None: ``$SPOTSTART_EVENTS``)."""
    global _target
    _target = target


def destination() -> str | None:
    return _target if _target is not None else (os.environ.get(ENV) or None)


def record(
    phase: str,
    start: float,
    end: float,
    *,
    bytes: int | None = None,
    detail: str = "",
    fields: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """Write one phase event (and return it); None when events are off. Never raises: a
    timeline is worth less than the fetch it describes. ``fields``: extra keys (never one of
    the schema's own)."""
    where = destination()
    if where is None:
        return None
    event: dict[str, Any] = {
        "v": VERSION,
        "phase": phase,
        "start": round(start, 6),
        "end": round(end, 6),
        "bytes": bytes,
        "host": socket.gethostname(),
        "pod": os.environ.get("POD_NAME", ""),
        "detail": detail,
    }
    for key, value in (fields or {}).items():
        event.setdefault(key, value)
    line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
    with contextlib.suppress(OSError):
        if where == "-":
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
        else:
            # Never through a link, a hard link or into a FIFO: the file often sits in a
            # directory others write (/tmp, a shared emptyDir).
            fd = safefs.open_append(where)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
    return event
