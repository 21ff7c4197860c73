"""Bad input to the peer, doctor and timeline commands: exit 2 with one line naming the fix;
a peer server at its bound answers 503 with Retry-After."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from spotstart.fetch.peer_server import PeerServer
from tests.conftest import error_line, run_cli


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["serve-peers", "/no/such/dir"], "no such directory"),
        (["serve-peers", ".", "--listen", "nohostport"], "expected HOST:PORT"),
        (["serve-peers", ".", "--max-active", "0"], "--max-active must be >= 1"),
        (["serve-peers", ".", "--peer-token-file", "/no/such/token"], "--peer-token-file"),
        (["fetch", "gs://b/m/", "DEST", "--peers", "host-without-port"], "expected HOST:PORT"),
        (["load", "gs://b/m/", "--serve-peers", "127.0.0.1:0"], "load keeps no files to serve"),
        (["doctor", "--seconds", "0"], "--seconds must be > 0"),
        (
            [
                "guard",
                "--upstream",
                "http://127.0.0.1:9",
                "--listen",
                "127.0.0.1:0",
                "--serve-peers",
                "/no/such:127.0.0.1:0",
            ],
            "expected DIR:HOST:PORT",
        ),
    ],
)
def test_bad_input_is_exit_2_with_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    res = run_cli([a.replace("DEST", str(tmp_path)) for a in args])
    assert res.code == 2, (res.code, res.stderr)
    assert needle in error_line(res.stderr)


def test_a_peer_server_at_its_bound_answers_503_with_retry_after(tmp_path: Path) -> None:
    async def go() -> tuple[int, str | None]:
        server = PeerServer(tmp_path, max_active=0)
        port = await server.start("127.0.0.1", 0)
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{port}/v1/inventory") as r,
            ):
                return r.status, r.headers.get("Retry-After")
        finally:
            await server.close()

    assert asyncio.run(go()) == (503, "1")
