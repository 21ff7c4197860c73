"""`python bench/peers/counted.py ARGS...` = `spotstart ARGS...`, counting the peer control
traffic this process receives and sends: every HTTP exchange whose path starts with
/v1/inventory (status line + headers + Content-Length body of each answer, request line +
headers of each request). Written as JSON to $BENCH_CONTROL_OUT at exit. The same count for
any version of spotstart (it hooks aiohttp's client, not spotstart), so today's design and the
new one are measured alike; PeerSet.control_bytes, where the version has it, is recorded too
as a cross-check.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from typing import Any

from aiohttp import client_reqrep

COUNTS: dict[str, Any] = {
    "inventory_answers": 0,
    "inventory_not_modified": 0,
    "inventory_answer_bytes": 0,
    "inventory_request_bytes": 0,
    "answers_without_length": 0,
    "peerset_control_bytes": None,
}
_start = client_reqrep.ClientResponse.start


async def _counted_start(self: Any, connection: Any) -> Any:
    resp = await _start(self, connection)
    if self.url.path.startswith("/v1/inventory"):
        head = len(f"HTTP/1.1 {self.status} {self.reason or ''}\r\n") + 2
        head += sum(len(k) + len(v) + 4 for k, v in self.raw_headers)
        length = self.content_length
        if length is None and self.status != 304:
            COUNTS["answers_without_length"] += 1
        COUNTS["inventory_answers"] += 1
        COUNTS["inventory_not_modified"] += self.status == 304
        COUNTS["inventory_answer_bytes"] += head + (length or 0)
        info = self.request_info
        req = len(f"{info.method} {info.url.raw_path_qs} HTTP/1.1\r\n") + 2
        req += sum(len(k) + len(v) + 4 for k, v in info.headers.items())
        COUNTS["inventory_request_bytes"] += req
    return resp


client_reqrep.ClientResponse.start = _counted_start  # type: ignore[method-assign]


def _hook_peerset() -> None:
    try:
        from spotstart.fetch import peers
    except ImportError:
        return
    close = peers.PeerSet.close

    async def counted_close(self: Any) -> None:
        value = getattr(self, "control_bytes", None)
        if isinstance(value, int):
            COUNTS["peerset_control_bytes"] = (COUNTS["peerset_control_bytes"] or 0) + value
        await close(self)

    peers.PeerSet.close = counted_close  # type: ignore[method-assign]


def _write() -> None:
    out = os.environ.get("BENCH_CONTROL_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(COUNTS, f)


if __name__ == "__main__":
    _hook_peerset()
    atexit.register(_write)
    sys.argv[0] = "spotstart"
    from spotstart.cli.main import main

    code = main()
    _write()
    raise SystemExit(code)
