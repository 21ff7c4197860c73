"""Pure core of the link emulator: link settings, token buckets, fault rules, HTTP head parsing.

No sockets and no real clocks here (clocks are injected); `spotstart.emulate.proxy` does the I/O.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

FaultKind = Literal["status", "reset", "stall", "truncate", "corrupt"]
FAULT_KINDS: tuple[FaultKind, ...] = ("status", "reset", "stall", "truncate", "corrupt")

# A small burst keeps the caps accurate at the scale of one 8 MiB chunk while letting the relay
# move data in large syscalls.
DEFAULT_BURST_BYTES = 256 * 1024


@dataclass(frozen=True)
class LinkConfig:
    """What the emulated network between a client and the cloud looks like.

    Both caps apply to the server->client direction (downloads). ``None`` means uncapped.
    ``aggregate_bytes_per_s`` is the "NIC": one budget shared by every connection of every proxy
    of one emulator. ``first_byte_latency_s`` delays each new request (client data after a
    response, or the first data of a connection) before it is forwarded.
    """

    per_conn_bytes_per_s: float | None = 50e6
    first_byte_latency_s: float = 0.030
    aggregate_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("per_conn_bytes_per_s", "aggregate_bytes_per_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"LinkConfig.{name} must be positive or None, got {value}")
        if self.first_byte_latency_s < 0:
            raise ValueError("LinkConfig.first_byte_latency_s must be >= 0")

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinkConfig:
        known = {"per_conn_bytes_per_s", "first_byte_latency_s", "aggregate_bytes_per_s"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LinkConfig fields: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key in known & set(data):
            value = data[key]
            kwargs[key] = None if value is None else float(value)
        return cls(**kwargs)


class TokenBucket:
    """A token bucket that lets callers go into debt and tells them how long to wait.

    ``reserve(n)`` takes ``n`` tokens now and returns the seconds the caller must wait before
    sending, so one large send is paced as accurately as many small ones. Thread-safe: the
    aggregate bucket is shared by every relay thread.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        clock: Callable[[], float],
        burst_bytes: int = DEFAULT_BURST_BYTES,
    ) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError("rate_bytes_per_s must be positive")
        self._rate = rate_bytes_per_s
        self._burst = float(burst_bytes)
        self._clock = clock
        self._tokens = float(burst_bytes)
        self._updated = clock()
        self._lock = threading.Lock()

    @property
    def rate_bytes_per_s(self) -> float:
        return self._rate

    def set_rate(self, rate_bytes_per_s: float) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError("rate_bytes_per_s must be positive")
        with self._lock:
            self._refill()
            self._rate = rate_bytes_per_s

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)

    def reserve(self, n_bytes: int) -> float:
        """Take ``n_bytes`` tokens; return how many seconds to wait before sending them."""
        with self._lock:
            self._refill()
            self._tokens -= n_bytes
            if self._tokens >= 0:
                return 0.0
            return -self._tokens / self._rate


@dataclass(frozen=True)
class FaultRule:
    """One injected failure on a plain-HTTP upstream; it fires ``count`` times, then is spent.

    Match: ``method`` (None = any), ``path_regex`` (``re.search`` on the request target, None =
    any), ``ranged_only`` (only requests carrying a Range header). Kinds:

    - ``status``: answer ``status`` ourselves (``Retry-After: retry_after_s`` if set), not
      forwarded;
    - ``reset``: relay ``after_bytes`` of the response body, then RST the client;
    - ``stall``: relay ``after_bytes``, then send nothing for ``seconds`` (or until the client
      closes), then carry on;
    - ``truncate``: relay ``after_bytes`` of the body, then close cleanly (FIN);
    - ``corrupt``: XOR 0xFF the body byte at offset ``at_byte``, relay the rest normally.
    """

    kind: FaultKind
    count: int = 1
    method: str | None = None
    path_regex: str | None = None
    ranged_only: bool = False
    status: int = 503
    retry_after_s: float | None = None
    after_bytes: int = 0
    seconds: float = 30.0
    at_byte: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.count < 1:
            raise ValueError("FaultRule.count must be >= 1")
        if self.after_bytes < 0 or self.at_byte < 0 or self.seconds < 0:
            raise ValueError("FaultRule.after_bytes, at_byte and seconds must be >= 0")
        if not 100 <= self.status <= 599:
            raise ValueError(f"FaultRule.status must be an HTTP status, got {self.status}")
        if self.path_regex is not None:
            re.compile(self.path_regex)

    def matches(self, request: RequestHead) -> bool:
        if self.method is not None and self.method.upper() != request.method:
            return False
        if self.ranged_only and "range" not in request.headers:
            return False
        return self.path_regex is None or re.search(self.path_regex, request.target) is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaultRule:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FaultRule fields: {sorted(unknown)}")
        if "kind" not in data:
            raise ValueError("FaultRule needs a 'kind'")
        return cls(**dict(data))


def rules_to_json(rules: Iterable[FaultRule]) -> str:
    return json.dumps([rule.to_dict() for rule in rules])


def rules_from_json(text: str | bytes) -> list[FaultRule]:
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("fault rules must be a JSON list of objects")
    return [FaultRule.from_dict(cast(Mapping[str, Any], item)) for item in data]


class FaultPlan:
    """The live set of rules with their remaining counts; the first matching live rule fires."""

    def __init__(self, rules: Iterable[FaultRule] = ()) -> None:
        self._lock = threading.Lock()
        self._entries: list[list[Any]] = []
        self.replace(rules)

    def replace(self, rules: Iterable[FaultRule]) -> None:
        with self._lock:
            self._entries = [[rule, rule.count] for rule in rules]

    def clear(self) -> None:
        self.replace(())

    def remaining(self) -> list[tuple[FaultRule, int]]:
        with self._lock:
            return [(entry[0], entry[1]) for entry in self._entries]

    def take(self, request: RequestHead) -> FaultRule | None:
        """Return the rule that fires for ``request`` (consuming one count), or None."""
        with self._lock:
            for entry in self._entries:
                rule = cast(FaultRule, entry[0])
                if entry[1] > 0 and rule.matches(request):
                    entry[1] -= 1
                    return rule
        return None


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    headers: Mapping[str, str]  # lower-cased names

    @property
    def body_bytes(self) -> int | None:
        """Length of the request body; None when it is chunked (unknown)."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return None
        return int(self.headers.get("content-length", "0") or 0)


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: Mapping[str, str]

    def body_bytes(self, request_method: str | None) -> int | None:
        """Body length of this response; None when only the connection's end delimits it."""
        if request_method == "HEAD" or 100 <= self.status < 200 or self.status in (204, 304):
            return 0
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return None
        value = self.headers.get("content-length")
        return None if value is None else int(value)


class HeadError(ValueError):
    """The bytes are not an HTTP/1.x head."""


HEAD_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024


_METHOD = re.compile(rb"[A-Z]{1,16} ")


def could_be_request(buf: bytes | bytearray) -> bool:
    """False as soon as the start of ``buf`` cannot be an HTTP/1.x request line (TLS, junk)."""
    start = bytes(buf[:17])
    if not start:
        return True
    if _METHOD.match(start):
        return True
    return len(start) < 17 and start.isupper() and start.isalpha()


def _parse_fields(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise HeadError(f"bad header line {line!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return headers


def parse_request_head(head: bytes) -> RequestHead:
    """Parse ``head`` (up to and excluding the blank line) as an HTTP/1.x request head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise HeadError(f"bad request line {lines[0]!r}")
    return RequestHead(parts[0].upper(), parts[1], _parse_fields(lines[1:]))


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse ``head`` (up to and excluding the blank line) as an HTTP/1.x response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HeadError(f"bad status line {lines[0]!r}")
    return ResponseHead(int(parts[1]), _parse_fields(lines[1:]))


_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}

BodyFlavor = Literal["s3", "gcs", "http"]


def fault_response(rule: FaultRule, flavor: BodyFlavor, *, close: bool = False) -> bytes:
    """The complete HTTP response a ``status`` fault answers with, shaped like the cloud's.

    ``close`` adds ``Connection: close`` (used when we cannot tell whether the client will
    still send the body of the refused request).
    """
    status = rule.status
    reason = _REASONS.get(status, "Error")
    if flavor == "s3":
        code = "SlowDown" if status == 503 else "TooManyRequests" if status == 429 else "Error"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>injected by spotstart link emulator</Message>"
            "<RequestId>spotstart-fault</RequestId></Error>"
        ).encode()
        content_type = "application/xml"
    elif flavor == "gcs":
        reason_key = "rateLimitExceeded" if status == 429 else "backendError"
        message = "injected by spotstart link emulator"
        body = json.dumps(
            {
                "error": {
                    "code": status,
                    "message": message,
                    "errors": [{"domain": "global", "reason": reason_key, "message": message}],
                }
            }
        ).encode()
        content_type = "application/json; charset=UTF-8"
    else:
        body = f"{status} {reason} (injected by spotstart link emulator)\n".encode()
        content_type = "text/plain"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
    ]
    if rule.retry_after_s is not None:
        lines.append(f"Retry-After: {rule.retry_after_s:g}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class LinkStats:
    """Counters of one emulator; thread-safe through ``lock``. ``snapshot()`` gives a dict."""

    bytes_down: int = 0
    body_bytes_down: int = 0
    bytes_up: int = 0
    requests: int = 0
    connections_opened: int = 0
    connections_open: int = 0
    max_concurrent_connections: int = 0
    faults_fired: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_down(self, n_bytes: int, body_bytes: int) -> None:
        with self.lock:
            self.bytes_down += n_bytes
            self.body_bytes_down += body_bytes

    def add_up(self, n_bytes: int) -> None:
        with self.lock:
            self.bytes_up += n_bytes

    def add_request(self) -> None:
        with self.lock:
            self.requests += 1

    def add_fault(self, kind: str) -> None:
        with self.lock:
            self.faults_fired[kind] = self.faults_fired.get(kind, 0) + 1

    def connection_opened(self) -> None:
        with self.lock:
            self.connections_opened += 1
            self.connections_open += 1
            self.max_concurrent_connections = max(
                self.max_concurrent_connections, self.connections_open
            )

    def connection_closed(self) -> None:
        with self.lock:
            self.connections_open -= 1

    def reset(self) -> None:
        with self.lock:
            self.bytes_down = self.body_bytes_down = self.bytes_up = 0
            self.requests = self.connections_opened = 0
            self.max_concurrent_connections = self.connections_open
            self.faults_fired = {}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "bytes_down": self.bytes_down,
                "body_bytes_down": self.body_bytes_down,
                "bytes_up": self.bytes_up,
                "requests": self.requests,
                "connections_opened": self.connections_opened,
                "connections_open": self.connections_open,
                "max_concurrent_connections": self.max_concurrent_connections,
                "faults_fired": {kind: self.faults_fired.get(kind, 0) for kind in FAULT_KINDS},
            }
