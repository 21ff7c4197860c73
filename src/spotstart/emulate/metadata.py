"""Instance-metadata emulators (GCE, AWS IMDSv2, Azure Scheduled Events) on 127.0.0.1, with an
admin API to schedule preemptions and inject faults: for tests and demos of ``spotstart.guard``.
Not a full metadata server: only the paths a preemption watcher reads, spoken as documented.

Protocols followed (examples cross-checked against these pages):

- GCE: https://cloud.google.com/compute/docs/metadata/querying-metadata (``Metadata-Flavor``,
  ``X-Forwarded-For`` rejected, ``wait_for_change``/``last_etag``/``timeout_sec``, ETag),
  https://cloud.google.com/compute/docs/instances/spot#detect-preemption (``instance/preempted``),
  https://cloud.google.com/compute/docs/metadata/getting-live-migration-notice
  (``instance/maintenance-event``: NONE, MIGRATE_ON_HOST_MAINTENANCE,
  TERMINATE_ON_HOST_MAINTENANCE).
- AWS: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html
  (IMDSv2 token PUT, TTL 1..21600 s, 401 on a missing/expired token),
  https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html
  (``spot/instance-action``: 404 or ``{"action": "terminate", "time": "2017-09-18T08:22:00Z"}``),
  https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/rebalance-recommendations.html
  (``events/recommendations/rebalance``: ``{"noticeTime": "2020-10-27T08:22:00Z"}``).
- Azure: https://learn.microsoft.com/azure/virtual-machines/linux/scheduled-events
  (``Metadata: true``, ``DocumentIncarnation``, ``Events[]``, ``StartRequests`` acknowledgement),
  https://learn.microsoft.com/azure/virtual-machines/spot-vms (Preempt, >= 30 s notice).

Azure also answers ``compute/name`` (``--vm-name``); its events name that VM in ``Resources``
unless ``preempt`` is given ``"resources": [...]`` (another member of a scale set). The server
binds loopback only unless ``allow_remote`` (its admin endpoint has no authentication).

Admin API (same server, prefix ``/__admin/``): ``POST preempt`` ``{"in_s", "kind", ...}``,
``POST reset``, ``POST fail`` ``{"mode", "count", "path", "body", "status", "content_type"}``,
``POST revoke-tokens`` (AWS), ``GET requests``.

Fault modes (what a broken server, a captive portal or a misrouted proxy answers instead):
``500``; ``garbage`` (binary junk, 200); ``hang`` (no answer); ``html`` (a one-line captive
portal page, 200 ``text/html``); ``huge`` (a 200 body streamed without end, up to 256 MiB, with
the genuine content type; ``requests()["fault_bytes_sent"]`` says how much the client took);
``truncated`` (a declared length, part of it sent, then the connection closed); ``body`` (200
or ``status`` with the given ``body`` and ``content_type``). ``path`` limits a fault to one
path (e.g. Azure's ``compute/name``); other paths answer normally meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import email.utils
import hashlib
import json
import secrets
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, TypeVar, cast

from aiohttp import web
from aiohttp.typedefs import Handler

from spotstart.emulate.servers import EmulatorError
from spotstart.errors import SpotstartError, UsageError

Cloud = Literal["gce", "aws", "azure"]
CLOUDS: tuple[Cloud, ...] = ("gce", "aws", "azure")
FaultMode = Literal["500", "garbage", "hang", "html", "huge", "truncated", "body"]
FAULT_MODES: tuple[FaultMode, ...] = (
    "500",
    "garbage",
    "hang",
    "html",
    "huge",
    "truncated",
    "body",
)

GCE_PREFIX = "/computeMetadata/v1/instance/"
AWS_TOKEN_PATH = "/latest/api/token"
AWS_INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
AZURE_EVENTS_PATH = "/metadata/scheduledevents"
AZURE_NAME_PATH = "/metadata/instance/compute/name"
DEFAULT_VM_NAME = "vm"
AWS_TOKEN_TTL_MAX_S = 21600

# Default notice windows: what each cloud documents between the notice and the node going away.
DEFAULT_NOTICE_S: dict[tuple[Cloud, str], float] = {
    ("aws", "preemption"): 120.0,
    ("azure", "preemption"): 30.0,
    ("azure", "maintenance"): 900.0,  # Reboot/Redeploy: at least 15 minutes
    ("azure", "termination"): 300.0,  # Terminate: configurable 5..15 minutes
}
# A hung request gives up after this long so a forgotten fault cannot wedge a test run.
HANG_MAX_S = 120.0
GARBAGE_BODY = b"\x00\xff<html>garbage{{ not metadata"
# One line, printable: what a captive portal answers to any GET.
HTML_BODY = b"<html><head><title>Sign in</title></head><body>Sign in to continue</body></html>"
HUGE_MAX_BYTES = 256 * 1024 * 1024
_HUGE_CHUNK = b"A" * 65536

_T = TypeVar("_T")


def _aws_time(epoch_s: float) -> str:
    return datetime.fromtimestamp(int(epoch_s), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _etag(value: str) -> str:
    # GCE ETags are content hashes: the same value always has the same ETag.
    return hashlib.sha256(value.encode()).hexdigest()[:16]


@dataclass
class _Fault:
    mode: FaultMode
    remaining: int
    path: str | None = None  # only requests to this path are answered with the fault
    body: bytes = b""  # mode "body"
    status: int = 200  # mode "body"
    content_type: str | None = None  # mode "body"/"huge"/"truncated"; None: the genuine one


@dataclass
class _State:
    """Everything the emulator answers from; touched only on the emulator's event loop."""

    gce: dict[str, str] = field(
        default_factory=lambda: {"preempted": "FALSE", "maintenance-event": "NONE"}
    )
    aws_instance_action: dict[str, str] | None = None
    aws_rebalance: dict[str, str] | None = None
    aws_tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (loop time)
    azure_incarnation: int = 1
    azure_events: list[dict[str, Any]] = field(default_factory=list)
    fault: _Fault | None = None
    requests_total: int = 0
    requests_by_path: Counter[str] = field(default_factory=Counter)
    faults_served: int = 0
    fault_bytes_sent: int = 0  # body bytes of "huge" faults the clients took


class _MetadataApp:
    """The aiohttp application of one emulated cloud."""

    def __init__(
        self, cloud: Cloud, wall_clock: Callable[[], float], vm_name: str = DEFAULT_VM_NAME
    ) -> None:
        self.cloud = cloud
        self.wall_clock = wall_clock
        self.vm_name = vm_name
        self.state = _State()
        self._timers: list[asyncio.TimerHandle] = []
        self._changed = asyncio.Event()
        self._unhang = asyncio.Event()
        self._event_seq = 0

    # -- state changes --------------------------------------------------------------------------

    def _notify(self) -> None:
        # Wake every long-poll waiter; each re-checks its own ETag.
        self._changed.set()
        self._changed = asyncio.Event()

    def reset(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        incarnation = self.state.azure_incarnation + 1  # never goes backwards
        self.state = _State(azure_incarnation=incarnation)
        self._unhang.set()
        self._unhang = asyncio.Event()
        self._notify()

    def schedule(self, kind: str, in_s: float, body: dict[str, Any]) -> None:
        """Check ``kind`` for this cloud now (ValueError if unsupported), apply it in ``in_s``."""
        apply = self._event_for(kind, body)
        loop = asyncio.get_running_loop()
        if in_s <= 0:
            apply()
            self._notify()
            return

        def fire() -> None:
            apply()
            self._notify()

        self._timers.append(loop.call_later(in_s, fire))

    def _event_for(self, kind: str, body: dict[str, Any]) -> Callable[[], None]:
        notice_s = float(body.get("notice_s", DEFAULT_NOTICE_S.get((self.cloud, kind), 0.0)))
        if self.cloud == "gce":
            if kind == "preemption":
                return lambda: self.state.gce.__setitem__("preempted", "TRUE")
            if kind in ("maintenance", "termination"):
                default = (
                    "MIGRATE_ON_HOST_MAINTENANCE"
                    if kind == "maintenance"
                    else "TERMINATE_ON_HOST_MAINTENANCE"
                )
                value = str(body.get("value", default))
                return lambda: self.state.gce.__setitem__("maintenance-event", value)
        elif self.cloud == "aws":
            if kind == "preemption":
                action = str(body.get("action", "terminate"))
                if action not in ("terminate", "stop", "hibernate"):
                    raise ValueError(f"action must be terminate, stop or hibernate: {action!r}")

                def interrupt() -> None:
                    when = _aws_time(self.wall_clock() + notice_s)
                    self.state.aws_instance_action = {"action": action, "time": when}

                return interrupt
            if kind == "rebalance":

                def rebalance() -> None:
                    self.state.aws_rebalance = {"noticeTime": _aws_time(self.wall_clock())}

                return rebalance
        elif kind in ("preemption", "maintenance", "termination"):
            default_type = {"preemption": "Preempt", "maintenance": "Reboot"}.get(kind, "Terminate")
            event_type = str(body.get("event_type", default_type))
            # whom the event is for: this VM by default, or others of its scale set
            resources = body.get("resources", [self.vm_name])
            if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
                raise ValueError("resources must be a list of VM names")

            def add_event() -> None:
                self._event_seq += 1
                not_before = email.utils.formatdate(self.wall_clock() + notice_s, usegmt=True)
                self.state.azure_events.append(
                    {
                        "EventId": f"{self._event_seq:08X}-5C4E-4A3B-9F6E-{secrets.token_hex(6)}",
                        "EventType": event_type,
                        "ResourceType": "VirtualMachine",
                        "Resources": list(resources),
                        "EventStatus": "Scheduled",
                        "NotBefore": not_before,
                        "Description": f"Emulated {event_type} event (spotstart).",
                        "EventSource": "Platform",
                        "DurationInSeconds": -1,
                    }
                )
                self.state.azure_incarnation += 1

            return add_event
        raise ValueError(f"kind {kind!r} is not supported for cloud {self.cloud}")

    # -- middleware: admin routing, counting, faults ----------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/__admin/"):
            return await handler(request)
        self.state.requests_total += 1
        self.state.requests_by_path[request.path] += 1
        fault = self.state.fault
        if fault is not None and fault.remaining > 0 and fault.path in (None, request.path):
            fault.remaining -= 1
            self.state.faults_served += 1
            if fault.remaining == 0:
                self.state.fault = None
            return await self._fault_response(request, fault)
        return await handler(request)

    def _genuine_content_type(self, path: str) -> str:
        if self.cloud == "gce":
            return "application/text"
        if self.cloud == "azure" and path == AZURE_EVENTS_PATH:
            return "application/json"
        return "text/plain"

    async def _fault_response(self, request: web.Request, fault: _Fault) -> web.StreamResponse:
        # A broken server still says who it is (GCE's flavor header), so that what the client
        # checks next, the body, is what the fault exercises; a portal (html) does not.
        headers = {"Metadata-Flavor": "Google"} if self.cloud == "gce" else {}
        content_type = fault.content_type or self._genuine_content_type(request.path)
        if fault.mode == "500":
            return web.Response(status=500, text="Internal Server Error")
        if fault.mode == "garbage":
            return web.Response(
                status=200, body=GARBAGE_BODY, content_type="text/plain", headers=headers
            )
        if fault.mode == "html":
            return web.Response(status=200, body=HTML_BODY, content_type="text/html")
        if fault.mode == "body":
            headers["Content-Type"] = content_type
            return web.Response(status=fault.status, body=fault.body, headers=headers)
        if fault.mode == "huge":
            return await self._huge(request, headers, content_type)
        if fault.mode == "truncated":
            headers["Content-Type"] = content_type
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_length = 4096
            await resp.prepare(request)
            await resp.write(b'{"DocumentIncarnation": 1, "Events": [')
            if request.transport is not None:
                request.transport.close()  # cut before the declared length
            return resp
        unhang = self._unhang
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(unhang.wait(), HANG_MAX_S)
        return web.Response(status=504, text="hung request released")

    async def _huge(
        self, request: web.Request, headers: dict[str, str], content_type: str
    ) -> web.StreamResponse:
        headers["Content-Type"] = content_type
        resp = web.StreamResponse(status=200, headers=headers)
        resp.enable_chunked_encoding()  # no declared length: only reading tells it is huge
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            while self.state.fault_bytes_sent < HUGE_MAX_BYTES:
                await resp.write(_HUGE_CHUNK)
                self.state.fault_bytes_sent += len(_HUGE_CHUNK)
        return resp

    # -- admin ----------------------------------------------------------------------------------

    async def admin_preempt(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            in_s = float(body.get("in_s", 0))
            self.schedule(str(body.get("kind", "preemption")), in_s, body)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"scheduled": True})

    async def admin_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    async def admin_fail(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        content_type = body.get("content_type")
        try:
            fault = make_fault(
                str(body.get("mode", "")),
                int(body.get("count", 1)),
                path=None if body.get("path") is None else str(body["path"]),
                body=str(body.get("body", "")).encode(),
                status=int(body.get("status", 200)),
                content_type=None if content_type is None else str(content_type),
            )
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.state.fault = fault
        return web.json_response({"armed": fault.remaining if fault else 0})

    async def admin_revoke_tokens(self, request: web.Request) -> web.Response:
        revoked = len(self.state.aws_tokens)
        self.state.aws_tokens.clear()
        return web.json_response({"revoked": revoked})

    async def admin_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.counts())

    def counts(self) -> dict[str, Any]:
        return {
            "total": self.state.requests_total,
            "by_path": dict(self.state.requests_by_path),
            "faults_served": self.state.faults_served,
            "fault_bytes_sent": self.state.fault_bytes_sent,
        }

    # -- GCE ------------------------------------------------------------------------------------

    async def gce_get(self, request: web.Request) -> web.Response:
        headers = {"Metadata-Flavor": "Google"}
        if "X-Forwarded-For" in request.headers:
            return web.Response(status=403, text="Request rejected: X-Forwarded-For is set.")
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(
                status=403,
                text="Missing Metadata-Flavor:Google header.",
                headers=headers,
            )
        key = request.match_info["key"]
        if key not in self.state.gce:
            return web.Response(status=404, text="Not Found", headers=headers)
        query = request.query
        if query.get("wait_for_change", "").lower() == "true":
            try:
                timeout_s = float(query.get("timeout_sec", HANG_MAX_S))
            except ValueError:
                return web.Response(status=400, text="Invalid timeout_sec", headers=headers)
            last = query.get("last_etag")
            if last is None:
                last = _etag(self.state.gce[key])  # wait for a change from the current value
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(0.0, timeout_s)
            while _etag(self.state.gce[key]) == last:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
        value = self.state.gce[key]
        headers["ETag"] = _etag(value)
        return web.Response(text=value, content_type="application/text", headers=headers)

    # -- AWS ------------------------------------------------------------------------------------

    async def aws_token(self, request: web.Request) -> web.Response:
        if "X-Forwarded-For" in request.headers:
            return web.Response(status=403, text="Forbidden")
        raw = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        try:
            ttl = int(raw) if raw is not None else 0
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= AWS_TOKEN_TTL_MAX_S:
            return web.Response(status=400, text="Bad Request")
        token = secrets.token_urlsafe(32)
        self.state.aws_tokens[token] = asyncio.get_running_loop().time() + ttl
        return web.Response(text=token, headers={"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})

    def _aws_authorized(self, request: web.Request) -> bool:
        token = request.headers.get("X-aws-ec2-metadata-token")
        expiry = self.state.aws_tokens.get(token or "")
        if expiry is None:
            return False
        if asyncio.get_running_loop().time() >= expiry:
            del self.state.aws_tokens[token or ""]
            return False
        return True

    def _aws_document(self, request: web.Request, doc: dict[str, str] | None) -> web.Response:
        if not self._aws_authorized(request):
            return web.Response(status=401, text="Unauthorized")
        if doc is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(text=json.dumps(doc), content_type="text/plain")

    async def aws_instance_action(self, request: web.Request) -> web.Response:
        return self._aws_document(request, self.state.aws_instance_action)

    async def aws_rebalance(self, request: web.Request) -> web.Response:
        return self._aws_document(request, self.state.aws_rebalance)

    # -- Azure ----------------------------------------------------------------------------------

    def _azure_check(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Metadata", "").lower() != "true":
            return web.json_response(
                {"error": "Bad request. Required metadata header not specified"}, status=400
            )
        if "api-version" not in request.query:
            return web.json_response(
                {"error": "Bad request. api-version was not specified in the request"},
                status=400,
            )
        return None

    async def azure_get(self, request: web.Request) -> web.Response:
        bad = self._azure_check(request)
        if bad is not None:
            return bad
        return web.json_response(
            {
                "DocumentIncarnation": self.state.azure_incarnation,
                "Events": self.state.azure_events,
            }
        )

    async def azure_name(self, request: web.Request) -> web.Response:
        bad = self._azure_check(request)
        if bad is not None:
            return bad
        if request.query.get("format") == "text":
            return web.Response(text=self.vm_name)
        return web.json_response(self.vm_name)

    async def azure_post(self, request: web.Request) -> web.Response:
        bad = self._azure_check(request)
        if bad is not None:
            return bad
        body = await _json_body(request)
        starts = body.get("StartRequests")
        if not isinstance(starts, list):
            return web.json_response({"error": "Bad request. StartRequests missing"}, status=400)
        wanted = {str(s.get("EventId")) for s in starts if isinstance(s, dict)}
        changed = False
        for event in self.state.azure_events:
            if event["EventId"] in wanted and event["EventStatus"] != "Started":
                # An approved event starts at once; its NotBefore no longer applies.
                event["EventStatus"] = "Started"
                event["NotBefore"] = ""
                changed = True
        if changed:
            self.state.azure_incarnation += 1
            self._notify()
        return web.Response(status=200)

    # -- wiring ---------------------------------------------------------------------------------

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware])
        app.router.add_post("/__admin/preempt", self.admin_preempt)
        app.router.add_post("/__admin/reset", self.admin_reset)
        app.router.add_post("/__admin/fail", self.admin_fail)
        app.router.add_post("/__admin/revoke-tokens", self.admin_revoke_tokens)
        app.router.add_get("/__admin/requests", self.admin_requests)
        if self.cloud == "gce":
            app.router.add_get(GCE_PREFIX + "{key}", self.gce_get)
        elif self.cloud == "aws":
            app.router.add_put(AWS_TOKEN_PATH, self.aws_token)
            app.router.add_get(AWS_INSTANCE_ACTION_PATH, self.aws_instance_action)
            app.router.add_get(AWS_REBALANCE_PATH, self.aws_rebalance)
        else:
            app.router.add_get(AZURE_EVENTS_PATH, self.azure_get)
            app.router.add_get(AZURE_NAME_PATH, self.azure_name)
            app.router.add_post(AZURE_EVENTS_PATH, self.azure_post)
        return app

    def release_hung(self) -> None:
        self._unhang.set()


def make_fault(
    mode: str,
    count: int,
    *,
    path: str | None = None,
    body: bytes = b"",
    status: int = 200,
    content_type: str | None = None,
) -> _Fault | None:
    """A fault to arm (None for ``count`` 0); ValueError for an unknown mode or bad numbers."""
    if mode not in FAULT_MODES:
        raise ValueError(f"mode must be one of {FAULT_MODES}")
    if count < 0:
        raise ValueError("count must be >= 0")
    if not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status")
    if count == 0:
        return None
    return _Fault(mode, count, path, body, status, content_type)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json() if request.can_read_body else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class MetadataEmulator:
    """One emulated metadata server on ``127.0.0.1`` in a background thread.

    Example::

        with MetadataEmulator("aws") as emu:
            watcher = AwsWatcher(AwsWatcherConfig(metadata_url=emu.url))
            emu.preempt(in_s=0.5)

    ``port=0`` picks a free port. ``wall_clock`` stamps AWS ``time`` and Azure ``NotBefore``.
    The helper methods (``preempt``, ``fail``...) act directly on the server's loop; the same
    actions are available over HTTP under ``/__admin/`` for other processes.
    """

    def __init__(
        self,
        cloud: Cloud,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        wall_clock: Callable[[], float] = time.time,
        vm_name: str = DEFAULT_VM_NAME,
        allow_remote: bool = False,
    ) -> None:
        if cloud not in CLOUDS:
            raise ValueError(f"cloud must be one of {CLOUDS}, got {cloud!r}")
        if not allow_remote and not _is_loopback(host):
            # The admin endpoint injects preemptions and takes no credentials.
            raise UsageError(
                f"metadata emulator: --host {host} is not a loopback address; its "
                "unauthenticated /__admin/ endpoint would let anyone who reaches it preempt "
                "your guards. Use 127.0.0.1, or pass --allow-remote if you mean it"
            )
        self.cloud: Cloud = cloud
        self.vm_name = vm_name
        self.host = host
        self._requested_port = port
        self._wall_clock = wall_clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._app: _MetadataApp | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:31234`` (what ``metadata_url`` takes)."""
        return f"http://{self.host}:{self.port}"

    @property
    def host_port(self) -> str:
        """``127.0.0.1:31234``: the form ``GCE_METADATA_HOST`` takes."""
        return f"{self.host}:{self.port}"

    def start(self) -> MetadataEmulator:
        if self._thread is not None:
            raise EmulatorError(f"metadata emulator ({self.cloud}) already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
        except OSError as exc:
            sock.close()
            raise EmulatorError(
                f"metadata emulator ({self.cloud}): cannot bind {self.host}:"
                f"{self._requested_port}: {exc}; choose another port or 0 for a free one"
            ) from exc
        self.port = sock.getsockname()[1]
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"metadata-{self.cloud}", daemon=True
        )
        self._thread.start()

        async def serve() -> None:
            self._app = _MetadataApp(self.cloud, self._wall_clock, self.vm_name)
            # short shutdown_timeout: long polls must not hold up stop()
            runner = web.AppRunner(self._app.build(), shutdown_timeout=0.5, access_log=None)
            await runner.setup()
            await web.SockSite(runner, sock).start()
            self._runner = runner

        try:
            self._call(serve())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving and free the port; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._app is not None:
                self._app.release_hung()
            if self._runner is not None:
                await self._runner.cleanup()
            # connection tasks that outlived the cleanup die here, not with the loop
            current = asyncio.current_task()
            leftovers = [task for task in asyncio.all_tasks() if task is not current]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = None
            self._runner = self._app = None

    def __enter__(self) -> MetadataEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise EmulatorError(f"metadata emulator ({self.cloud}) is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def _app_or_raise(self) -> _MetadataApp:
        if self._app is None:
            raise EmulatorError(f"metadata emulator ({self.cloud}) is not running")
        return self._app

    def preempt(self, in_s: float = 0.0, kind: str = "preemption", **extra: Any) -> None:
        """Schedule a notice in ``in_s`` seconds. ``kind``: preemption (all clouds), rebalance
        (aws), maintenance / termination (gce, azure). ``extra``: ``notice_s`` (window), ``action``
        (aws), ``value`` (gce maintenance-event), ``event_type`` (azure)."""
        app = self._app_or_raise()

        async def go() -> None:
            app.schedule(kind, in_s, dict(extra))

        self._call(go())

    def fail(
        self,
        mode: FaultMode,
        count: int,
        *,
        path: str | None = None,
        body: bytes = b"",
        status: int = 200,
        content_type: str | None = None,
    ) -> None:
        """Answer the next ``count`` metadata requests (to ``path`` only, if given) with a fault
        instead of the protocol; see the module docstring for the modes. ``count`` 0 disarms.

        Example::

            emu.fail("html", 1, path="/metadata/instance/compute/name")  # a captive portal
            emu.fail("body", 1, path=..., body=b"TRUEX")  # a value outside the grammar
        """
        fault = make_fault(
            mode, count, path=path, body=body, status=status, content_type=content_type
        )
        app = self._app_or_raise()

        async def go() -> None:
            app.state.fault = fault

        self._call(go())

    def reset(self) -> None:
        """Back to "no notice": cancels scheduled events, faults, tokens and counters."""
        app = self._app_or_raise()

        async def go() -> None:
            app.reset()

        self._call(go())

    def revoke_tokens(self) -> None:
        """AWS: forget every issued token, so the next GET with one answers 401."""
        app = self._app_or_raise()

        async def go() -> None:
            app.state.aws_tokens.clear()

        self._call(go())

    def requests(self) -> dict[str, Any]:
        """``{"total": N, "by_path": {path: N}, "faults_served": N, "fault_bytes_sent": N}``
        (admin calls excluded)."""
        app = self._app_or_raise()

        async def go() -> dict[str, Any]:
            return app.counts()

        return self._call(go())


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotstart emulate metadata",
        description="Serve an emulated cloud metadata server (preemption notices) on loopback.",
    )
    parser.add_argument("--cloud", choices=CLOUDS, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host (the admin endpoint has no authentication)",
    )
    parser.add_argument(
        "--vm-name",
        default=DEFAULT_VM_NAME,
        help="Azure: this VM's compute/name, the default Resources of injected events",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--json", action="store_true", help="print the ready line as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean stop, 1 if the server cannot start.

    Example::

        spotstart emulate metadata --cloud aws --port 8169 &
        curl -X POST localhost:8169/__admin/preempt -d '{"in_s": 5, "kind": "preemption"}'
    """
    args = _build_parser().parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        emulator = MetadataEmulator(
            cast(Cloud, args.cloud),
            host=args.host,
            port=args.port,
            vm_name=args.vm_name,
            allow_remote=args.allow_remote,
        )
        emulator.start()
    except SpotstartError as exc:  # 2: refused (a usage error); 1: cannot start
        print(f"spotstart emulate metadata: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        info = {"cloud": emulator.cloud, "url": emulator.url, "admin": emulator.url + "/__admin/"}
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"{emulator.cloud} metadata emulator on {emulator.url} (admin: /__admin/)")
            sys.stdout.flush()
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
