"""`spotstart guard ... -- transformers serve` against the real server (transformers 5.x, the
tiny Llama made in the test). It stops unlike vLLM: on SIGTERM it finishes what is in flight
(a generation whose client has left included) and exits 143; its streams end without
``data: [DONE]``; it has no /metrics. Two guards in
front of one server: AWS's (not supervising) with requests that fit its window, then GCE's,
supervising it, with one request that cannot fit."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from spotstart.emulate.metadata import MetadataEmulator
from tests.engines import kit
from tests.engines.guard_load import (
    drain_under_load,
    guard_argv,
    processes_with,
    server_group_killed,
    server_pid,
    summary,
)


def test_guards_drain_transformers_serve_on_aws_and_gce_notices(
    engine_python: Path, tiny_llama: Path, engine_cache: dict[str, str], tmp_path: Path
) -> None:
    server_port, gce_port, aws_port = (kit.free_port() for _ in range(3))
    upstream = f"http://127.0.0.1:{server_port}"
    env = kit.engine_env(engine_cache)
    model = str(tiny_llama)  # transformers serve: a request's model is the directory
    with MetadataEmulator("gce") as gce, MetadataEmulator("aws") as aws:
        gce_guard = guard_argv(
            upstream,
            gce_port,
            "--cloud",
            "gce",
            "--metadata-url",
            gce.url,
            "--safety-margin",
            "22",  # 30 s notice: 8 s budget, 5 s for requests, 3 s to stop the server
            "--stop-grace",
            "3",
            "--min-grace",
            "1",
            "--",
            *kit.transformers_argv(engine_python, tiny_llama, server_port),
        )
        aws_guard = guard_argv(
            upstream,
            aws_port,
            "--cloud",
            "aws",
            "--metadata-url",
            aws.url,
            "--safety-margin",
            "3",
            "--min-grace",
            "1",
        )
        with (
            server_group_killed(tmp_path / "guard-gce.log"),
            kit.Engine(gce_guard, env, tmp_path / "guard-gce.log") as g_gce,
            kit.Engine(aws_guard, env, tmp_path / "guard-aws.log") as g_aws,
        ):
            g_gce.wait_ready(f"http://127.0.0.1:{gce_port}/readyz", timeout_s=300)
            g_aws.wait_ready(f"http://127.0.0.1:{aws_port}/readyz", timeout_s=60)
            pid = server_pid(g_gce.log())

            # AWS: short requests only (transformers serve runs one request at a time: a long
            # one would hold the short ones behind it)
            notified = time.monotonic()

            def aws_notice() -> None:
                nonlocal notified
                notified = time.monotonic()
                aws.preempt(notice_s=8)

            answers = asyncio.run(
                drain_under_load(
                    f"http://127.0.0.1:{aws_port}", model, aws_notice, long_tokens=None, clients=2
                )
            )
            assert g_aws.wait(13) == 0
            assert time.monotonic() - notified < 8
            log = g_aws.log()
            counts = summary(log)
            assert sum(a.served for a in answers) >= 2, answers
            # refused (503 + Retry-After, or a connection to a guard that had exited), or
            # served: every request the guard accepted was served
            ok = [a.served or a.retryable or a.status is None for a in answers]
            assert all(ok), (answers, log[-3000:])
            assert counts["accepted"] == sum(a.served for a in answers), (counts, answers)
            # its streams end on the last finish_reason, without [DONE]: passed on as sent
            assert counts["lost"] == 0 and counts["failed"] == 0, counts

            # GCE: one request that cannot finish in 5 s, alone on the server
            def gce_notice() -> None:
                nonlocal notified
                notified = time.monotonic()
                gce.preempt()

            answers = asyncio.run(
                drain_under_load(
                    f"http://127.0.0.1:{gce_port}",
                    model,
                    gce_notice,
                    long_tokens=1800,
                    clients=0,
                )
            )
            assert g_gce.wait(35) == 0
            assert time.monotonic() - notified < 30
            log = g_gce.log()
            counts = summary(log)
            (long,) = answers
            if long.status == 200:  # it stopped early (an end-of-text token): served, not lost
                assert long.served and counts["lost"] == 0, (long, counts)
            else:
                assert long.status == 503 and long.retryable, long
                assert counts["dropped"] == 1 and counts["lost"] == 1, counts
            # On SIGTERM it finishes what is in flight, and that includes the generation the
            # guard cut (transformers serve does not stop generating when the client leaves):
            # with the long request it outlives a 3 s stop grace and gets SIGKILL, in time.
            assert "stopping server with SIGTERM" in log and "server stopped: " in log, log
            assert not kit.group_pids(pid) and not processes_with(str(tiny_llama))
