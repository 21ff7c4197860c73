"""The guard's HTTP side: a streaming aiohttp reverse proxy in front of any HTTP inference server
(vLLM, TGI, Triton), plus the guard's own /readyz, /livez and /spotstart/metrics. It asks the
DrainController whether to accept each request and tells it when each ends; it decides nothing.

Who can reach it: every client of the inference server (often a whole cluster, or the internet
behind a load balancer), and the kubelet's probes. Its port is a
:class:`spotstart.listen.BoundedListener`: a connection cap, a deadline for each request head,
accept errors logged once per interval. Only connections outside a request (idle keep-alive,
an unfinished head) are ever evicted or timed out; a request in progress (a long generation, a
slow stream) is the DrainController's alone to end.

What the engine's answers say is read on the way through (guard/answers.py): a completion it
aborted (``finish_reason`` "abort") is counted lost, and a non-streaming one reaches the client
as 503 + Retry-After instead of a truncated 200; a request it refused because it is shutting
down, or a connection it refused, is answered 503 + Retry-After (it never started it, so the
client may retry elsewhere) and turns the guard unready.

A router in front (`spotstart route`) sends ``X-Spotstart-Continue: 1`` (guard/announce.py): the
guard strips it before the server, names itself in ``X-Spotstart-Replica`` on the answer, and
when a drain starts writes one SSE comment into each such stream, between two events, saying
when it will cut it (``--continue-grace``: early), so that the router continues it elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import yarl
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from spotstart.errors import UsageError
from spotstart.guard.announce import (
    CONTINUE_HEADER,
    REPLICA_HEADER,
    EventBoundary,
    drain_comment,
    wants_continue,
)
from spotstart.guard.answers import (
    REFUSAL_PEEK_BYTES,
    AbortScanner,
    aborted_answer,
    body_aborted,
    is_event_stream,
    is_json,
    is_shutdown_refusal,
    refused_answer,
)
from spotstart.guard.drain import Clock, DrainController, Outcome, Phase
from spotstart.guard.metrics import CONTENT_TYPE, GuardMetrics
from spotstart.hopbyhop import forwardable
from spotstart.listen import (
    BoundedListener,
    ListenLimits,
    raise_open_files_limit,
    request_error_log,
)

log = logging.getLogger("spotstart.guard")

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


SMALL_BODY_BYTES = 256 * 1024  # a complete response up to this size: sent in one write


@dataclass(frozen=True)
class ProxyConfig:
    """Where to listen, where to forward, and the guard's own paths (answered, not forwarded).

    Memory: one read buffer per in-flight stream (aiohttp's 64 KiB by default), plus at most
    ``json_buffer_budget_bytes`` in all for non-streaming JSON answers held whole (each up to
    ``json_buffer_bytes``) so that one the engine aborted can be answered 503 instead of a
    truncated 200; an answer that does not fit is streamed (still counted if aborted).
    Streams are never held. ``health_path=None`` means the upstream counts as healthy
    whenever it answers.
    """

    upstream: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    readyz_path: str = "/readyz"
    livez_path: str = "/livez"
    metrics_path: str = "/spotstart/metrics"  # /metrics belongs to the server (vLLM, TGI)
    health_path: str | None = "/health"
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    upstream_connections: int = 1024
    connect_timeout_s: float = 10.0
    limits: ListenLimits | None = None  # None: proxy_limits() for this process
    # A non-streaming completion is sent by the engine at once when it is done (vLLM: a few
    # KiB): holding it costs no latency a client can use, and lets the guard turn an aborted
    # one into a 503 the client retries. 1 MiB covers n=16 with logprobs.
    json_buffer_bytes: int = 1 << 20
    json_buffer_budget_bytes: int = 64 << 20
    # For requests carrying ``X-Spotstart-Continue: 1`` (a router that continues cut streams
    # elsewhere): the ``X-Spotstart-Replica`` header's value (None: the host name), and how
    # long after a notice their streams are cut (None: at the drain deadline, like any other).
    replica_id: str | None = None
    continue_grace_s: float | None = None


def proxy_limits(max_connections: int | None = None) -> ListenLimits:
    """The guard port's bounds: at most 4096 connections, or a quarter of ``ulimit -n`` (each
    forwarded request holds a second descriptor upstream, and ``--serve-peers`` takes its own
    quarter). Idle keep-alive connections are kept 620 s, longer than the load balancers in
    front keep theirs (Google's 600 s, AWS ALB's 60 s): a backend that closes first races the
    balancer's next request on that connection into a 502. Heads up to 64 KiB (large tokens and
    cookies), complete within 10 s."""
    soft = raise_open_files_limit()
    if max_connections is None:
        max_connections = max(8, min(4096, soft // 4))
    return ListenLimits(
        max_connections=max_connections,
        head_timeout_s=10.0,
        idle_timeout_s=620.0,
        max_head_bytes=64 << 10,
        request_bodies=True,
    )


def _forwardable(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    return forwardable(headers, HOP_BY_HOP)


def request_target(raw: str) -> str | None:
    """The origin-form target to send upstream (path and query, as received). An absolute-form
    target (``GET http://host/path``, RFC 9112 section 3.2.2) is reduced to its path and query;
    None for what cannot be forwarded (asterisk-form, or no path at all)."""
    if raw.startswith("/"):
        return raw
    if "://" in raw:
        parts = urlsplit(raw)
        if parts.scheme.lower() in ("http", "https") and parts.netloc:
            return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return None


class _Exchange:
    """One forwarded request's fate as the forwarding learns it."""

    __slots__ = ("continued", "outcome", "responding")

    def __init__(self) -> None:
        self.outcome: Outcome = "ok"
        self.responding = False  # the client has the status line: a cut can only close it
        self.continued = False  # sent by a router that continues a cut stream elsewhere


class _AnnouncedStream:
    """An SSE stream whose request carried ``X-Spotstart-Continue: 1``: told of the drain by
    one comment, and cut early under ``continue_grace_s``."""

    __slots__ = ("cut_at", "noticed", "parked", "task", "timer", "woken")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.noticed = False
        self.cut_at = 0.0  # clock time the guard cuts it; set with ``noticed``
        self.timer: asyncio.TimerHandle | None = None
        # Waiting for the upstream's next bytes, with the comment still to write: the notice
        # wakes it by cancelling that wait (``woken``), and the relay goes on. Cheaper than
        # waiting on two things for every token (measured: +50% of the guard's CPU per chunk
        # with a task and asyncio.wait per read).
        self.parked = False
        self.woken = False


async def _read_upto(upstream: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The body if it ends within ``limit`` bytes (True), else what was read so far (False)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in upstream.content.iter_any():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts), False
    return b"".join(parts), True


def _identity(headers: CIMultiDictProxy[str]) -> bool:
    """The body is as the engine wrote it (no Content-Encoding: its JSON can be read)."""
    return headers.get("Content-Encoding", "identity").strip().lower() in ("", "identity")


class GuardProxy:
    """Serves until ``close()``; ``cancel_in_flight()`` cuts the requests still running."""

    def __init__(
        self,
        config: ProxyConfig,
        controller: DrainController,
        metrics: GuardMetrics,
        clock: Clock,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.controller = controller
        self.metrics = metrics
        self._clock = clock
        self._on_change = on_change
        self._upstream = config.upstream.rstrip("/")
        self._tasks: set[asyncio.Task[object]] = set()
        self._cut: set[asyncio.Task[object]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._poll_now = asyncio.Event()
        self._json_buffered = 0  # bytes reserved for JSON answers held whole, all requests
        self._announced: set[_AnnouncedStream] = set()
        self._noticed_at: float | None = None  # clock time the drain began
        self.replica_id = config.replica_id or socket.gethostname()
        self.limits = config.limits or proxy_limits()
        self.listener: BoundedListener | None = None
        self.bound_port: int = config.listen_port

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.upstream_connections, keepalive_timeout=30.0
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # pass bytes through as the upstream encoded them
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that leaves cancels its handler, and with it the
        # upstream request (which may hold a GPU slot, and the drain).
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1,
            handler_cancellation=True,
            keepalive_timeout=self.limits.idle_timeout_s,
            logger=request_error_log(log),
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self.listener = BoundedListener(self._runner.server, self.limits, log, "guard port")
        self.metrics.listener = self.listener
        try:
            self.bound_port = await self.listener.start(
                self.config.listen_host, self.config.listen_port
            )
        except OSError as exc:
            await self._runner.cleanup()
            await self._session.close()
            where = f"{self.config.listen_host}:{self.config.listen_port}"
            raise UsageError(
                f"--listen {where}: cannot listen: {exc.strerror or exc}; choose another port"
            ) from exc
        self._health_task = asyncio.create_task(self._poll_health())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        if self.listener is not None:
            await self.listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def cancel_in_flight(self, wait_s: float = 1.0) -> None:
        tasks = set(self._tasks)
        self._cut |= tasks
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=wait_s)

    def announce_drain(self) -> None:
        """A drain began: each stream of a request that carried ``X-Spotstart-Continue: 1``
        gets its comment at its next event boundary, and with ``continue_grace_s`` is cut
        that long from now (never later than the drain deadline). Streams that begin their
        answer later in the drain (accepted before the notice) get the same at their start."""
        if self._noticed_at is not None:
            return
        self._noticed_at = self._clock()
        for stream in self._announced:
            self._notify(stream)

    def _stream_cut_at(self) -> float:
        assert self._noticed_at is not None
        until = self.controller.drain_until
        cut_at = self._noticed_at if until is None else until
        grace = self.config.continue_grace_s
        if grace is not None:
            cut_at = min(cut_at, self._noticed_at + grace)
        return cut_at

    def _notify(self, stream: _AnnouncedStream) -> None:
        stream.cut_at = self._stream_cut_at()
        stream.noticed = True
        if stream.parked and not stream.woken:
            # aiohttp's StreamReader keeps what arrives in its buffer whatever happens to a
            # waiting read: cancelling it loses no byte
            stream.woken = True
            stream.task.cancel()
        until = self.controller.drain_until
        if self.config.continue_grace_s is not None and (until is None or stream.cut_at < until):
            delay = max(0.0, stream.cut_at - self._clock())
            stream.timer = asyncio.get_running_loop().call_later(delay, self._cut_early, stream)

    def _cut_early(self, stream: _AnnouncedStream) -> None:
        if stream.task in self._tasks and not stream.task.done():
            self.metrics.streams_cut_early.inc()
            self._cut.add(stream.task)
            stream.task.cancel()

    # -- the guard's own endpoints ---------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # In a request from here to its end: the listener neither evicts this connection nor
        # times it out, however long the generation runs.
        conn = self.listener.connection_of(request.transport) if self.listener else None
        if conn is not None:
            conn.request_started()
        try:
            resp = await self._answer(request)
            if conn is not None and not resp.prepared:
                # sent before the request counts as done: a slow reader's answer is not
                # evictable while it is still being written
                try:
                    await resp.prepare(request)
                    await resp.write_eof()
                except (aiohttp.ClientError, OSError) as exc:
                    log.info("%s %s: answer cut (%s)", request.method, request.path[:200], exc)
                    raise asyncio.CancelledError from exc
            return resp
        finally:
            if conn is not None:
                conn.request_done()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == self.config.readyz_path:
            if self.controller.ready:
                return web.Response(text="ready\n")
            return web.Response(status=503, text=f"unready: {self._why_unready()}\n")
        if path == self.config.livez_path:
            return web.Response(text="alive\n")
        if path == self.config.metrics_path:
            return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
        if not self.controller.try_accept():
            rejection = web.Response(
                status=503,
                text="draining: this replica is being preempted; retry on another\n",
                headers={"Retry-After": str(self.controller.retry_after_s), "Connection": "close"},
            )
            rejection.force_close()
            return rejection
        # accepted while the engine is said to be shutting down: the one request let through
        # to ask it again
        probe = self.controller.upstream_shutting_down
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        outcome: Outcome = "failed"
        exchange = _Exchange()
        try:
            resp = await self._forward(request, exchange)
            outcome = exchange.outcome
            return resp
        except asyncio.CancelledError:
            if task in self._cut:
                outcome = "cut"
                if not exchange.responding:
                    # cut before the answer began (a non-streaming generation): the client
                    # gets a 503 it can retry elsewhere, not a dropped connection
                    task.uncancel()
                    return self._unavailable(
                        *refused_answer(
                            self.controller.retry_after_s,
                            "this replica is being preempted and could not finish the request "
                            "in time",
                        )
                    )
            raise
        finally:
            self._tasks.discard(task)
            self._cut.discard(task)
            self.controller.finish(outcome, probe=probe)
            if self.controller.phase is not Phase.SERVING:
                self._on_change()  # only a drain waits on requests ending

    def _unavailable(self, status: int, headers: dict[str, str], body: bytes) -> web.Response:
        resp = web.Response(status=status, body=body, headers=headers)
        resp.force_close()  # this replica is going: no keep-alive for the next request
        return resp

    def _why_unready(self) -> str:
        c = self.controller
        if c.crashed:
            return f"upstream server exited with code {c.server_exit_code}"
        if c.notice is not None:
            return f"draining after a {c.notice.kind.value} notice from {c.notice.source}"
        if c.upstream_shutting_down:
            return "upstream server is shutting down"
        if not c.upstream_healthy:
            return "upstream not healthy"
        return c.phase.value

    # -- forwarding ------------------------------------------------------------------------------

    async def _forward(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        assert self._session is not None
        target = request_target(request.raw_path)
        if target is None:
            return web.Response(status=400, text="bad request target\n")
        headers = _forwardable(request.headers)
        headers.popall("Host", None)
        # the router's word to this guard alone: the server never sees it
        exchange.continued = wants_continue(request.headers.get(CONTINUE_HEADER))
        headers.popall(CONTINUE_HEADER, None)
        peer = request.remote
        if peer:
            prior = headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        data = request.content if request.body_exists else None
        started = self._clock()
        try:
            # encoded=True: the request target goes upstream byte for byte (no %2e%2e or
            # %3B decoding, no dot-segment collapsing: a signed query string stays valid)
            upstream_cm = self._session.request(
                request.method,
                yarl.URL(self._upstream + target, encoded=True),
                headers=headers,
                data=data,
                allow_redirects=False,
            )
            upstream = await upstream_cm.__aenter__()
        except aiohttp.ClientConnectorError as exc:
            # no connection: the engine never saw the request (starting, stopped, crashed)
            log.warning("upstream %s not accepting connections: %s", self._upstream, exc)
            exchange.outcome = "refused"
            return self._unavailable(
                *refused_answer(
                    self.controller.retry_after_s, "the server is not accepting connections"
                )
            )
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.warning("upstream %s unreachable: %s", self._upstream, exc)
            # the body names no internal address: clients see only that the server is down
            return web.Response(status=502, text="bad gateway: the server is not reachable\n")
        if upstream.status != 503 and not self.controller.upstream_ever_healthy:
            # it answers HTTP: it has started (a health poll may not have said so yet), so it
            # acts on the stop signal and must not get a starting server's 1 s SIGKILL
            self.controller.note_upstream_started()
            self._on_change()
        try:
            self.metrics.upstream_latency.observe(self._clock() - started)
            return await self._relay(request, target, upstream, exchange)
        finally:
            await upstream_cm.__aexit__(None, None, None)

    async def _relay(
        self,
        request: web.Request,
        target: str,
        upstream: aiohttp.ClientResponse,
        exchange: _Exchange,
    ) -> web.StreamResponse:
        """The upstream's answer to the client: read whole where its verdict must come before
        the status line (a refusal, an aborted JSON completion), streamed otherwise."""
        headers = _forwardable(upstream.headers)
        if exchange.continued:
            headers[REPLICA_HEADER] = self.replica_id
        length = upstream.content_length
        ctype = upstream.headers.get("Content-Type", "")
        readable = request.method != "HEAD" and _identity(upstream.headers)
        fits = length is None or length <= self.config.json_buffer_bytes
        head = b""  # what was read of the body before streaming the rest
        if (
            upstream.status == 500
            and readable
            and (length is None or length <= REFUSAL_PEEK_BYTES)
            and self._json_buffered + REFUSAL_PEEK_BYTES <= self.config.json_buffer_budget_bytes
        ):
            # held within the same budget as JSON answers: a flood of 500s holds no more
            self._json_buffered += REFUSAL_PEEK_BYTES
            try:
                head, whole = await _read_upto(upstream, REFUSAL_PEEK_BYTES)
            except (aiohttp.ClientError, OSError) as exc:
                return self._cut_before_answer(request, target, exchange, exc)
            finally:
                self._json_buffered -= REFUSAL_PEEK_BYTES
            if whole and is_shutdown_refusal(upstream.status, head):
                if self.controller.on_upstream_shutting_down():
                    log.warning(
                        "upstream %s is shutting down (it refused a request): unready; new "
                        "requests are answered 503 + Retry-After, not forwarded",
                        self._upstream,
                    )
                self._on_change()
                exchange.outcome = "refused"
                return self._unavailable(
                    *refused_answer(self.controller.retry_after_s, "the server is shutting down")
                )
            if whole:
                exchange.outcome = "failed"  # an error passed on: not served
                return self._whole(upstream, headers, head)
        elif upstream.status == 200 and readable and is_json(ctype) and fits:
            reserve = min(length or self.config.json_buffer_bytes, self.config.json_buffer_bytes)
            if self._json_buffered + reserve <= self.config.json_buffer_budget_bytes:
                self._json_buffered += reserve
                try:
                    head, whole = await _read_upto(upstream, self.config.json_buffer_bytes)
                except (aiohttp.ClientError, OSError) as exc:
                    return self._cut_before_answer(request, target, exchange, exc)
                finally:
                    self._json_buffered -= reserve
                if whole and body_aborted(head):
                    log.info(
                        "%s %s: the server aborted the generation: 503",
                        request.method,
                        target[:200],
                    )
                    exchange.outcome = "aborted"
                    return self._unavailable(*aborted_answer(self.controller.retry_after_s))
                if whole:
                    return self._whole(upstream, headers, head)
        elif (
            length is not None
            and length <= SMALL_BODY_BYTES
            and request.method != "HEAD"
            and upstream.content.is_eof()
        ):
            # small and already complete: one write instead of headers + chunks + eof
            # (measured: about a fifth of the guard's CPU per short request). A small body
            # still arriving is streamed like any other, not held back.
            body = await upstream.read()
            if readable and is_event_stream(ctype) and body_aborted(body):
                exchange.outcome = "aborted"
            elif upstream.status >= 500:
                exchange.outcome = "failed"  # an error passed on: not served
            return self._whole(upstream, headers, body)
        scan = (
            AbortScanner(sse=is_event_stream(ctype))
            if readable and upstream.status == 200 and (is_event_stream(ctype) or is_json(ctype))
            else None
        )
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        resp.headers.extend(headers)
        if not self.controller.ready:
            resp.force_close()  # draining: no keep-alive for the next request
        announce = (
            exchange.continued and readable and upstream.status == 200 and is_event_stream(ctype)
        )
        exchange.responding = True
        await resp.prepare(request)
        try:
            if head:
                if scan is not None:
                    scan.feed(head)
                await resp.write(head)
            if announce:
                await self._pass_announcing(resp, upstream, scan, head)
            else:
                # iter_any: each chunk as it arrives (SSE tokens must not wait for a buffer)
                async for chunk in upstream.content.iter_any():
                    if scan is not None:
                        scan.feed(chunk)
                    await resp.write(chunk)
            await resp.write_eof()
        except (aiohttp.ClientError, OSError) as exc:
            # The upstream broke off mid-body, or the client left: end the client's
            # connection without a final chunk, so a cut response never looks complete.
            # One line, not a traceback: anyone can hang up.
            log.info("%s %s: response cut (%s)", request.method, target[:200], exc)
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from exc
        if scan is not None and scan.aborted:
            log.info("%s %s: the server aborted the generation", request.method, target[:200])
            exchange.outcome = "aborted"
        elif (scan is not None and scan.errored) or upstream.status >= 500:
            exchange.outcome = "failed"  # passed on as sent, but not served
        return resp

    async def _pass_announcing(
        self,
        resp: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        scan: AbortScanner | None,
        head: bytes,
    ) -> None:
        """The stream as it comes, plus the drain comment once, at the first event boundary
        after the notice. A stream idle between two tokens gets it at once, not with the next
        token: the notice wakes its read (see ``_notify``)."""
        task = asyncio.current_task()
        assert task is not None
        stream = _AnnouncedStream(task)
        self._announced.add(stream)
        if self._noticed_at is not None:
            self._notify(stream)
        boundary = EventBoundary()
        boundary.feed(head)
        told = False
        try:
            while True:
                if not told and stream.noticed and boundary.at_boundary:
                    await self._tell(resp, stream)
                    told = True
                stream.parked = not told and not stream.noticed
                try:
                    chunk = await upstream.content.readany()
                except asyncio.CancelledError:
                    if not stream.woken:
                        raise
                    # the notice's wake-up, not a cut: the bytes not read stay in the reader
                    stream.woken = False
                    if task.uncancel() > 0:
                        raise  # a cut (or the client leaving) came too
                    continue
                finally:
                    stream.parked = False
                if not chunk:
                    return
                if scan is not None:
                    scan.feed(chunk)
                at = boundary.feed(chunk)
                if told or not stream.noticed or at is None:
                    await resp.write(chunk)
                    continue
                if at:
                    await resp.write(chunk[:at])
                await self._tell(resp, stream)
                told = True
                if at < len(chunk):
                    await resp.write(chunk[at:])
        finally:
            if stream.timer is not None:
                stream.timer.cancel()
            self._announced.discard(stream)

    async def _tell(self, resp: web.StreamResponse, stream: _AnnouncedStream) -> None:
        left_ms = int((stream.cut_at - self._clock()) * 1000)
        await resp.write(drain_comment(left_ms))
        self.metrics.streams_announced.inc()

    def _cut_before_answer(
        self, request: web.Request, target: str, exchange: _Exchange, exc: Exception
    ) -> web.Response:
        """The upstream broke off an answer the guard was holding (it died, or its
        Content-Length lied): nothing of it reached the client, so a 502, counted failed."""
        log.info("%s %s: the server's answer was cut (%s): 502", request.method, target[:200], exc)
        exchange.outcome = "failed"
        resp = web.Response(status=502, text="bad gateway: the server's answer was cut short\n")
        resp.force_close()
        return resp

    def _whole(
        self, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str], body: bytes
    ) -> web.Response:
        headers.popall("Content-Length", None)
        resp = web.Response(
            status=upstream.status, reason=upstream.reason, body=body, headers=headers
        )
        if not self.controller.ready:
            resp.force_close()
        return resp

    async def _poll_health(self) -> None:
        assert self._session is not None
        path = self.config.health_path
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout_s)
        was: bool | None = None
        while True:
            # Polled through a drain too: the guard is unready whatever the verdict, but a
            # server seen healthy has started (it acts on the stop signal, and gets the full
            # stop grace, never a still-starting server's 1 s SIGKILL; one that came up after
            # ignoring the stop signal is sent it again)
            self._poll_now.clear()
            healthy = True
            if path is not None:
                try:
                    async with self._session.get(self._upstream + path, timeout=timeout) as r:
                        await r.read()
                        healthy = r.status < 400
                except (aiohttp.ClientError, OSError, TimeoutError):
                    healthy = False
                self.metrics.upstream_health_checks.labels("ok" if healthy else "fail").inc()
            if healthy and not self.controller.upstream_ever_healthy:
                self.controller.note_upstream_started()
                self._on_change()
            if healthy != was:
                log.info("upstream %s: %s", self._upstream, "healthy" if healthy else "unhealthy")
                was = healthy
                self.controller.set_upstream_health(healthy)
                self._on_change()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll_now.wait(), self.config.health_interval_s)

    def poll_health_now(self) -> None:
        """Ask the server's health at once (the guard is about to stop a server it has not
        seen started: a verdict within the short grace saves a started one from SIGKILL)."""
        self._poll_now.set()
