"""Red team of ObjectCreator.create: a storage endpoint (or anything answering as one) that
answers a create-only upload with a refusal or a server error must never make us believe the
object exists (the engine cache would then publish a manifest for an archive that is not
there, or report "exists" and never publish). A real HTTP server on 127.0.0.1 answers every
write with the status under test; HEAD answers 404 (nothing is there)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from spotstart.errors import SpotstartError
from spotstart.store import HttpOptions, ObjectCreator, open_source, parse_url


class _Answering:
    """aiohttp on 127.0.0.1 in its own loop thread: PUT/POST -> ``status``; HEAD/GET -> 404."""

    def __init__(self) -> None:
        self.status = 200
        self.writes = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        if request.method in ("PUT", "POST"):
            await request.read()
            self.writes += 1
            return web.Response(status=self.status, text="<Error><Code>X</Code></Error>")
        return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>")

    async def _start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
def server() -> Iterator[_Answering]:
    import threading

    s = _Answering()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(s._loop)
        s._loop.run_until_complete(s._start())
        ready.set()
        s._loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(30)
    yield s
    assert s._runner is not None
    asyncio.run_coroutine_threadsafe(s._runner.cleanup(), s._loop).result(30)
    s._loop.call_soon_threadsafe(s._loop.stop)
    t.join(30)
    s._loop.close()


@pytest.mark.parametrize("scheme", ["s3", "gs"])
@pytest.mark.parametrize("status", [401, 403, 404, 409, 500, 503])
def test_a_refusal_or_a_server_error_is_never_exists(
    server: _Answering,
    scheme: str,
    status: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = f"http://127.0.0.1:{server.port}"
    if scheme == "s3":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret" * 6)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    else:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    server.status = status
    body = tmp_path / "body"
    body.write_bytes(b"x" * 1000)

    async def go() -> bool:
        source = open_source(parse_url(f"{scheme}://bucket/k/manifest.json"), HttpOptions())
        try:
            assert isinstance(source, ObjectCreator)
            return await source.create("k/manifest.json", body, "application/json")
        finally:
            await source.close()

    with pytest.raises(SpotstartError):
        asyncio.run(go())
    assert server.writes >= 1


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_412_is_exists(
    server: _Answering, scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{server.port}"
    if scheme == "s3":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret" * 6)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    else:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    server.status = 412
    body = tmp_path / "body"
    body.write_bytes(b"x" * 1000)

    async def go() -> bool:
        source = open_source(parse_url(f"{scheme}://bucket/k/manifest.json"), HttpOptions())
        try:
            assert isinstance(source, ObjectCreator)
            return await source.create("k/manifest.json", body, "application/json")
        finally:
            await source.close()

    assert asyncio.run(go()) is False
