"""`spotstart guard` end to end, as a user runs it: a real guard process in front of a real
upstream process, closed-loop load through it, preemptions injected by SIGTERM and by the GCE
metadata emulator, an upstream crash. Every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.guard.test_proxy import (
    UPSTREAM_CMD,
    free_port,
    free_ports,
    start_guard,
    start_upstream,
    wait_until_ready,
)

TIMEOUT = aiohttp.ClientTimeout(total=20)


@dataclass(frozen=True)
class Outcome:
    client: int
    path: str
    after_notice: bool  # sent after the preemption was injected
    status: int | None  # None: a connection error or a truncated body
    complete: bool
    retry_after: str | None
    error: str = ""


async def closed_loop_load(
    url: str, notified: asyncio.Event, clients: int = 8, max_requests: int = 400
) -> list[Outcome]:
    """``clients`` loops, each sending its next request when the last one ended; odd clients
    stream SSE (~1 s), even ones call /fast. After the notice each client sends one more request,
    then stops."""
    outcomes: list[Outcome] = []
    connector = aiohttp.TCPConnector(force_close=True, limit=0)

    async def one(session: aiohttp.ClientSession, client: int) -> None:
        path = "/sse?n=10&gap=0.1" if client % 2 else "/fast"
        for _ in range(max_requests // clients):
            after = notified.is_set()
            try:
                async with session.get(url + path) as r:
                    body = await r.read()
                    complete = (
                        body.endswith(b"data: [DONE]\n\n") if client % 2 else (body == b"fast-ok")
                    )
                    outcomes.append(
                        Outcome(
                            client,
                            path,
                            after,
                            r.status,
                            r.status != 200 or complete,
                            r.headers.get("Retry-After"),
                        )
                    )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                outcomes.append(Outcome(client, path, after, None, False, None, repr(exc)))
            if after:
                return

    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        await asyncio.gather(*(one(session, i) for i in range(clients)))
    return outcomes


async def preempt_under_load(
    url: str, inject: Callable[[], None], min_done: int = 24
) -> tuple[list[Outcome], float]:
    """Run the load, inject the preemption once ``min_done`` requests completed; returns the
    outcomes and the seconds from the injection to the first 503 on /readyz."""
    notified = asyncio.Event()
    load = asyncio.create_task(closed_loop_load(url, notified))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as probe:
        for _ in range(2000):
            async with probe.get(url + "/spotstart/metrics") as r:
                text = await r.text()
            done = next(
                float(line.split()[1])
                for line in text.splitlines()
                if line.startswith("spotstart_guard_requests_accepted_total")
            )
            in_flight = next(
                float(line.split()[1])
                for line in text.splitlines()
                if line.startswith("spotstart_guard_in_flight ")
            )
            if done >= min_done and in_flight >= 2:
                break
            await asyncio.sleep(0.01)
        injected = time.monotonic()
        inject()
        notified.set()
        unready_after = None
        for _ in range(500):
            async with probe.get(url + "/readyz") as r:
                if r.status == 503:
                    unready_after = time.monotonic() - injected
                    break
            await asyncio.sleep(0.002)
    assert unready_after is not None, "/readyz never turned 503 after the notice"
    return await asyncio.wait_for(load, 30), unready_after


def assert_no_accepted_request_lost(outcomes: list[Outcome]) -> None:
    errors = [o for o in outcomes if o.status is None]
    assert not errors, errors[:5]
    truncated = [o for o in outcomes if o.status == 200 and not o.complete]
    assert not truncated, truncated[:5]
    assert sum(o.status == 200 for o in outcomes) >= 24
    later = [o for o in outcomes if o.after_notice]
    assert later and all(o.status in (200, 503) for o in later), later
    rejected = [o for o in outcomes if o.status == 503]
    assert rejected and all(o.retry_after == "1" for o in rejected), rejected


def wait_exit(proc: object, timeout_s: float) -> int:
    popen = proc.popen  # type: ignore[attr-defined]
    return int(popen.wait(timeout=timeout_s))


async def test_sigterm_mid_stream_drains_every_accepted_request_then_stops_the_server() -> None:
    port, listen_port = free_ports(2)
    guard, url = start_guard(
        f"http://127.0.0.1:{port}",
        "--cloud",
        "none",
        "--health-interval",
        "0.05",
        "--termination-window",
        "8",
        "--safety-margin",
        "1",
        "--stop-grace",
        "2",
        "--linger",
        "3",
        "--",
        *UPSTREAM_CMD,
        str(port),
        listen_port=listen_port,
    )
    try:
        wait_until_ready(url, proc=guard)
        pid = guard.popen.pid
        outcomes, unready_after = await preempt_under_load(url, lambda: os.kill(pid, 15))
        signalled = time.monotonic()
        code = wait_exit(guard, 8)
        gone_after = time.monotonic() - signalled
    finally:
        guard.stop()
    assert code == 0, guard.text
    assert_no_accepted_request_lost(outcomes)
    assert unready_after < 1.0
    assert gone_after < 8 - 1, "the guard outlived deadline - safety margin"
    assert "upstream: got SIGTERM" in guard.text
    assert " 0 dropped" in guard.text and " 0 failed" in guard.text, guard.text


async def test_gce_preemption_notice_drains_streams_in_flight_and_exits_before_deadline() -> None:
    pytest.importorskip("spotstart.guard.watchers.detect")
    from spotstart.emulate.metadata import MetadataEmulator

    upstream, upstream_url = start_upstream()
    try:
        with MetadataEmulator("gce") as emu:
            guard, url = start_guard(
                upstream_url,
                "--cloud",
                "gce",
                "--metadata-url",
                emu.url,
                "--health-interval",
                "0.05",
                "--safety-margin",
                "1",
                "--linger",
                "3",
            )
            try:
                wait_until_ready(url, proc=guard)
                outcomes, unready_after = await preempt_under_load(url, lambda: emu.preempt(in_s=0))
                code = wait_exit(guard, 25)
            finally:
                guard.stop()
    finally:
        upstream.stop()
    assert code == 0, guard.text
    assert_no_accepted_request_lost(outcomes)
    assert unready_after < 2.0
    assert "preemption notice from gce" in guard.text, guard.text


async def test_upstream_crash_turns_guard_unready_logs_exit_code_and_exits_nonzero() -> None:
    port, listen_port = free_ports(2)
    guard, url = start_guard(
        f"http://127.0.0.1:{port}",
        "--cloud",
        "none",
        "--health-interval",
        "0.05",
        "--",
        *UPSTREAM_CMD,
        str(port),
        listen_port=listen_port,
    )
    try:
        wait_until_ready(url, proc=guard)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(url + "/crash") as r:
            # the upstream died before answering: 502 when it dropped the request, 503 +
            # Retry-After when it was already gone and refused the connection (timing)
            assert r.status in (502, 503), r.status
        code = wait_exit(guard, 10)
    finally:
        guard.stop()
    assert code == 3
    assert "server exited unexpectedly: exit code 3" in guard.text, guard.text


async def test_notice_runs_the_hook_command_and_posts_the_webhook(tmp_path: Path) -> None:
    upstream, upstream_url = start_upstream()
    out = tmp_path / "notice.env"
    try:
        guard, url = start_guard(
            upstream_url,
            "--cloud",
            "none",
            "--health-interval",
            "0.05",
            "--linger",
            "1",
            "--on-notice",
            f"env | grep ^SPOTSTART_ > {out}",
            "--webhook",
            upstream_url + "/webhook",
        )
        try:
            wait_until_ready(url, proc=guard)
            guard.popen.send_signal(signal.SIGTERM)
            code = wait_exit(guard, 15)
        finally:
            guard.stop()
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as s,
            s.get(upstream_url + "/webhooks") as r,
        ):
            hooks = await r.json()
    finally:
        upstream.stop()
    assert code == 0, guard.text
    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert env["SPOTSTART_NOTICE_KIND"] == "termination"
    assert env["SPOTSTART_NOTICE_SOURCE"] == "signal"
    assert float(env["SPOTSTART_NOTICE_WINDOW_S"]) == 30.0
    assert len(hooks) == 1 and hooks[0]["notice_kind"] == "termination"
    assert hooks[0]["detail"] == {"signal": "SIGTERM"}


async def test_unreachable_webhook_is_logged_and_not_fatal() -> None:
    upstream, upstream_url = start_upstream()
    try:
        guard, url = start_guard(
            upstream_url,
            "--cloud",
            "none",
            "--health-interval",
            "0.05",
            "--webhook",
            f"http://127.0.0.1:{free_port()}/nobody",
            "--hook-timeout",
            "1",
        )
        try:
            wait_until_ready(url, proc=guard)
            guard.popen.send_signal(signal.SIGTERM)
            code = wait_exit(guard, 15)
        finally:
            guard.stop()
    finally:
        upstream.stop()
    assert code == 0 and "--webhook" in guard.text and "failed" in guard.text, guard.text


def test_bad_listen_address_is_a_usage_error() -> None:
    from tests.guard.test_proxy import GUARD_CMD, spawn

    proc = spawn([*GUARD_CMD, "--upstream", "http://127.0.0.1:1", "--listen", "nowhere"])
    code = wait_exit(proc, 20)
    proc.close()
    assert code == 2 and "HOST:PORT" in proc.text


async def test_stream_still_running_at_the_drain_deadline_is_cut_and_counted_dropped() -> None:
    upstream, upstream_url = start_upstream()
    try:
        guard, url = start_guard(
            upstream_url,
            "--cloud",
            "none",
            "--health-interval",
            "0.05",
            "--termination-window",
            "2.5",
            "--safety-margin",
            "1",
        )
        try:
            wait_until_ready(url, proc=guard)
            async with (
                aiohttp.ClientSession(timeout=TIMEOUT) as s,
                s.get(
                    url + "/sse?n=400&gap=0.05"  # 20 s: longer than the 1.5 s the drain allows
                ) as r,
            ):
                assert await r.content.readuntil(b"\n\n") == b"data: token-0\n\n"
                guard.popen.send_signal(signal.SIGTERM)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
            code = wait_exit(guard, 10)
        finally:
            guard.stop()
    finally:
        upstream.stop()
    assert code == 0, guard.text
    assert "cutting 1 in-flight requests" in guard.text
    assert " 1 dropped" in guard.text, guard.text


# -- scoping and kinds of notices, late notices, the emulator's own safety ------------------------


async def readyz(url: str) -> int:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(url + "/readyz") as r:
        return r.status


@contextlib.contextmanager
def guard_on(cloud: str, *extra: str, **emulator: Any) -> Iterator[tuple[Any, Any, str, str]]:
    """A real upstream, the ``cloud``'s metadata emulator and a guard watching it, ready:
    (guard process, emulator, guard URL, upstream URL); all torn down after."""
    from spotstart.emulate.metadata import MetadataEmulator

    upstream, upstream_url = start_upstream()
    try:
        with MetadataEmulator(cloud, **emulator) as emu:  # type: ignore[arg-type]
            guard, url = start_guard(
                upstream_url,
                "--cloud",
                cloud,
                "--metadata-url",
                emu.url,
                "--health-interval",
                "0.05",
                *extra,
            )
            try:
                wait_until_ready(url, proc=guard)
                yield guard, emu, url, upstream_url
            finally:
                guard.stop()
    finally:
        upstream.stop()


async def test_azure_event_for_another_member_leaves_this_replica_serving() -> None:
    with guard_on("azure", vm_name="gpu-pool_2") as (guard, emu, url, _):
        emu.preempt(resources=["_gpu-pool_5"])  # a neighbour in the scale set
        guard.wait_for_line("not this VM", timeout_s=15)
        assert await readyz(url) == 200 and guard.popen.poll() is None
        emu.preempt(resources=["_gpu-pool_2"])  # this VM: drained (nothing in flight)
        code = wait_exit(guard, 40)
    assert code == 0 and "preemption notice from azure" in guard.text, guard.text


async def test_gce_live_migration_only_warns_by_default() -> None:
    with guard_on("gce") as (guard, emu, url, _):
        emu.preempt(kind="maintenance")  # MIGRATE_ON_HOST_MAINTENANCE
        guard.wait_for_line("migration notice from gce", timeout_s=15)
        assert await readyz(url) == 200 and guard.popen.poll() is None
        guard.popen.send_signal(signal.SIGTERM)
        code = wait_exit(guard, 40)
    assert code == 0 and "still serving" in guard.text, guard.text


async def test_aws_notice_whose_time_is_already_past_still_lets_in_flight_streams_finish() -> None:
    with guard_on("aws", "--min-grace", "6") as (guard, emu, url, upstream_url):
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(url + "/gated-sse") as r:
            assert await r.content.readuntil(b"\n\n") == b"data: first\n\n"
            emu.preempt(notice_s=-30)  # "time" 30 s ago by our clock (skew, a late poll)
            for _ in range(500):  # readiness flips first
                if await readyz(url) == 503:
                    break
                await asyncio.sleep(0.01)
            async with s.post(upstream_url + "/release") as rel:
                assert rel.status == 200
            assert await r.read() == b"data: [DONE]\n\n"  # not cut at once
        code = wait_exit(guard, 20)
    assert code == 0, guard.text
    assert " 1 drained" in guard.text and " 0 dropped" in guard.text, guard.text


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_metadata_emulator_refuses_a_non_loopback_address_unless_asked(host: str) -> None:
    from tests.conftest import run_cli

    res = run_cli(["emulate", "metadata", "--cloud", "gce", "--host", host], timeout_s=30)
    assert res.code == 2, res.stderr
    assert "not a loopback address" in res.stderr and "--allow-remote" in res.stderr
