"""Red team of `spotstart plan`'s trace sources: a server that lies about sizes, a cache another
local user can reach, hostile trace JSON. Real servers on 127.0.0.1 (a Python one where a lie
is needed: nginx tells the truth), real fetches, real files."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from spotstart.errors import LocalIOError, UnsafePath, UsageError
from spotstart.fetch import FetchConfig, fetch_async
from spotstart.fleet import ConfigError
from spotstart.fleet import sources as sources_mod
from spotstart.fleet import traces as traces_mod
from spotstart.fleet.config import build_config
from spotstart.fleet.sources import TraceSource
from spotstart.fleet.traces import parse_trace


def trace_bytes(data: list[int], gap: float = 60) -> bytes:
    return json.dumps({"metadata": {"gap_seconds": gap}, "data": data}).encode()


class LyingServer(ThreadingHTTPServer):
    """Answers its first stat (HEAD and the one-byte ranged probe after it) with ``small``'s
    size and everything after with ``large``: the server of a traces_dir that reports a small
    trace to plan's size check and then hands fetch a large one."""

    daemon_threads = True

    def __init__(self, small: bytes, large: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _LyingHandler)
        self.small, self.large = small, large
        self.heads = 0
        self.bytes_sent = 0
        self.lock = threading.Lock()

    def body(self) -> bytes:
        return self.small if self.heads <= 1 else self.large

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _LyingHandler(BaseHTTPRequestHandler):
    server: LyingServer

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        with self.server.lock:
            self.server.heads += 1
            body = self.server.body()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", "Sun, 06 Dec 2026 12:00:00 GMT")
        self.end_headers()

    def do_GET(self) -> None:
        with self.server.lock:
            body = self.server.body()
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if m is None:
            self.send_response(200)
            part, first = body, 0
        else:
            first, last = int(m.group(1)), min(int(m.group(2)), len(body) - 1)
            part = body[first : last + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(body)}")
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Last-Modified", "Sun, 06 Dec 2026 12:00:00 GMT")
        self.end_headers()
        self.wfile.write(part)
        with self.server.lock:
            self.server.bytes_sent += len(part)


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """A 4 KiB trace limit (the same code path as 64 MiB, without moving 64 MiB)."""
    monkeypatch.setattr(sources_mod, "MAX_TRACE_BYTES", 4096)
    monkeypatch.setattr(traces_mod, "MAX_TRACE_BYTES", 4096)
    return 4096


def serve(server: ThreadingHTTPServer) -> Iterator[None]:
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def test_a_server_that_reports_a_small_trace_and_sends_a_large_one_fills_no_cache(
    limit: int, tmp_path: Path
) -> None:
    small = trace_bytes([1] * 10)
    large = trace_bytes([1] * 100_000)  # 300 kB: a valid trace, over the limit
    assert len(small) < limit < len(large)
    server = LyingServer(small, large)
    for _ in serve(server):
        cache = tmp_path / "cache"
        src = TraceSource.at(f"{server.url}/t/", tmp_path, cache=cache)
        with pytest.raises(UsageError) as refused:
            src.read("a.json", "zones[0] (a)")
        assert "zones[0] (a)" in str(refused.value) and "more than the 4,096" in str(refused.value)
        assert refused.value.exit_code == 2
        # before the fix fetch wrote the whole large body into the cache (plan then refused
        # to read it); now nothing of it is written, and only the probes' bytes were asked for
        written = [p for p in cache.rglob("*") if p.is_file()]
        assert all(p.stat().st_size <= limit for p in written), written
        assert not list(cache.rglob("a.json"))
        assert server.bytes_sent < limit


def test_fetch_holds_what_it_resolves_to_max_bytes_and_max_objects(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_bytes(b"x" * 1000)
    (src / "b.json").write_bytes(b"y" * 10)
    dest = tmp_path / "dest"
    with pytest.raises(UsageError, match=r"1,000 bytes, more than the 999 this fetch takes"):
        asyncio.run(fetch_async(f"file://{src}/a.json", dest, FetchConfig(max_bytes=999)))
    with pytest.raises(UsageError, match="names 2 objects, more than the 1 this fetch takes"):
        asyncio.run(fetch_async(f"file://{src}/", dest, FetchConfig(max_objects=1)))
    assert not dest.exists() or not [p for p in dest.rglob("*") if p.is_file()]
    # at the limit: fetched
    report = asyncio.run(
        fetch_async(f"file://{src}/a.json", dest, FetchConfig(max_bytes=1000, max_objects=1))
    )
    assert report.files_total == 1 and (dest / "a.json").read_bytes() == b"x" * 1000


def _trace_server(tmp_path: Path) -> LyingServer:
    data = trace_bytes([1, 0, 1])
    return LyingServer(data, data)  # honest: the same both times


@pytest.mark.parametrize("how", ["writable by others", "owned by another user"])
def test_a_cache_another_user_controls_is_refused_before_anything_is_fetched(
    how: str, tmp_path: Path
) -> None:
    """A cache root others may write (or one another user made, say in /tmp): they could
    rename traces/ away and plant a link there between plan's check of traces/ and fetch's
    resolving of its DEST, and a root plan would write the trace through it. Before the fix
    only traces/ was checked."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if how == "writable by others":
        cache.chmod(0o777)
    else:
        if os.geteuid() != 0:
            pytest.skip("making a folder another user owns needs root")
        os.chown(cache, 12345, 12345)
    server = _trace_server(tmp_path)
    for _ in serve(server):
        src = TraceSource.at(f"{server.url}/t/", tmp_path, cache=cache)
        with pytest.raises(UnsafePath) as refused:
            src.read("a.json", "zones[0]")
        assert refused.value.exit_code == 8 and str(cache) in str(refused.value)
        assert "SPOTSTART_CACHE_DIR" in str(refused.value)
        assert server.heads == 0  # nothing was asked of the server
    assert not list(cache.rglob("a.json"))


def test_a_link_planted_at_the_cache_traces_folder_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (cache / "traces").symlink_to(target)
    server = _trace_server(tmp_path)
    for _ in serve(server):
        src = TraceSource.at(f"{server.url}/t/", tmp_path, cache=cache)
        with pytest.raises(LocalIOError, match="symlink"):
            src.read("a.json", "zones[0]")
    assert not list(target.rglob("*"))


def test_a_private_cache_still_works(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    server = _trace_server(tmp_path)
    data = trace_bytes([1, 0, 1])
    for _ in serve(server):
        src = TraceSource.at(f"{server.url}/t/", tmp_path, cache=cache)
        got, _ = src.read("a/b.json", "zones[0]", hashlib.sha256(data).hexdigest())
    assert got == data
    assert (cache.stat().st_mode & 0o077) == 0 and ((cache / "traces").stat().st_mode & 0o077) == 0


@pytest.mark.parametrize("gap", [1e308, 1e-300, 0.5, 86_401, -60])
def test_a_tick_no_trace_has_is_refused(gap: float) -> None:
    """gap_seconds 1e308 made every duration infinite: plan printed NaN availability and
    Infinity costs (not JSON) and exited 0."""
    body = json.dumps({"metadata": {"gap_seconds": gap}, "data": [1, 1, 0, 1]}).encode()
    with pytest.raises(ConfigError, match=r"gap_seconds must be a number of seconds from 1 to"):
        parse_trace(body, "z", "z.json")


def test_a_plan_over_huge_ticks_is_refused_not_infinite(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_bytes(trace_bytes([1, 1, 0, 1], gap=1e308))
    doc = {
        "zones": [{"name": "a", "trace": "a.json"}, {"name": "b", "trace": "b.json"}],
        "target": {"replicas": 1},
    }
    with pytest.raises(ConfigError, match=r"a\.json: metadata\.gap_seconds"):
        build_config(doc, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"metadata": {"gap_seconds": NaN}, "data": [1]}', "NaN"),
        (b'{"metadata": {"gap_seconds": Infinity}, "data": [1]}', "Infinity"),
        (b'{"metadata": {"gap_seconds": 60}, "data": [1, -1]}', "non-negative integers"),
        (b'{"metadata": {"gap_seconds": 60}, "data": [1, true]}', "non-negative integers"),
        (b'{"metadata": {"gap_seconds": 60}, "data": [1, 1.5]}', "non-negative integers"),
        (b'{"metadata": {"gap_seconds": 60}, "data": [1e400]}', "JSON"),
        (b'{"metadata": {"gap_seconds": 60}, "data": [4611686018427387904]}', "non-negative"),
        (b'{"metadata": {"gap_seconds": 60}, "data": []}', "empty trace"),
        (b'{"metadata": [], "data": [1]}', "gap_seconds"),
        (b'{"metadata": {"gap_seconds": 60}, "data": [' + b"0," * 5_000_000 + b"0]}", "values"),
        (b"\xff\xfe not utf-8", "JSON"),
    ],
)
def test_hostile_trace_json_is_a_config_error(body: bytes, why: str) -> None:
    """Held before the fix too: NaN/Infinity, negative, boolean, fractional and overflowing
    counts, an empty trace, and a value-count bomb (5 million zeros in 10 MB: parsing stops at
    4 million values) are each a ConfigError, never a traceback."""
    with pytest.raises(ConfigError, match=why):
        parse_trace(body, "z", "z.json")


def test_the_largest_counts_a_trace_may_hold_do_not_overflow_a_plan(tmp_path: Path) -> None:
    """k just under 2**62 in three zones: the simulator's sums stay in int64 (held)."""
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.json").write_bytes(trace_bytes([2**62 - 1] * 50))
    cfg = build_config(
        {
            "zones": [{"name": n, "trace": f"{n}.json"} for n in ("a", "b", "c")],
            "target": {"replicas": 3},
            "policies": ["spot_spread"],
        },
        base_dir=tmp_path,
    )
    from spotstart.fleet.policies import SpotSpread
    from spotstart.fleet.simulator import simulate

    result = simulate(cfg.spec, cfg.capacity, cfg.target, SpotSpread())
    assert result.availability == 1.0


@pytest.mark.parametrize("rel", [".spotstart/index.json", "a/.spotstart/parts/x", ".spotstart"])
def test_a_trace_named_inside_fetchs_own_files_is_refused(rel: str, tmp_path: Path) -> None:
    """'.spotstart/index.json' made fetch write the server's bytes over the cache index of the
    folder the other traces of that URL are fetched into (and '.spotstart/parts/...' beside
    their partial downloads). Refused before anything is asked of the server."""
    server = _trace_server(tmp_path)
    for _ in serve(server):
        src = TraceSource.at(f"{server.url}/t/", tmp_path, cache=tmp_path / "cache")
        with pytest.raises(ConfigError, match="where spotstart keeps its own files"):
            src.read(rel, "zones[0]")
        assert server.heads == 0


@pytest.mark.parametrize("rel", ["a.json?x", "a#b.json", "x/real.json?.json"])
@pytest.mark.parametrize("url", ["s3://traces-bkt/t/", "gs://traces-bkt/t", "az://acct/c/t/"])
def test_a_bucket_trace_name_with_query_characters_is_refused(
    rel: str, url: str, tmp_path: Path
) -> None:
    """A bucket URL's key ends at '?' or '#': 'real.json?.json' fetched 'real.json' and then
    looked for another name in the cache (a 'not found' about a file that was fetched)."""
    src = TraceSource.at(url, tmp_path, cache=tmp_path / "cache")
    with pytest.raises(ConfigError, match="cannot be part of"):
        src.read(rel, "zones[0]")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("synthetic", "says"),
    [
        # 72 million ticks: minutes at 8.5 GB before; 1e8 hours: a MemoryError traceback
        ({"hours": 20_000, "tick_seconds": 1}, "72,000,000 ticks, more than the 4,000,000"),
        ({"hours": 100_000_000, "tick_seconds": 1}, "more than the 4,000,000"),
        ({"nodes": 1e300}, r"nodes: must be below 2\*\*62"),  # OverflowError traceback before
        ({"nodes": 10**19}, r"nodes: must be below 2\*\*62"),
        ({"tick_seconds": 1e308}, "tick_seconds: from 1 to 86400"),  # NaN results, exit 0
        ({"tick_seconds": 0.001}, "tick_seconds: from 1 to 86400"),
    ],
)
def test_a_shared_fleet_yaml_cannot_make_plan_hang_crash_or_print_nan(
    synthetic: dict[str, float], says: str
) -> None:
    doc = {"zones": [{"name": "a", "synthetic": synthetic}], "target": {"replicas": 1}}
    with pytest.raises(ConfigError, match=says):
        build_config(doc)


def test_a_synthetic_zone_at_the_tick_limit_is_drawn(tmp_path: Path) -> None:
    cfg = build_config(
        {
            "zones": [{"name": "a", "synthetic": {"hours": 1000, "tick_seconds": 1}}],
            "target": {"replicas": 1},
            "policies": ["spot_spread"],
        }
    )
    assert cfg.capacity.shape == (1, 3_600_000)


def test_a_huge_value_in_an_error_is_cut_short() -> None:
    """A server's 10 MB string as gap_seconds was echoed whole into the error line."""
    body = json.dumps({"metadata": {"gap_seconds": "x" * 10_000_000}, "data": [1]}).encode()
    with pytest.raises(ConfigError) as refused:
        parse_trace(body, "z", "z.json")
    assert len(str(refused.value)) < 300


def _read_in_a_process(args: tuple[str, str]) -> str:
    url, cache = args
    try:
        data, _ = TraceSource.at(url, Path("/"), cache=Path(cache)).read("a/big.json", "z")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return hashlib.sha256(data).hexdigest()


def test_plans_fetching_one_trace_at_once_all_read_its_bytes(tmp_path: Path) -> None:
    """Six plans (processes) over one cache and URL at once: before the lock they raced in
    fetch's part files; some failed (exit 8: 'File exists while creating the part file', 'No
    such file ... while finishing the file') and one read a trace of other bytes."""
    import multiprocessing

    data = trace_bytes([1, 0] * 2_000_000)  # 8 MB: several chunks
    want = hashlib.sha256(data).hexdigest()
    server = LyingServer(data, data)
    for _ in serve(server):
        for attempt in range(3):
            cache = tmp_path / f"cache{attempt}"
            with multiprocessing.get_context("spawn").Pool(6) as pool:
                got = pool.map(_read_in_a_process, [(f"{server.url}/t/", str(cache))] * 6)
            assert got == [want] * 6
