"""Stalls on the store's small requests and uploads: a store (or anything answering as one)
that stops reading an upload's body, or never answers, must cost a bounded wait and a
retryable StallDetected, never a hang (one was seen in CI: a create on an emulator that went
quiet held its test for the whole five-minute test timeout). A real TCP server on 127.0.0.1
speaks just enough HTTP/1.1 to read a request's head and then misbehaves as asked."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart.errors import StallDetected
from spotstart.store import HttpOptions, ObjectCreator, open_source, parse_url

MiB = 1 << 20
# The request dropped at the stall leaves its socket closing with unsent bytes queued for a
# peer that never reads them; the test's loop ends before aiohttp's cleanup of closed
# transports aborts it, so Python warns about the unclosed socket when it is collected.
DROPPED = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _Server:
    """One misbehaviour per server: ``deaf`` reads a request's head and nothing more;
    ``mute`` reads the whole request and never answers; ``slow`` reads the body at
    ``rate`` bytes/s and then answers 412 (the object exists)."""

    def __init__(self, mode: str, rate: int = 16 * MiB) -> None:
        self.mode = mode
        self.rate = rate
        self.received = 0  # body bytes read
        self.declared = 0  # the Content-Length of the last request
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            self.declared = length
            if self.mode == "deaf":
                await asyncio.sleep(3600)
            step = max(1, self.rate // 50)
            while self.received < length:
                piece = await reader.read(min(step, length - self.received))
                if not piece:
                    return
                self.received += len(piece)
                if self.mode == "slow":
                    await asyncio.sleep(len(piece) / self.rate)
            if self.mode == "mute":
                await asyncio.sleep(3600)
            body = b"<Error><Code>PreconditionFailed</Code></Error>"
            writer.write(
                b"HTTP/1.1 412 Precondition Failed\r\nContent-Type: application/xml\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> _Server:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
            await asyncio.sleep(0)  # the closed transports' callbacks

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture
def endpoint_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret" * 6)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    yield


def _url(scheme: str, port: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """The bucket's URL, its endpoint pointed at the server."""
    endpoint = f"http://127.0.0.1:{port}"
    if scheme == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    elif scheme == "gs":
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    else:
        return f"{endpoint}/model.bin"
    return f"{scheme}://bucket"


def _create(url: str, options: HttpOptions, path: Path) -> bool:
    async def go() -> bool:
        source = open_source(parse_url(url), options)
        try:
            assert isinstance(source, ObjectCreator)
            return await source.create("k/manifest.json", path, "application/json")
        finally:
            await source.close()

    return asyncio.run(go())


def _file(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "body.bin"
    path.write_bytes(os.urandom(size))
    return path


@DROPPED
@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_store_that_stops_reading_the_body_is_a_stall_not_a_hang(
    scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint_env: None
) -> None:
    # 32 MiB: more than loopback's socket buffers hold, so the sender blocks mid-body
    path = _file(tmp_path, 32 * MiB)
    with _Server("deaf") as server:
        options = HttpOptions(stall_timeout_s=0.5, answer_timeout_s=600)
        url = _url(scheme, server.port, monkeypatch)
        with pytest.raises(StallDetected, match=r"took no byte of the body for 0\.5s"):
            _create(url, options, path)
        assert server.received == 0


@DROPPED
@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_store_that_never_answers_an_upload_is_a_stall_after_the_answer_bound(
    scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint_env: None
) -> None:
    path = _file(tmp_path, 3 * MiB)
    with _Server("mute") as server:
        options = HttpOptions(stall_timeout_s=600, answer_timeout_s=0.5)
        url = _url(scheme, server.port, monkeypatch)
        with pytest.raises(StallDetected, match=r"did not answer within 0\.5s"):
            _create(url, options, path)
        assert server.received == server.declared > 3 * MiB - 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_slow_store_that_keeps_reading_is_not_a_stall(
    scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint_env: None
) -> None:
    """The stall bound is between pieces, not on the whole upload: 32 MiB read at 16 MiB/s
    takes about 2 s, four times the 0.5 s bound, and the create gets its answer (412: the
    object exists, so False)."""
    path = _file(tmp_path, 32 * MiB)
    with _Server("slow", rate=16 * MiB) as server:
        options = HttpOptions(stall_timeout_s=0.5, answer_timeout_s=30)
        url = _url(scheme, server.port, monkeypatch)
        assert _create(url, options, path) is False
        assert server.received == server.declared >= 32 * MiB


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scheme", ["s3", "gs", "http"])
def test_a_stat_that_is_never_answered_is_a_stall(
    scheme: str, monkeypatch: pytest.MonkeyPatch, endpoint_env: None
) -> None:
    with _Server("mute") as server:
        options = HttpOptions(stall_timeout_s=0.5)
        url = _url(scheme, server.port, monkeypatch)
        key = url if scheme == "http" else "k/model.bin"

        async def go() -> None:
            source = open_source(parse_url(url), options)
            try:
                await source.stat(key)
            finally:
                await source.close()

        with pytest.raises(StallDetected, match=r"no answer for 0\.5s"):
            asyncio.run(go())
