"""Load and bookkeeping shared by the guard's real-engine tests: OpenAI clients that record how
each request ended (complete, aborted, cut, 503), a drain under load, and the guard's own
"guard done" summary read from its log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=120)
PROMPT = "spot node zone"


def guard_argv(upstream: str, listen_port: int, *flags: str) -> list[str]:
    """``spotstart guard`` as a user runs it (this checkout's, through ``python -m``)."""
    return [
        sys.executable,
        "-m",
        "spotstart",
        "guard",
        "--upstream",
        upstream,
        "--listen",
        f"127.0.0.1:{listen_port}",
        "--health-interval",
        "0.2",
        *flags,
    ]


@dataclass(frozen=True)
class Answer:
    kind: str  # "fit-stream", "fit-json", "long"
    status: int | None  # None: the connection broke
    finish_reasons: tuple[str, ...] = ()
    done_marker: bool = False  # a stream ended with data: [DONE]
    retry_after: str | None = None
    error: str = ""
    refused: bool = False  # no connection: the guard had already exited (never sent)

    @property
    def served(self) -> bool:
        """A 200 whose every choice finished as asked (length or stop), never "abort"."""
        return (
            self.status == 200
            and bool(self.finish_reasons)
            and all(r in ("length", "stop") for r in self.finish_reasons)
        )

    @property
    def retryable(self) -> bool:
        """A 503 with Retry-After, or a connection refused (the request never left the
        client: a drained guard that has exited; any client retries that elsewhere)."""
        return (self.status == 503 and self.retry_after is not None) or self.refused


async def ask(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    kind: str,
    *,
    stream: bool,
    max_tokens: int,
    extra: dict[str, object] | None = None,
) -> Answer:
    """Streams go to /v1/chat/completions, the rest to /v1/completions."""
    body: dict[str, object] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **(extra or {}),
    }
    if stream:
        body["messages"] = [{"role": "user", "content": PROMPT}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = PROMPT
        path = "/v1/completions"
    try:
        async with session.post(url + path, json=body) as r:
            raw = await r.read()
    except aiohttp.ClientConnectorError as exc:
        return Answer(kind, None, error=repr(exc), refused=True)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Answer(kind, None, error=repr(exc))
    if r.status != 200:
        return Answer(kind, r.status, retry_after=r.headers.get("Retry-After"))
    if not stream:
        choices = json.loads(raw)["choices"]
        return Answer(kind, 200, tuple(str(c["finish_reason"]) for c in choices))
    reasons = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                if choice.get("finish_reason"):
                    reasons.append(str(choice["finish_reason"]))
    return Answer(kind, 200, tuple(reasons), raw.rstrip().endswith(b"data: [DONE]"))


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/spotstart/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the guard's metrics:\n{text}")


async def drain_under_load(
    url: str,
    model: str,
    inject: object,
    *,
    long_tokens: int | None,
    clients: int = 4,
    extra: dict[str, object] | None = None,
) -> list[Answer]:
    """``clients`` closed loops of short requests (half streaming) and, with ``long_tokens``,
    one request that cannot finish in the drain window; ``inject()`` once the long one and
    some short ones are in flight. Each loop stops at its first 503 (the guard is draining)."""
    answers: list[Answer] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def loop(i: int) -> None:
            stream = i % 2 == 1
            kind = "fit-stream" if stream else "fit-json"
            for _ in range(200):
                a = await ask(session, url, model, kind, stream=stream, max_tokens=12, extra=extra)
                answers.append(a)
                if a.status != 200:
                    return

        long = None
        if long_tokens is not None:
            long = asyncio.create_task(
                ask(session, url, model, "long", stream=False, max_tokens=long_tokens, extra=extra)
            )
        loops = [asyncio.create_task(loop(i)) for i in range(clients)]
        want = min(clients, 1) + (long is not None)
        for _ in range(600):  # until requests are in flight (bounded)
            in_flight = await metric(session, url, "spotstart_guard_in_flight")
            if in_flight >= want and (not clients or any(a.status == 200 for a in answers)):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the long one well under way
        inject()  # type: ignore[operator]
        await asyncio.wait_for(asyncio.gather(*loops), 90)
        if long is not None:
            answers.append(await asyncio.wait_for(long, 90))
    return answers


def summary(log: str) -> dict[str, int]:
    """The counts of the guard's last "guard done:" line."""
    lines = [line for line in log.splitlines() if "guard done:" in line]
    assert lines, f"no 'guard done' line in the guard's log:\n{log[-3000:]}"
    counts = dict(
        (name, int(n))
        for n, name in re.findall(
            r"(\d+) (accepted|drained|rejected|dropped|aborted|failed|lost)", lines[-1]
        )
    )
    return counts


def server_pid(log: str) -> int:
    found = re.search(r"started server pid (\d+)", log)
    assert found, log[-3000:]
    return int(found.group(1))


def processes_with(needle: str) -> list[str]:
    """Command lines of live processes that mention ``needle`` (a model path: an engine)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if needle in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
            out.append(f"{entry.name}: {cmd[:200]}")
    return out


@contextlib.contextmanager
def server_group_killed(log_path: Path) -> Iterator[None]:
    """At exit, SIGKILL the process group of the server the guard logged it started: the
    guard puts it in a session of its own, so killing the guard's group (kit.Engine) does not
    reach it when a test fails half-way."""
    try:
        yield
    finally:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        found = re.search(r"started server pid (\d+)", text)
        if found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(found.group(1)), signal.SIGKILL)
