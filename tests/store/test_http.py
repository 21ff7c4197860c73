"""The plain-HTTP backend against a small real server that misbehaves on purpose: refuses
HEAD, answers the wrong range, changes size mid-read. (The well-behaved path is covered
against the emulated cloud in tests/fetch/test_integration.py.)"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from spotstart import FetchConfig, fetch_async
from spotstart.errors import IntegrityError, NotFound, ProtocolError, RetriesExceeded
from spotstart.fetch import Concurrency, Retry

MiB = 1 << 20
DATA = os.urandom(3 * MiB + 11)
CFG = FetchConfig(
    chunk_bytes=MiB,
    concurrency=Concurrency(streams=2),
    retry=Retry(max_attempts=2, backoff_base_s=0.001),
)


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file())


def _range(request: web.Request) -> tuple[int, int]:
    spec = request.headers["Range"].removeprefix("bytes=")
    first, last = spec.split("-")
    return int(first), int(last)


async def no_head(request: web.Request) -> web.StreamResponse:
    if request.method == "HEAD":
        return web.Response(status=405)
    first, last = _range(request)
    return web.Response(
        status=206,
        body=DATA[first : last + 1],
        headers={"Content-Range": f"bytes {first}-{last}/{len(DATA)}", "ETag": '"v1"'},
    )


async def wrong_range(request: web.Request) -> web.StreamResponse:
    if request.method == "HEAD":
        return web.Response(headers={"Content-Length": str(len(DATA)), "ETag": '"v1"'})
    first, last = _range(request)
    first, last = first + 1, last + 1  # off by one, every time
    return web.Response(
        status=206,
        body=DATA[first : last + 1],
        headers={"Content-Range": f"bytes {first}-{last}/{len(DATA)}"},
    )


async def grows(request: web.Request) -> web.StreamResponse:
    if request.method == "HEAD":
        return web.Response(headers={"Content-Length": str(len(DATA)), "ETag": '"v1"'})
    first, last = _range(request)
    return web.Response(
        status=206,
        body=DATA[first : last + 1],
        headers={"Content-Range": f"bytes {first}-{last}/{len(DATA) + 1}"},
    )


async def replaced(request: web.Request) -> web.StreamResponse:
    """HEAD saw version v1; by the time the ranged GETs come, v2 is there (If-Range: 200)."""
    if request.method == "HEAD":
        return web.Response(headers={"Content-Length": str(len(DATA)), "ETag": '"v1"'})
    assert request.headers.get("If-Range") == '"v1"'
    return web.Response(status=200, body=DATA[::-1], headers={"ETag": '"v2"'})


async def lies_about_ranges(request: web.Request) -> web.StreamResponse:
    """Advertises byte ranges, then answers every ranged GET with the whole body (200)."""
    headers = {"Content-Length": str(len(DATA)), "ETag": '"v1"', "Accept-Ranges": "bytes"}
    if request.method == "HEAD":
        return web.Response(headers=headers)
    return web.Response(body=DATA, headers={"ETag": '"v1"', "Accept-Ranges": "bytes"})


_served: dict[str, int] = {}


async def stops_honouring_ranges(request: web.Request) -> web.StreamResponse:
    """Honours the probe and the first ranged read, then answers 200 with the whole body."""
    if request.method == "HEAD":
        return web.Response(headers={"Content-Length": str(len(DATA)), "ETag": '"v1"'})
    _served["stops"] = _served.get("stops", 0) + 1
    if _served["stops"] > 2:
        return web.Response(body=DATA, headers={"ETag": '"v1"'})
    first, last = _range(request)
    return web.Response(
        status=206,
        body=DATA[first : last + 1],
        headers={"Content-Range": f"bytes {first}-{last}/{len(DATA)}", "ETag": '"v1"'},
    )


async def chunked(request: web.Request) -> web.StreamResponse:
    """Ranged answers with a chunked body (valid HTTP/1.1; not what object stores send)."""
    if request.method == "HEAD":
        return web.Response(headers={"Content-Length": str(len(DATA)), "ETag": '"v1"'})
    first, last = _range(request)
    resp = web.StreamResponse(
        status=206, headers={"Content-Range": f"bytes {first}-{last}/{len(DATA)}", "ETag": '"v1"'}
    )
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    body = DATA[first : last + 1]
    for at in range(0, len(body), 100_000):
        await resp.write(body[at : at + 100_000])
    await resp.write_eof()
    return resp


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in (("/no-head.bin", no_head), ("/wrong.bin", wrong_range)):
        app.router.add_route("*", path, handler)
    app.router.add_route("*", "/grows.bin", grows)
    app.router.add_route("*", "/chunked.bin", chunked)
    app.router.add_route("*", "/replaced.bin", replaced)
    app.router.add_route("*", "/lies.bin", lies_about_ranges)
    app.router.add_route("*", "/stops.bin", stops_honouring_ranges)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        yield str(srv.make_url("")).rstrip("/")
    finally:
        await srv.close()


async def test_server_refusing_head_is_sized_with_a_one_byte_range(
    server: str, tmp_path: Path
) -> None:
    report = await fetch_async(f"{server}/no-head.bin", tmp_path, CFG)
    assert (tmp_path / "no-head.bin").read_bytes() == DATA
    assert report.files_fetched == 1


async def test_answer_for_other_bytes_is_retried_then_refused(server: str, tmp_path: Path) -> None:
    with pytest.raises(RetriesExceeded, match="asked for bytes"):
        await fetch_async(f"{server}/wrong.bin", tmp_path, CFG)
    assert not (tmp_path / "wrong.bin").exists()


async def test_object_whose_size_changes_mid_read_is_object_changed(
    server: str, tmp_path: Path
) -> None:
    with pytest.raises(IntegrityError, match="size changed"):
        await fetch_async(f"{server}/grows.bin", tmp_path, CFG)
    assert _files(tmp_path) == []


async def test_missing_url_is_not_found(server: str, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="404"):
        await fetch_async(f"{server}/nope.bin", tmp_path, CFG)


@pytest.mark.parametrize("chunk_bytes", [MiB, 8 * MiB])
async def test_object_replaced_before_a_pinned_read_is_object_changed(
    server: str, tmp_path: Path, chunk_bytes: int
) -> None:
    # With one chunk the 200 is a whole body, of the wrong version: still refused.
    cfg = FetchConfig(
        chunk_bytes=chunk_bytes, concurrency=Concurrency(streams=2), retry=Retry(max_attempts=2)
    )
    with pytest.raises(IntegrityError, match="changed while being read"):
        await fetch_async(f"{server}/replaced.bin", tmp_path, cfg)
    assert _files(tmp_path) == []


async def test_a_server_that_advertises_ranges_but_ignores_them_is_read_as_one_stream(
    server: str, tmp_path: Path
) -> None:
    report = await fetch_async(f"{server}/lies.bin", tmp_path, CFG)
    assert (tmp_path / "lies.bin").read_bytes() == DATA
    assert report.chunk_bytes == len(DATA)  # one stream, not ranges answered with 200


async def test_a_server_that_stops_honouring_ranges_is_a_protocol_error_leaving_nothing(
    server: str, tmp_path: Path
) -> None:
    _served.clear()
    cfg = FetchConfig(
        chunk_bytes=MiB,
        concurrency=Concurrency(streams=1),
        retry=Retry(max_attempts=2, backoff_base_s=0.001),
    )
    with pytest.raises(ProtocolError, match="whole body") as caught:
        await fetch_async(f"{server}/stops.bin", tmp_path, cfg)
    assert caught.value.exit_code == 11
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # noqa: ASYNC240


async def test_chunked_ranged_bodies_go_through_the_stream_transport(
    server: str, tmp_path: Path
) -> None:
    report = await fetch_async(f"{server}/chunked.bin", tmp_path, CFG)
    assert (tmp_path / "chunked.bin").read_bytes() == DATA
    assert report.chunks_direct == 0 and report.retries == 0
