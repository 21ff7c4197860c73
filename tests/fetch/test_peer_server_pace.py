"""Serving pace against a real PeerServer on 127.0.0.1: with ``max_rate``, the bytes peers
receive never run ahead of one token bucket (``burst + rate * elapsed``, elapsed on the same
monotonic clock the server's loop paces by, measured from a moment the server was idle), two
readers share that one budget, a reader that leaves gives its share back, and the CLI flag
reaches the server. Assertions are on byte counts against the clock, never on how long
anything took: a slow machine only makes the bound looser, a server that does not pace
breaks it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from spotstart.fetch.peer_server import PeerServer
from tests.fetch.peer_dirs import Served, add_complete, range_of

MiB = 1 << 20
RATE = 2 * MiB  # bytes a second: 256 KiB pieces
CLI = [sys.executable, "-m", "spotstart.cli.main"]
GUARD = ["guard", "--upstream", "http://127.0.0.1:1", "--listen", "127.0.0.1:0"]


class Received:
    """Bytes received by every reader together, and whether they ever ran ahead of
    ``burst + rate * (t - t0)``."""

    def __init__(self, rate: float, burst: float, t0: float) -> None:
        self.rate, self.burst, self.t0 = rate, burst, t0
        self.total = 0
        self.samples = 0
        self.worst = -float("inf")  # received - allowed, at its largest

    def add(self, n: int, now: float) -> None:
        self.total += n
        self.samples += 1
        self.worst = max(self.worst, self.total - (self.burst + self.rate * (now - self.t0)))


async def _read(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], seen: Received
) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with session.get(url, headers=headers) as r:
        assert r.status == 206
        async for data in r.content.iter_any():
            out += data
            seen.add(len(data), loop.time())
    return bytes(out)


def test_two_readers_share_one_budget_and_never_run_ahead_of_it(tmp_path: Path) -> None:
    a = add_complete(tmp_path, "m/a.bin", os.urandom(3 * MiB // 2))
    b = add_complete(tmp_path, "m/b.bin", os.urandom(3 * MiB // 2))

    async def go() -> tuple[Received, list[bytes], PeerServer]:
        server = PeerServer(tmp_path, max_rate=RATE)
        port = await server.start("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{port}/v1/objects/"
                t0 = asyncio.get_running_loop().time()  # idle until now: at most a burst saved
                seen = Received(RATE, server.piece, t0)
                bodies = await asyncio.gather(
                    *(_read(s, base + f.oid, range_of(f, 0, len(f.data)), seen) for f in (a, b))
                )
            return seen, bodies, server
        finally:
            await server.close()

    seen, bodies, server = asyncio.run(go())
    assert bodies == [a.data, b.data]
    assert server.piece == RATE // 8 and server.bytes_served == 3 * MiB
    assert seen.total == 3 * MiB and seen.samples > 2
    # never ahead of one bucket (a float's worth of slack); a bucket per reader would let the
    # two together run a second's worth ahead of it, and no pacing the whole 3 MiB
    assert seen.worst <= 1e-6 * RATE, seen.worst
    assert server.bucket is not None and server.bucket.rate == RATE


def test_a_reader_that_leaves_while_it_waits_gives_its_share_back(tmp_path: Path) -> None:
    """Requests opened and abandoned while waiting for the bucket must not leave a debt
    that the readers who stay would wait behind."""

    async def go() -> tuple[float, float]:
        server = PeerServer(tmp_path, max_rate=RATE)
        await server.start("127.0.0.1", 0)
        try:
            assert server.bucket is not None
            await server._pace(server.piece)  # the burst: no wait
            before = server.bucket.tokens
            waiting = [asyncio.ensure_future(server._pace(server.piece)) for _ in range(50)]
            await asyncio.sleep(0)  # every one has taken its share and sleeps
            in_debt = server.bucket.tokens
            for w in waiting:
                w.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            assert in_debt < before - 25 * server.piece  # 50 pieces taken, a few ms accrued
            return before, server.bucket.tokens
        finally:
            await server.close()

    before, after = asyncio.run(go())
    # back to where it was (plus what accrued meanwhile), not 50 pieces in debt
    assert after >= before


def test_without_max_rate_nothing_is_paced(tmp_path: Path) -> None:
    async def go() -> PeerServer:
        server = PeerServer(tmp_path)
        await server.start("127.0.0.1", 0)
        await server._pace(1 << 40)  # returns at once: no bucket
        await server.close()
        return server

    server = asyncio.run(go())
    assert server.bucket is None and server.piece == 1 << 20
    with pytest.raises(ValueError):
        PeerServer(tmp_path, max_rate=0)


def _serve_peers(root: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "serve-peers", str(root), "--listen", "127.0.0.1:0", "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_peers_max_rate_paces_what_it_serves(tmp_path: Path) -> None:
    rate = 1 * MiB
    f: Served = add_complete(tmp_path, "m/a.bin", os.urandom(3 * MiB // 2))
    proc = _serve_peers(tmp_path, "--serve-max-rate", "1M")
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["max_rate"] == rate

        async def go() -> tuple[Received, bytes]:
            async with aiohttp.ClientSession() as s:
                # the server's loop paces on time.monotonic(), as this loop's time does; it
                # has served nothing before now
                seen = Received(rate, PeerServer(tmp_path, max_rate=rate).piece, time.monotonic())
                url = f"http://{line['listen']}/v1/objects/{f.oid}"
                return seen, await _read(s, url, range_of(f, 0, len(f.data)), seen)

        seen, body = asyncio.run(go())
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert body == f.data and seen.samples > 2
    assert seen.worst <= 1e-6 * rate, seen.worst


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["serve-peers", "{dir}", "--serve-max-rate", "0"], "more than 0"),
        (["serve-peers", "{dir}", "--serve-max-rate", "fast"], "not a size"),
        (["fetch", "gs://b/m/", "{dir}/out", "--serve-max-rate", "1M"], "needs --serve-peers"),
        (
            [*GUARD, "--serve-max-rate", "1M"],
            "needs --serve-peers",
        ),
    ],
)
def test_bad_or_lonely_serve_max_rate_is_a_usage_error(
    tmp_path: Path, argv: list[str], says: str
) -> None:
    cmd = [a.replace("{dir}", str(tmp_path)) for a in argv]
    done = subprocess.run(
        [*CLI, *cmd],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and says in done.stderr, done.stderr
