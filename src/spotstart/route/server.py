"""The router's HTTP server: every request passed to a ready replica, a request no replica
started sent again elsewhere, and a cut stream of ``/v1/completions`` or
``/v1/chat/completions`` continued on another replica and spliced into the client's stream
(:mod:`spotstart.route.splice`). Not a load balancer of other protocols (websockets, HTTP/2).

Attackers: every client byte is a stranger's. Bodies are bounded (``max_body_bytes``, 413),
heads and connections by :class:`spotstart.listen.BoundedListener` (slowloris, floods); the
target is a path only (absolute-form and ``//host`` targets never pick the upstream host:
the replica is always one of ours); hop-by-hop headers (and what ``Connection`` names) are
dropped both ways, and a client's own ``X-Spotstart-Continue`` is replaced by ours. A replica
is trusted to be a replica but not to be well-formed: its SSE lines and events, its JSON
answers and the text kept per stream are bounded, and what no engine sends cuts the leg."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from spotstart.errors import UsageError
from spotstart.hopbyhop import forwardable
from spotstart.listen import (
    BoundedListener,
    ListenLimits,
    raise_open_files_limit,
    request_error_log,
)
from spotstart.route.metrics import CONTENT_TYPE, RouteMetrics
from spotstart.route.replicas import (
    PrefixAffinity,
    Replica,
    ReplicaSet,
    ReplicaSource,
    keep_resolving,
)
from spotstart.route.splice import (
    Kind,
    LegOutcome,
    NotContinuable,
    Splice,
    UpstreamViolation,
    error_event,
    kind_of,
)
from spotstart.route.sse import Comment, SSEError, SSEReader
from spotstart.untrusted_json import JSONRejected, parse

__all__ = ["Router", "RouterConfig", "router_limits"]

log = logging.getLogger("spotstart.route")

CONTINUE_HEADER = "X-Spotstart-Continue"
DRAIN_COMMENT = "spotstart-drain"
REPLICA_HEADER = "X-Spotstart-Replica"

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
        CONTINUE_HEADER.lower(),
    }
)


def router_limits(max_connections: int | None = None) -> ListenLimits:
    """The router port's bounds: like the guard's (each request holds a second descriptor
    upstream): at most 4096 connections or a quarter of ``ulimit -n``; idle keep-alive 620 s
    (longer than the load balancers in front keep theirs); heads up to 64 KiB within 10 s."""
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


@dataclass(frozen=True)
class RouterConfig:
    """The router's settings. Memory per stream: the generated text once (at most
    ``max_kept_bytes``) and its token ids, plus one SSE line (``max_line_bytes``) and one event
    (``max_event_bytes``) being read; per request, its body (``max_body_bytes``) held for
    retries, and a non-streaming answer (``max_answer_bytes``)."""

    source: ReplicaSource
    listen_host: str = "127.0.0.1"
    listen_port: int = 8090
    readyz_path: str = "/readyz"  # polled on each replica (its guard's)
    metrics_path: str = "/metrics"
    poll_interval_s: float = 1.0
    poll_timeout_s: float = 2.0
    dns_interval_s: float = 5.0
    connect_timeout_s: float = 5.0
    upstream_idle_timeout_s: float = 300.0  # no byte from a replica for this long: a cut
    stream_idle_timeout_s: float = 60.0  # after a stream's first byte: no byte this long is a cut
    max_attempts: int = 5  # per request, attempts that no replica started
    backoff_s: float = 0.05  # doubled after each such attempt, at most 1 s
    continue_timeout_s: float = 30.0  # how long a cut request may wait for a ready replica
    max_continuations: int = 8
    token_ids: bool = True  # the replicas are vLLM: ask for token ids, splice exactly
    max_body_bytes: int = 16 << 20
    body_timeout_s: float = 120.0  # a request body not whole this long after its head: 408
    # what requests in flight may hold together: their bodies, and their parsed documents
    # (estimated, :func:`_parse_cost`); past it a request gets 503 + Retry-After (one request
    # is always taken, whatever its size)
    max_request_memory_bytes: int = 256 << 20
    max_answer_bytes: int = 16 << 20
    max_line_bytes: int = 1 << 20
    max_event_bytes: int = 4 << 20
    max_kept_bytes: int = 8 << 20
    affinity_slack: int = 2
    affinity_entries: int = 4096
    affinity_prefix_bytes: int = 1024
    upstream_connections: int = 0  # 0: no limit beyond the listener's
    limits: ListenLimits | None = None
    shutdown_delay_s: float = 5.0  # after SIGTERM: still accepting, /readyz 503
    shutdown_timeout_s: float = 600.0  # then: streams in flight get this long to finish
    extra: dict[str, Any] = field(default_factory=dict)


class _NoReplica(Exception):
    pass


class _Busy(Exception):
    """The requests in flight hold ``max_request_memory_bytes``: this one is refused."""


class _Grant:
    """The bytes one request holds of the router's ``max_request_memory_bytes``."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.held = 0

    def add(self, n: int) -> None:
        others = self.router.request_bytes - self.held
        if (
            others > 0
            and self.router.request_bytes + n > self.router.config.max_request_memory_bytes
        ):
            raise _Busy
        self.held += n
        self.router.request_bytes += n

    def release(self) -> None:
        self.router.request_bytes -= self.held
        self.held = 0


# what parsing a JSON body costs beyond its text, per value (an int object and a list slot,
# a dict entry...; a value takes as little as 2 bytes of text: ``1,``)
_VALUE_COST = 48


def _parse_cost(body: bytes) -> int:
    """An upper estimate of what the parsed body and its copies hold: each ``,``, ``[`` or
    ``{`` (inside strings too: an over-estimate) counted as a value."""
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    return 2 * len(body) + _VALUE_COST * values


class _ClientGone(Exception):
    pass


async def _write(client: web.StreamResponse, data: bytes) -> None:
    try:
        await client.write(data)
    except (aiohttp.ClientError, OSError) as exc:
        raise _ClientGone from exc


def _forwardable(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    return forwardable(headers, HOP_BY_HOP)


def _answer_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """A replica's answer headers for the client: end-to-end ones, less the guard's
    ``X-Spotstart-Replica`` (the pod's name: for the router, not for the public)."""
    out = _forwardable(headers)
    out.popall(REPLICA_HEADER, None)
    return out


def _target(raw: str) -> str | None:
    """The path and query to send upstream: an origin-form target only (``/...``); nothing
    in it may name another host or split the request line."""
    if not raw.startswith("/") or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in raw):
        return None
    return raw


def _prefix_of(kind: Kind, body: dict[str, Any], limit: int) -> bytes | None:
    """The first ``limit`` bytes of the model and the prompt (or messages) as JSON: only what
    those bytes need is serialized (a body of 400,000 messages serialized whole held the
    router's one event loop for 0.3 s)."""
    model = str(body.get("model"))
    value = body.get("prompt") if kind == "completions" else body.get("messages")
    if kind == "completions" and isinstance(value, str):
        raw = value[:limit]
    elif isinstance(value, list):
        parts = ["["]
        size = 1
        for i, item in enumerate(value):
            if size > limit:
                break
            piece = (", " if i else "") + json.dumps(item, sort_keys=True)
            parts.append(piece)
            size += len(piece)
        else:
            parts.append("]")
        raw = "".join(parts)
    else:
        raw = json.dumps(value, sort_keys=True)
    return (model + "\0" + raw).encode("utf-8", "replace")[:limit]


class Router:
    """One router. ``start()`` binds and starts polling; ``drain()`` is SIGTERM's work."""

    def __init__(self, config: RouterConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.replicas = ReplicaSet(config.affinity_slack, config.affinity_entries)
        if config.source.addresses:
            self.replicas.set_addresses(config.source.addresses)
        self.metrics = RouteMetrics(self.replicas)
        self.limits = config.limits or router_limits()
        self.draining = False
        self.request_bytes = 0  # held by requests in flight (bodies, parsed documents)
        self.bound_port = config.listen_port
        self.listener: BoundedListener | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.upstream_connections, keepalive_timeout=30.0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=cfg.connect_timeout_s,
                sock_read=cfg.upstream_idle_timeout_s,
            ),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            read_bufsize=1 << 16,
        )
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1,
            handler_cancellation=True,
            keepalive_timeout=self.limits.idle_timeout_s,
            # an answer given before its body was read (413, 408, 503 busy): the rest of the
            # body is read (so the answer is not lost to a reset) for at most this long
            lingering_time=2.0,
            logger=request_error_log(log),
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self.listener = BoundedListener(self._runner.server, self.limits, log, "router port")
        try:
            self.bound_port = await self.listener.start(cfg.listen_host, cfg.listen_port)
        except OSError as exc:
            await self._runner.cleanup()
            await self._session.close()
            where = f"{cfg.listen_host}:{cfg.listen_port}"
            raise UsageError(
                f"--listen {where}: cannot listen: {exc.strerror or exc}; choose another port"
            ) from exc
        self._tasks.append(asyncio.create_task(self._poll_forever()))
        if cfg.source.dns_name is not None:
            self._tasks.append(
                asyncio.create_task(keep_resolving(self.replicas, cfg.source, cfg.dns_interval_s))
            )

    async def drain(self) -> None:
        """SIGTERM: /readyz 503 for ``shutdown_delay_s`` (the Service stops sending), then no
        new connections, then the requests in flight get ``shutdown_timeout_s`` to finish."""
        self.draining = True
        await asyncio.sleep(self.config.shutdown_delay_s)
        if self.listener is not None:
            await self.listener.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.config.shutdown_timeout_s)
        for task in list(self._in_flight):
            task.cancel()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.listener is not None:
            await self.listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- readiness ---------------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.config.poll_interval_s)

    async def poll_once(self) -> None:
        replicas = list(self.replicas.replicas.values())
        await asyncio.gather(*(self._poll(r) for r in replicas))

    async def _poll(self, replica: Replica) -> None:
        assert self._session is not None
        url = URL(replica.base_url + self.config.readyz_path, encoded=True)
        try:
            async with self._session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=self.config.poll_timeout_s),
                allow_redirects=False,  # a redirect is not ready, and not followed anywhere
            ) as resp:
                await resp.content.read(4096)
                ready = resp.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            ready = False
        self.replicas.mark(replica, ready)

    # -- requests ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        conn = self.listener.connection_of(request.transport) if self.listener else None
        if conn is not None:
            conn.request_started()
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        try:
            resp = await self._answer(request)
            if self.draining:
                resp.force_close()  # keep-alive connections end with their request
            if not resp.prepared:
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    await resp.prepare(request)
                    await resp.write_eof()
            return resp
        finally:
            self._in_flight.discard(task)
            if not self._in_flight:
                self._idle.set()
            if conn is not None:
                conn.request_done()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/readyz":
            if self.draining:
                return web.Response(status=503, text="draining\n")
            return web.Response(text="ready\n")
        if path == "/livez":
            return web.Response(text="alive\n")
        if path == self.config.metrics_path:
            return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
        target = _target(request.raw_path)
        if target is None:
            return web.Response(status=400, text="a request target must be a path\n")
        grant = _Grant(self)
        try:
            return await self._answer_held(request, target, grant)
        except _Busy:
            resp = web.Response(
                status=503, text="the router is busy; try again\n", headers={"Retry-After": "1"}
            )
            resp.force_close()  # the body may be unread
            return resp
        finally:
            grant.release()

    async def _answer_held(
        self, request: web.Request, target: str, grant: _Grant
    ) -> web.StreamResponse:
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                body = await self._read_body(request, grant)
        except TimeoutError:
            resp = web.Response(status=408, text="the request body came too slowly\n")
            resp.force_close()
            return resp
        if body is None:
            return web.Response(
                status=413, text=f"request body over {self.config.max_body_bytes} bytes\n"
            )
        headers = _forwardable(request.headers)
        headers[CONTINUE_HEADER] = "1"
        path = request.path
        kind = kind_of(path) if request.method == "POST" else None
        doc: Any = None
        if kind is not None:
            grant.add(_parse_cost(body))
            try:
                doc = parse(body, what="request body")
            except JSONRejected:
                doc = None  # the replica answers it (400)
        if kind is None or not isinstance(doc, dict):
            self.metrics.requests.labels("other").inc()
            return await self._pass(request, target, headers, body)
        headers["Accept-Encoding"] = "identity"
        prefix = _prefix_of(kind, doc, self.config.affinity_prefix_bytes)
        key = PrefixAffinity.key(prefix) if prefix else None
        if doc.get("stream") is True:
            self.metrics.requests.labels(f"{kind}-stream").inc()
            return await self._stream(request, kind, target, headers, doc, key)
        self.metrics.requests.labels(kind).inc()
        return await self._whole(request, target, headers, body, key)

    async def _read_body(self, request: web.Request, grant: _Grant) -> bytes | None:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return None
        buf = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            grant.add(len(chunk))
            buf += chunk
            if len(buf) > limit:
                return None
        return bytes(buf)

    async def _open(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
        key: bytes | None,
        exclude: set[str],
        wait_s: float,
    ) -> tuple[Replica, aiohttp.ClientResponse]:
        """An upstream response some replica started: refused connections, 5xx answers and
        503s from draining guards are sent again to another replica (bounded attempts, backoff,
        ``wait_s`` for a ready one). The last attempt's 5xx is returned as it is."""
        assert self._session is not None
        attempts = 0
        tried: set[str] = set(exclude)
        backoff = self.config.backoff_s
        while True:
            replica = self.replicas.choose(key, tried)
            if replica is None:
                if not await self.replicas.wait_ready(wait_s, tried):
                    if tried - exclude and self.replicas.ready():
                        tried = set(exclude)  # every ready one failed once: go round again
                        continue
                    raise _NoReplica
                continue
            replica.outstanding += 1
            attempts += 1
            last = attempts >= self.config.max_attempts
            try:
                resp = await self._session.request(
                    method,
                    URL(replica.base_url + target, encoded=True),
                    headers=headers,
                    # a BytesIO: aiohttp sends one over 1 MiB without holding the loop
                    data=io.BytesIO(body) if body else None,
                    allow_redirects=False,
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("%s: not started (%s)", replica.address, exc)
                self.replicas.release(replica)
                self.replicas.mark(replica, False)
                if last:
                    raise _NoReplica from exc
            else:
                if resp.status < 500 or last:
                    return replica, resp
                resp.release()
                self.replicas.release(replica)
                if resp.status == 503:
                    self.replicas.mark(replica, False)
            tried.add(replica.address)
            self.metrics.retried.inc()
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 2)

    async def _pass(
        self, request: web.Request, target: str, headers: CIMultiDict[str], body: bytes
    ) -> web.StreamResponse:
        try:
            replica, resp = await self._open(
                request.method, target, headers, body, None, set(), self.config.continue_timeout_s
            )
        except _NoReplica:
            self.metrics.lost.inc()
            return web.Response(status=502, text="no replica could take the request\n")
        try:
            out = web.StreamResponse(status=resp.status, reason=resp.reason)
            out.headers.update(_answer_headers(resp.headers))
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                # cut mid-answer: the client's connection is closed without the end of the
                # body (an ended body would pass a truncated answer as whole)
                log.info("%s %s: answer cut (%s)", request.method, request.path[:200], exc)
                raise asyncio.CancelledError from exc
            await out.write_eof()
            return out
        finally:
            resp.release()
            self.replicas.release(replica)

    async def _whole(
        self,
        request: web.Request,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
        key: bytes | None,
    ) -> web.StreamResponse:
        """A non-streaming generation: held whole (bounded), run again on another replica when
        it was cut (connection lost, or a 200 with ``finish_reason: "abort"``, what vLLM answers
        on SIGTERM)."""
        exclude: set[str] = set()
        for _ in range(self.config.max_continuations + 1):
            try:
                replica, resp = await self._open(
                    "POST", target, headers, body, key, exclude, self.config.continue_timeout_s
                )
            except _NoReplica:
                break
            try:
                answer = await _read_bounded(resp, self.config.max_answer_bytes)
                if answer is None:
                    return web.Response(status=502, text="the replica's answer is too large\n")
                status, out_headers = resp.status, _answer_headers(resp.headers)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("%s: answer cut (%s); running it again", replica.address, exc)
                self.replicas.mark(replica, False)
                exclude = self._avoid({replica.address})
                self.metrics.rerun.inc()
                continue
            finally:
                resp.release()
                self.replicas.release(replica)
            if status == 200 and _aborted(answer):
                log.info("%s: answer aborted; running it again", replica.address)
                self.replicas.mark(replica, False)
                exclude = self._avoid({replica.address})
                self.metrics.rerun.inc()
                continue
            return web.Response(status=status, body=answer, headers=out_headers)
        self.metrics.lost.inc()
        return web.Response(status=502, text="no replica could finish the request\n")

    async def _stream(
        self,
        request: web.Request,
        kind: Kind,
        target: str,
        headers: CIMultiDict[str],
        doc: dict[str, Any],
        key: bytes | None,
    ) -> web.StreamResponse:
        cfg = self.config
        splice = Splice(
            kind, doc, token_ids_upstream=cfg.token_ids, max_kept_bytes=cfg.max_kept_bytes
        )
        client: web.StreamResponse | None = None
        exclude: set[str] = set()
        cut_by: set[str] = set()
        cut_at: float | None = None
        legs = 0
        headers["Content-Type"] = "application/json"
        headers.popall("Content-Encoding", None)  # the body is ours, re-encoded
        while True:
            if legs > 0:
                remaining = splice.remaining_tokens()
                if remaining is not None and remaining <= 0 and client is not None:
                    await client.write(splice.length_final_bytes() + splice.closing_bytes())
                    await client.write_eof()
                    return client
                if legs > cfg.max_continuations:
                    return await self._lost(request, client, "too many continuations")
                # not continued (n > 1...): run again only while no event reached the client
                if not splice.continuable and splice.sent_any:
                    return await self._lost(request, client, splice.why_not_continuable or "")
            try:
                up_body = splice.start_leg()
            except NotContinuable as exc:
                return await self._lost(request, client, str(exc))
            data = json.dumps(up_body).encode()
            leg_target = target if splice.leg_path == request.path else splice.leg_path
            try:
                replica, resp = await self._open(
                    "POST",
                    leg_target,
                    headers,
                    data,
                    key if legs == 0 else None,
                    exclude,
                    cfg.continue_timeout_s,
                )
            except _NoReplica:
                return await self._lost(request, client, "no replica could continue the stream")
            legs += 1
            continued = legs > 1 and (splice.tokens_sent > 0 or bool(splice.text_parts))
            if continued:
                self.metrics.continued.inc()
                self.metrics.extra_prefill_tokens.inc(splice.tokens_sent)
            outcome = LegOutcome.CUT
            try:
                ctype = resp.headers.get("Content-Type", "")
                if resp.status != 200 or not ctype.startswith("text/event-stream"):
                    if client is None:
                        answer = await _read_bounded(resp, cfg.max_answer_bytes)
                        if answer is None:
                            return web.Response(
                                status=502, text="the replica's answer is too large\n"
                            )
                        return web.Response(
                            status=resp.status, body=answer, headers=_answer_headers(resp.headers)
                        )
                    # a 4xx to a continuation (the prompt and what was generated over the
                    # model's length...) is the same on every replica: lost, with its reason
                    msg = (await resp.content.read(4096)).decode("utf-8", "replace")
                    return await self._lost(
                        request, client, f"continuation refused: {resp.status} {msg[:500]}"
                    )
                if client is None:
                    client = web.StreamResponse(status=200)
                    client.headers.update(_answer_headers(resp.headers))
                    client.headers.popall("Content-Encoding", None)
                    await client.prepare(request)
                outcome = await self._relay(replica, resp, splice, client, cut_at)
            except _ClientGone:
                assert client is not None
                return client
            except (aiohttp.ClientError, OSError, TimeoutError, SSEError) as exc:
                log.info("%s: stream cut (%s)", replica.address, exc)
                self.replicas.mark(replica, False)
            finally:
                if outcome is LegOutcome.FINISHED:
                    resp.release()
                else:
                    resp.close()  # the guard sees us leave and frees the engine's slot
                    if splice.finish_reason is not None:
                        # cut after the final chunk (before the usage chunk or [DONE]): the
                        # answer is whole; a continuation would add text after its end
                        outcome = LegOutcome.FINISHED
                self.replicas.release(replica)
            if outcome is LegOutcome.FINISHED:
                assert client is not None
                await client.write(splice.closing_bytes())
                await client.write_eof()
                return client
            cut_at = self.clock()
            # avoid every replica that cut this stream while another is ready
            cut_by.add(replica.address)
            exclude = self._avoid(cut_by)

    async def _relay(
        self,
        replica: Replica,
        resp: aiohttp.ClientResponse,
        splice: Splice,
        client: web.StreamResponse,
        cut_at: float | None,
    ) -> LegOutcome:
        """One upstream leg into the client's stream: FINISHED after [DONE] (or the end) with a
        finish_reason passed on, CUT otherwise (the drain comment when another replica is
        ready, an abort, an end without a finish, what no engine sends)."""
        reader = SSEReader(self.config.max_line_bytes, self.config.max_event_bytes)
        finished = False
        started = False
        while True:
            # silence once the stream has begun is a cut (vLLM on SIGTERM without --shutdown-
            # timeout held a stream open, silent, until the client gave up: engines24)
            idle = self.config.stream_idle_timeout_s if started else None
            try:
                async with asyncio.timeout(idle):
                    chunk = await resp.content.readany()
            except TimeoutError:
                log.warning("%s: no byte for %.0f s; continuing elsewhere", replica.address, idle)
                self.replicas.mark(replica, False)
                return LegOutcome.FINISHED if finished else LegOutcome.CUT
            if not chunk:
                break
            started = True
            for item in reader.feed(chunk):
                if isinstance(item, Comment):
                    if item.text.startswith(DRAIN_COMMENT):
                        self.replicas.mark(replica, False)
                        replica.draining_seen = True
                        # continue now while another can; else read on until the cut
                        others = [r for r in self.replicas.ready() if r is not replica]
                        if others and not finished and splice.continuable:
                            return LegOutcome.CUT
                    continue
                if item.data == "[DONE]":
                    return LegOutcome.FINISHED if finished or splice.passthrough else LegOutcome.CUT
                try:
                    out, outcome = splice.absorb(item.data)
                except UpstreamViolation as exc:
                    log.warning("%s: %s; continuing elsewhere", replica.address, exc)
                    self.replicas.mark(replica, False)
                    return LegOutcome.FINISHED if finished else LegOutcome.CUT
                if out:
                    await _write(client, out)
                    if cut_at is not None:
                        self.metrics.time_to_continue.observe(self.clock() - cut_at)
                        cut_at = None
                if outcome is LegOutcome.FINISHED:
                    finished = True
                elif outcome is LegOutcome.CUT:
                    return LegOutcome.CUT
        return LegOutcome.FINISHED if finished else LegOutcome.CUT

    def _avoid(self, addresses: set[str]) -> set[str]:
        """Replicas to keep a request away from: those that cut it, while another is ready (a
        lone replica that cut a connection but is still ready may take it again; a draining
        one is unready and never chosen)."""
        if any(r.address not in addresses for r in self.replicas.ready()):
            return set(addresses)
        return set()

    async def _lost(
        self, request: web.Request, client: web.StreamResponse | None, why: str
    ) -> web.StreamResponse:
        self.metrics.lost.inc()
        log.warning("%s %s: lost: %s", request.method, request.path[:200], why)
        if client is None:
            return web.Response(status=502, text=f"lost: {why}\n")
        await client.write(error_event(f"the stream was cut and not continued: {why}"))
        await client.write_eof()
        return client


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body (ClientPayloadError when it is cut), or None past ``limit`` bytes."""
    buf = bytearray()
    async for chunk in resp.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            return None
    return bytes(buf)


def _aborted(answer: bytes) -> bool:
    try:
        doc = parse(answer, what="answer")
    except JSONRejected:
        return False
    choices = doc.get("choices") if isinstance(doc, dict) else None
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices
    )
