"""A registry as a blob store, over the OCI distribution API: manifests by tag or digest,
blobs by ranged GETs (several in flight, handed over in order), anonymous, Basic and bearer
token auth as ``WWW-Authenticate`` asks (the Docker token spec), credentials from
``~/.docker/config.json`` (``auths``, ``credHelpers``/``credsStore``) or containers'
``auth.json``. The one place registry answers become spotstart errors.

Every body is read to at most what was asked, with bounded ``read(amt)`` calls, never
buffered whole: a ranged read to its length, a blob to its descriptor's size, a manifest to
4 MiB (the distribution spec's and containerd's limit), a token answer to 1 MiB, an error or
redirect body to 64 KiB. A longer body is refused (ProtocolError naming the registry and the
object) and its connection closed, never handed back to the pool. Credentials go only to the
registry's own scheme and host (a redirect to blob storage gets none) and never over plain
http to a token service unless the registry itself is plain http.

Where a registry may send us. Like Docker, any http(s) redirect and any token realm are
followed (blob storage and token services live on other hosts), with one exception: a
link-local address (169.254.0.0/16, where every cloud's metadata server and its credentials
live, fe80::/10, AWS's fd00:ec2::254), or a loopback one when the registry is not itself on
loopback, is refused, checked on the address actually connected to (so a DNS name pointing
there is caught too). A token realm there would make us fetch "a token" from the metadata
server (or a local agent) and hand it to the registry; a redirect there reads nothing the
registry sees (blobs are checked by digest), but nothing a registry says is a reason to talk
to our own metadata server either."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import ipaddress
import json
import os
import random
import re
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import urllib3

from spotstart import untrusted_json
from spotstart.errors import (
    AccessDenied,
    CredentialsNotFound,
    EndpointUnreachable,
    NotFound,
    ProtocolError,
    RetriesExceeded,
    TransientError,
    UsageError,
)
from spotstart.image import oci
from spotstart.image.digest import Digest
from spotstart.image.sources import (
    ResolvedImage,
    check_bytes,
    layers_from_manifest,
    read_verified,
    resolve_index,
)

T = TypeVar("T")
MANIFEST_LIMIT = 4 << 20  # distribution spec: registries may refuse larger manifests
TOKEN_LIMIT = 1 << 20  # a token answer is a JWT or two and a few fields: a few KiB
SMALL_BODY_LIMIT = 64 << 10  # error, redirect and challenge bodies: read for a message only
READ_PIECE = 1 << 16  # one bounded read of a body
# A body must keep coming: after GRACE_S, at least MIN_RATE bytes a second on average. The
# socket's read timeout alone never fires on a body trickled a byte a minute (a 4 MiB
# manifest would take 8 years); 16 KiB/s is far below any registry that works at all.
GRACE_S = 60.0
MIN_RATE = 16 << 10
HEAD_DEADLINE_S = 120.0  # a response head (status line and headers), however it trickles
RANGE_BYTES = 8 << 20  # per ranged GET: large enough that latency is a small share
IN_FLIGHT = 4  # ranged GETs per blob at once: memory <= IN_FLIGHT * RANGE_BYTES
ATTEMPTS = 5
_RETRY = frozenset({408, 429, 500, 502, 503, 504})
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_CHALLENGE = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
_LOCAL = ("localhost", "127.0.0.1", "::1", "[::1]")
_TOKEN = re.compile(r"[\x21-\x7e]{1,65536}")  # a header value: visible ASCII, no CR/LF
# Where a registry's redirects and token realms may never lead (see the module docstring).
LINK_LOCAL = (
    ipaddress.ip_network("169.254.0.0/16"),  # GCE, EC2, Azure, OCI... metadata: 169.254.169.254
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),  # EC2's IMDS over IPv6 (not link-local itself)
)


@dataclass(frozen=True)
class Reference:
    registry: str  # as written (docker.io for Docker Hub)
    repository: str
    tag: str = ""
    digest: Digest | None = None

    @property
    def api_host(self) -> str:
        return "registry-1.docker.io" if self.registry == "docker.io" else self.registry

    @property
    def ref(self) -> str:
        return str(self.digest) if self.digest is not None else (self.tag or "latest")

    def __str__(self) -> str:
        at = f"@{self.digest}" if self.digest else ""
        return f"{self.registry}/{self.repository}{':' + self.tag if self.tag else ''}{at}"


def parse_reference(text: str) -> Reference:
    """``[HOST[:PORT]/]PATH[:TAG][@DIGEST]`` as Docker reads it: the first component is a
    host when it has a dot or a port or is localhost; else Docker Hub (``library/`` added)."""
    rest, _, digest_text = text.partition("@")
    digest = Digest.parse(digest_text) if digest_text else None
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
    else:
        registry, path = "docker.io", rest
    tag = ""
    name, colon, maybe_tag = path.rpartition(":")
    if colon and "/" not in maybe_tag:
        path, tag = name, maybe_tag
        if not _TAG.fullmatch(tag):
            raise UsageError(f"{text}: {tag!r} is not a valid tag")
    if registry == "docker.io" and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
        raise UsageError(f"{text}: {path!r} is not a valid repository name (lowercase, a-z0-9._-/)")
    return Reference(registry, path, tag, digest)


def _config_files() -> list[Path]:
    files = []
    docker_dir = os.environ.get("DOCKER_CONFIG")
    files.append(
        Path(docker_dir) / "config.json" if docker_dir else Path.home() / ".docker" / "config.json"
    )
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    return files


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""
    source: str = ""


def find_credentials(registry: str) -> Credentials | None:
    """The first credentials for ``registry`` in docker's or containers' config, as
    ``docker login`` writes them."""
    keys = {
        registry,
        f"https://{registry}",
        f"http://{registry}",
        f"https://{registry}/v1/",
        f"https://{registry}/v2/",
    }
    if registry == "docker.io":
        keys |= {"https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"}
    for path in _config_files():
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: unreadable registry config ({exc})") from None
        if not isinstance(doc, dict):
            continue
        helpers = doc.get("credHelpers") or {}
        helper = next(
            (helpers[k] for k in keys if isinstance(helpers, dict) and k in helpers), None
        )
        auths = doc.get("auths") or {}
        entry = next((auths[k] for k in keys if isinstance(auths, dict) and k in auths), None)
        if (
            helper is None
            and isinstance(entry, dict)
            and (entry.get("auth") or entry.get("identitytoken") or entry.get("username"))
        ):
            return _from_entry(entry, str(path))
        if helper is None and isinstance(doc.get("credsStore"), str):
            helper = doc["credsStore"]
        if isinstance(helper, str) and helper:
            found = _from_helper(helper, registry)
            if found is not None:
                return found
    return None


def _from_entry(entry: Mapping[str, object], source: str) -> Credentials:
    if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
        return Credentials(identity_token=str(entry["identitytoken"]), source=source)
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, _, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise UsageError(f"{source}: an 'auth' entry is not base64 of user:password") from None
        return Credentials(user, password, source=source)
    return Credentials(
        str(entry.get("username", "")), str(entry.get("password", "")), source=source
    )


def _from_helper(helper: str, registry: str) -> Credentials | None:
    program = f"docker-credential-{helper}"
    try:
        out = subprocess.run(
            [program, "get"],
            input=registry,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError:
        return None
    if out.returncode != 0:
        return None  # "credentials not found in native keychain": anonymous then
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        raise UsageError(f"{program}: answered something that is not JSON") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{program}: answered JSON that is not an object")
    user, secret = str(doc.get("Username", "")), str(doc.get("Secret", ""))
    if user == "<token>":
        return Credentials(identity_token=secret, source=program)
    return Credentials(user, secret, source=program)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ("bearer", params) (RFC 7235)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace(
            '\\"', '"'
        )
        for m in _CHALLENGE.finditer(rest)
    }
    return scheme.lower(), params


def target_url(base: str, reference: str, what: str) -> str:
    """``reference`` (a Location, a realm) resolved against ``base``: an http(s) URL with a
    host and a valid port, or ProtocolError (urlsplit raises ValueError on "http://[::1/",
    which was exit 1)."""
    try:
        url = urljoin(base, reference)
        parts = urlsplit(url)
        _ = parts.port  # ValueError when out of range or not a number
    except ValueError:
        raise ProtocolError(f"{what}: {_shown(reference)} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProtocolError(f"{what}: sent to {_shown(url)}, not an http(s) URL with a host")
    return url


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _decimal(text: str) -> bool:
    """ASCII digits only: a header is decoded as latin-1, and str.isdigit() takes "\xb2"
    ("²"), which int() and float() refuse (exit 1, where a bad header is the server's fault)."""
    return text.isascii() and text.isdigit()


def _shown(text: str, limit: int = 200) -> str:
    """Server-sent text for a one-line message: printable characters only, cut to ``limit``."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forbidden_destination(peer: str, home: str) -> str:
    """Why a registry whose own address (or host name) is ``home`` may not send us to
    ``peer`` (the address we connected to), or "": a link-local address (cloud metadata)
    unless the registry itself is on one, a loopback one unless the registry itself is."""
    address = _address(peer)
    if address is None:
        return ""
    own = _address(home)
    own_link_local = own is not None and any(own in net for net in LINK_LOCAL)
    if any(address in net for net in LINK_LOCAL) and not own_link_local:
        return f"{address}, a link-local address where the cloud's metadata server answers"
    own_loopback = home == "localhost" or (own is not None and own.is_loopback)
    if address.is_loopback and not own_loopback:
        return f"{address}, this machine's loopback, where the registry is not"
    return ""


def _remember(sock: Any) -> tuple[str | None, Any]:
    try:
        return str(sock.getpeername()[0]), sock
    except (OSError, AttributeError):
        return None, sock


def _cut(conn: object) -> None:
    """End what ``conn`` is blocked reading: its socket shut down, the read sees the end."""
    sock = getattr(conn, "raw_sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def deadline(conn: object, seconds: float) -> Iterator[threading.Event]:
    """Cut ``conn`` if the block takes longer than ``seconds``: a read that bytes keep
    feeding (a head trickled a byte a minute, endless chunk trailers) never meets the
    socket's read timeout, and happens inside http.client, out of any check of ours. The
    event yielded is set once it was cut: what the read then returned may look complete
    (a head cut short ends the headers; a cut close-delimited body ends the body) and is
    not to be believed."""
    fired = threading.Event()

    def cut() -> None:
        fired.set()
        _cut(conn)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


class _RememberingConnection:
    """Remembers the address it connected to (http.client drops a connection's socket as
    soon as an answer says it closes the connection: HTTP/1.0, ``Connection: close``, and
    where an answer came from must be known after that too) and its socket (to cut a read
    past its deadline); reads a response head within HEAD_DEADLINE_S. Mixed into urllib3's
    HTTP and HTTPS connections."""

    peer: str | None = None
    raw_sock: Any = None
    sock: Any

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.peer, self.raw_sock = _remember(self.sock)

    def getresponse(self) -> urllib3.HTTPResponse:
        with deadline(self, HEAD_DEADLINE_S) as cut:
            resp: urllib3.HTTPResponse = super().getresponse()  # type: ignore[misc]
        if cut.is_set():
            resp.close()
            raise TimeoutError(f"no response head within {HEAD_DEADLINE_S:.0f} s")
        return resp


class _PeerHTTPConnection(_RememberingConnection, urllib3.connection.HTTPConnection):  # type: ignore[misc]
    pass


class _PeerHTTPSConnection(_RememberingConnection, urllib3.connection.HTTPSConnection):  # type: ignore[misc]
    pass


class _PeerHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _PeerHTTPConnection


class _PeerHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _PeerHTTPSConnection


def _peer(resp: urllib3.BaseHTTPResponse) -> str | None:
    """The address ``resp`` came from (None when unknown)."""
    conn = getattr(resp, "connection", None)
    peer = getattr(conn, "peer", None)
    if isinstance(peer, str):
        return peer
    sock = getattr(conn, "sock", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else None
    except OSError:
        return None


def check_destination(resp: urllib3.BaseHTTPResponse, home: str, what: str) -> None:
    """ProtocolError (the response closed unread) when a redirect or a token realm led to an
    address a registry at ``home`` may not send us to (:func:`forbidden_destination`), or
    to one we cannot tell."""
    peer = _peer(resp)
    why = forbidden_destination(peer, home) if peer is not None else "an address unknown"
    if why:
        close_unread(resp)
        raise ProtocolError(f"{what}: the registry sent us to {why}; refused")


def close_unread(resp: urllib3.BaseHTTPResponse) -> None:
    """Close a response whose body is not read to its end: its connection must never serve
    the next request (what is left of an endless or refused body would be read as a head)."""
    resp.close()
    resp.release_conn()


def read_at_most(resp: urllib3.BaseHTTPResponse, limit: int, what: str, host: str) -> bytes:
    """The whole body when it is at most ``limit`` bytes, read ``READ_PIECE`` at a time;
    ProtocolError on a longer one (declared or sent), the connection closed unread. Bytes
    as sent: a Content-Encoding nobody asked for is not undone (digests are of these bytes)."""
    declared = resp.headers.get("Content-Length", "").strip()
    if _decimal(declared) and int(declared) > limit:
        close_unread(resp)
        raise ProtocolError(
            f"{what}: {host} declared a {declared}-byte body where at most {limit} were "
            "asked for; refused unread"
        )
    buf = bytearray()
    started = time.monotonic()
    try:
        # the floor's whole allowance, enforced from outside too: http.client reads chunk
        # trailers (without end, if the server likes) inside one read1
        with deadline(resp.connection, GRACE_S + limit / MIN_RATE) as cut:
            while len(buf) <= limit:
                # read1: what one receive gives, so the rate is checked as bytes trickle in
                piece = resp.read1(min(READ_PIECE, limit + 1 - len(buf)), decode_content=False)
                if not piece:
                    break
                buf += piece
                check_rate(resp, started, len(buf), what, host)
        if cut.is_set():
            raise TimeoutError(f"body past its {GRACE_S + limit / MIN_RATE:.0f} s")
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        close_unread(resp)
        raise TransientError(f"{what}: body cut ({exc.__class__.__name__})") from None
    if len(buf) > limit:
        close_unread(resp)
        raise ProtocolError(
            f"{what}: {host} sent more than the {limit} bytes asked for; refused, not buffered"
        )
    resp.release_conn()
    return bytes(buf)


def check_rate(
    resp: urllib3.BaseHTTPResponse, started: float, got: int, what: str, host: str
) -> None:
    """TransientError (the response closed) when a body comes slower than the floor."""
    elapsed = time.monotonic() - started
    if elapsed > GRACE_S + got / MIN_RATE:
        close_unread(resp)
        raise TransientError(
            f"{what}: {host} sent {got} bytes in {elapsed:.0f} s, under {MIN_RATE >> 10} "
            "KiB/s; dropped"
        )


def discard(resp: urllib3.BaseHTTPResponse) -> None:
    """Done with a body nobody needs (a redirect's, a challenge's): read it when small, so
    the connection can serve again; close it otherwise."""
    with contextlib.suppress(ProtocolError, TransientError):  # those close it themselves
        read_at_most(resp, SMALL_BODY_LIMIT, "", "")


class Registry:
    """One repository of one registry."""

    def __init__(
        self, reference: Reference, *, insecure: bool = False, ca_bundle: str | None = None
    ) -> None:
        self.reference = reference
        host = reference.api_host
        plain = insecure or host.split(":")[0] in _LOCAL or host.startswith("[::1]")
        self.base = f"{'http' if plain else 'https'}://{host}"
        self.display = str(reference)
        ca = ca_bundle or os.environ.get("SSL_CERT_FILE")
        self._pool = urllib3.PoolManager(
            maxsize=IN_FLIGHT * 2,
            retries=False,
            timeout=urllib3.Timeout(connect=10.0, read=60.0),
            ca_certs=ca if ca and os.path.exists(ca) else None,
        )
        # connections that remember their peer (check_destination)
        self._pool.pool_classes_by_scheme = {"http": _PeerHTTPPool, "https": _PeerHTTPSPool}
        self._credentials = find_credentials(reference.registry)
        self._auth: str | None = None  # the Authorization header that worked
        self._lock = threading.Lock()
        # where the registry itself answered (its host name until then): what decides whether
        # its redirects may lead to loopback or link-local addresses
        self._home = urlsplit(self.base).hostname or ""
        self.executor = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="spotstart-blob")

    # -- requests --------------------------------------------------------------------------

    def request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, *, what: str
    ) -> urllib3.BaseHTTPResponse:
        """One request with auth, redirects and bounded retries of transient failures."""
        return self.retrying(lambda: self.send(method, path, dict(headers or {}), what), what)

    def retrying(self, call: Callable[[], T], what: str) -> T:
        """The one retry loop of registry reads: ``call`` again on a transient failure, with
        full-jitter backoff (or the server's Retry-After), ``ATTEMPTS`` times."""
        last: Exception | None = None
        for attempt in range(ATTEMPTS):
            try:
                return call()
            except TransientError as exc:
                last = exc
                delay = (
                    exc.retry_after_s
                    if exc.retry_after_s is not None
                    else random.uniform(0, min(8.0, 0.2 * 2**attempt))
                )
                time.sleep(min(delay, 30.0))
        raise RetriesExceeded(f"{what}: {last} (after {ATTEMPTS} attempts)", last)

    def send(
        self, method: str, path: str, headers: dict[str, str], what: str
    ) -> urllib3.BaseHTTPResponse:
        url = path if path.startswith(("http://", "https://")) else self.base + path
        authed = False
        for _ in range(8):  # redirects and one auth round
            send = dict(headers)
            # Scheme too: a redirect to http:// on the same host must not carry the token.
            same_host = _origin(url) == _origin(self.base)
            if self._auth and same_host:
                send["Authorization"] = self._auth  # never to a redirect's other host (S3, CDN)
            try:
                resp = self._pool.request(
                    method, url, headers=send, preload_content=False, redirect=False
                )
            except urllib3.exceptions.NewConnectionError as exc:
                raise EndpointUnreachable(
                    f"{what}: cannot connect to {urlsplit(url).netloc} ({exc.__class__.__name__})"
                ) from None
            except urllib3.exceptions.SSLError as exc:
                raise EndpointUnreachable(
                    f"{what}: TLS failed with {urlsplit(url).netloc} ({exc}); "
                    "--insecure-registry for plain http"
                ) from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise TransientError(f"{what}: {exc.__class__.__name__}") from None
            if same_host:
                self._home = _peer(resp) or self._home
            else:  # a redirect led here: not to our metadata server
                check_destination(resp, self._home, what)
            status = resp.status
            if status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                discard(resp)
                url = target_url(url, resp.headers["Location"], f"{what}: redirect")
                continue
            if status == 401 and same_host and not authed:
                challenge = resp.headers.get("WWW-Authenticate", "")
                discard(resp)
                self._authenticate(challenge, what)
                authed = True
                continue
            if status in (200, 206):
                return resp
            try:
                body = read_at_most(resp, SMALL_BODY_LIMIT, what, urlsplit(url).netloc)
            except ProtocolError:
                body = b""  # an error answer too long to read: its status says enough
            self._raise(status, body, resp.headers, what)
        raise ProtocolError(f"{what}: too many redirects")

    def _raise(self, status: int, body: bytes, headers: Mapping[str, str], what: str) -> None:
        codes = ""
        try:
            errors = untrusted_json.parse(body, what=what).get("errors") or []
            codes = _shown(
                ", ".join(
                    f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)
                )
            )
        except (ValueError, AttributeError, TypeError):
            pass
        detail = f" ({codes})" if codes else ""
        if status in _RETRY:
            retry_after = headers.get("Retry-After", "")
            raise TransientError(
                f"{what}: HTTP {status}{detail}",
                retry_after_s=float(retry_after) if _decimal(retry_after) else None,
                status=status,
            )
        if status == 404:
            raise NotFound(f"{what}: not found in {self.display}{detail}")
        if status == 401:
            if self._credentials is None:
                raise CredentialsNotFound(
                    f"{what}: {self.reference.registry} needs credentials{detail}; "
                    f"run `docker login {self.reference.registry}`"
                )
            raise AccessDenied(
                f"{what}: {self.reference.registry} refused the credentials from "
                f"{self._credentials.source}{detail}"
            )
        if status == 403:
            raise AccessDenied(f"{what}: access to {self.reference.repository} denied{detail}")
        raise ProtocolError(f"{what}: unexpected HTTP {status}{detail}")

    def _authenticate(self, challenge: str, what: str) -> None:
        scheme, params = parse_challenge(challenge)
        creds = self._credentials
        if scheme == "basic":
            if creds is None or not creds.username:
                raise CredentialsNotFound(
                    f"{what}: {self.reference.registry} needs credentials; "
                    f"run `docker login {self.reference.registry}`"
                )
            token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            self._auth = f"Basic {token}"
            return
        if scheme != "bearer" or not params.get("realm"):
            raise ProtocolError(
                f"{what}: 401 without a usable WWW-Authenticate challenge ({_shown(challenge)!r})"
            )
        scope = params.get("scope") or f"repository:{self.reference.repository}:pull"
        query = {k: v for k, v in (("service", params.get("service", "")), ("scope", scope)) if v}
        realm = params["realm"]
        realm = target_url(realm, "", f"{what}: token realm")
        realm_scheme = urlsplit(realm).scheme
        if creds is not None and realm_scheme == "http" and self.base.startswith("https:"):
            raise ProtocolError(
                f"{what}: {self.reference.registry} sends its credentials to a plain-http token "
                f"service ({_shown(realm)}); refused: they would travel in clear"
            )
        headers: dict[str, str] = {}
        if creds is not None and creds.identity_token:
            form = urlencode(
                {
                    **query,
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "spotstart",
                }
            )
            resp = self._token_request(
                "POST",
                realm,
                headers | {"Content-Type": "application/x-www-form-urlencoded"},
                form.encode(),
                what,
            )
        else:
            if creds is not None and creds.username:
                headers["Authorization"] = (
                    "Basic "
                    + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
                )
            joiner = "&" if "?" in realm else "?"
            resp = self._token_request(
                "GET", f"{realm}{joiner}{urlencode(query)}", headers, None, what
            )
        bearer = resp.get("token") or resp.get("access_token")
        if not isinstance(bearer, str) or not bearer:
            raise ProtocolError(f"{what}: the token service at {_shown(realm)} answered no token")
        if not _TOKEN.fullmatch(bearer):
            raise ProtocolError(
                f"{what}: the token service at {_shown(realm)} answered a token that is not "
                "visible ASCII (it would not fit in a header)"
            )
        self._auth = f"Bearer {bearer}"

    def _token_request(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None, what: str
    ) -> dict[str, object]:
        """One token request, redirects followed by hand: credentials (the Authorization
        header, a refresh token in a POST body) never go to another scheme or host."""
        for _ in range(5):
            host = urlsplit(url).netloc
            try:
                resp = self._pool.request(
                    method, url, headers=headers, body=body, redirect=False, preload_content=False
                )
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise EndpointUnreachable(
                    f"{what}: token service {host} unreachable ({exc.__class__.__name__})"
                ) from None
            # a realm (or its redirect) on the metadata server: its "token" would go to the
            # registry in our next request
            check_destination(resp, self._home, f"{what}: token service {host}")
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                discard(resp)
                target = target_url(url, resp.headers["Location"], f"{what}: token redirect")
                if _origin(target) != _origin(url):
                    if body is not None:
                        raise ProtocolError(
                            f"{what}: token service {host} redirected a request carrying a "
                            "refresh token to another host; refused"
                        )
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                url = target
                continue
            break
        else:
            raise ProtocolError(f"{what}: token service {host}: too many redirects")
        if resp.status in (401, 403):
            discard(resp)
            if self._credentials is None:
                raise CredentialsNotFound(
                    f"{what}: {self.reference.registry} needs credentials; "
                    f"run `docker login {self.reference.registry}`"
                )
            raise AccessDenied(
                f"{what}: the token service refused the credentials from {self._credentials.source}"
            )
        if resp.status != 200:
            discard(resp)
            raise ProtocolError(f"{what}: token service answered HTTP {resp.status}")
        data = read_at_most(resp, TOKEN_LIMIT, f"{what} token answer", host)
        try:
            doc = untrusted_json.parse(data, what=f"{what}: token service {host}")
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        return doc if isinstance(doc, dict) else {}

    # -- the blob store --------------------------------------------------------------------

    def get_manifest(self, ref: str, accept: str = oci.ACCEPT) -> tuple[bytes, str]:
        what = f"{self.display} manifest {ref}"
        path = f"/v2/{self.reference.repository}/manifests/{ref}"

        def once() -> tuple[bytes, urllib3.BaseHTTPResponse]:
            # the body inside the retry too: one cut or trickled is tried again, like a range
            resp = self.send("GET", path, {"Accept": accept}, what)
            return read_at_most(resp, MANIFEST_LIMIT, what, self.reference.registry), resp

        data, resp = self.retrying(once, what)
        content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        header = resp.headers.get("Docker-Content-Digest", "")
        if header:
            check_bytes(data, Digest.parse(header), None, what)
        return data, content_type

    def read_manifest(self, desc: oci.Descriptor) -> bytes:
        data, _ = self.get_manifest(str(desc.digest), desc.media_type or oci.ACCEPT)
        check_bytes(data, desc.digest, desc.size, f"{self.display} manifest {desc.digest}")
        return data

    def open_blob(self, digest: Digest, size: int | None) -> BinaryIO:
        return _RangedBlob(self, digest, size)  # type: ignore[return-value]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._pool.clear()


class _RangedBlob(io.RawIOBase):
    """A blob read as ranged GETs, ``IN_FLIGHT`` at once, handed over in order. A registry
    that answers a range with 200 is read as one stream instead (if it is the first range).
    Never more than the descriptor's size: each range to its length, the stream to the size
    (a longer body is refused); the caller checks the digest of what came."""

    def __init__(self, registry: Registry, digest: Digest, size: int | None) -> None:
        if size is None:
            raise ProtocolError(f"{registry.display} blob {digest.short}: no size to read it to")
        self._reg = registry
        self._path = f"/v2/{registry.reference.repository}/blobs/{digest}"
        self._what = f"{registry.display} blob {digest.short}"
        self._host = registry.reference.registry
        self._size = size
        self._next = 0
        self._pending: deque[Future[bytes]] = deque()
        self._buffer = memoryview(b"")
        self._stream: urllib3.BaseHTTPResponse | None = None
        self._stream_left = 0  # bytes the stream may still deliver
        self._stream_started = 0.0
        self._stream_deadline: threading.Timer | None = None
        self._stream_cut = threading.Event()

    def readable(self) -> bool:
        return True

    def _range(self, start: int, end: int) -> bytes:
        """One ranged read, retried as a whole (a short or cut body too)."""
        return self._reg.retrying(lambda: self._range_once(start, end), self._what)

    def _range_once(self, start: int, end: int) -> bytes:
        resp = self._reg.send("GET", self._path, {"Range": f"bytes={start}-{end - 1}"}, self._what)
        if resp.status == 200:
            close_unread(resp)
            if start != 0:
                raise ProtocolError(f"{self._what}: the registry ignored a Range request (200)")
            return b""  # signal: read it as one stream
        m = re.fullmatch(
            r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)", resp.headers.get("Content-Range", "").strip()
        )
        if not m or int(m.group(1)) != start or int(m.group(2)) != end - 1:
            close_unread(resp)
            raise ProtocolError(f"{self._what}: a 206 without the Content-Range asked for")
        what = f"{self._what} bytes {start}-{end - 1}"
        data = read_at_most(resp, end - start, what, self._host)
        if len(data) != end - start:
            raise TransientError(f"{self._what}: short body ({len(data)} of {end - start} bytes)")
        return data

    def _fill(self) -> None:
        while len(self._pending) < IN_FLIGHT and self._next < self._size:
            start, end = self._next, min(self._size, self._next + RANGE_BYTES)
            self._pending.append(self._reg.executor.submit(self._range, start, end))
            self._next = end

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self._stream is not None:
            return self._read_stream(buf)
        if not len(self._buffer):
            self._fill()
            if not self._pending:
                return 0
            data = self._pending.popleft().result()
            if data == b"" and self._size:
                for f in self._pending:
                    f.cancel()
                self._pending.clear()
                self._open_stream()
                return self._read_stream(buf)
            self._buffer = memoryview(data)
        n = min(len(buf), len(self._buffer))
        buf[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def _open_stream(self) -> None:
        resp = self._reg.request("GET", self._path, what=self._what)
        declared = resp.headers.get("Content-Length", "").strip()
        if _decimal(declared) and int(declared) > self._size:
            close_unread(resp)
            raise ProtocolError(
                f"{self._what}: {self._host} declared {declared} bytes for a blob of "
                f"{self._size}; refused unread"
            )
        self._stream, self._stream_left = resp, self._size
        self._stream_started = time.monotonic()
        # the floor's whole allowance, enforced from outside too (see read_at_most)
        self._stream_cut = threading.Event()

        def cut(conn: object = resp.connection) -> None:
            self._stream_cut.set()
            _cut(conn)

        self._stream_deadline = threading.Timer(GRACE_S + self._size / MIN_RATE, cut)
        self._stream_deadline.daemon = True
        self._stream_deadline.start()

    def _read_stream(self, buf: memoryview) -> int:
        assert self._stream is not None
        view = memoryview(buf)[: self._stream_left] if self._stream_left else memoryview(buf)[:1]
        try:
            # bytes as sent (digests are of them), one receive at a time (the rate floor)
            piece = self._stream.read1(len(view), decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TransientError(
                f"{self._what}: blob stream cut ({exc.__class__.__name__})"
            ) from None
        if self._stream_cut.is_set():  # what the cut read returned may look like the end
            raise TransientError(f"{self._what}: blob stream past its deadline; cut")
        n = len(piece)
        view[:n] = piece
        if n:
            got = self._size - self._stream_left + n
            check_rate(self._stream, self._stream_started, got, self._what, self._host)
        if n and not self._stream_left:
            raise ProtocolError(
                f"{self._what}: {self._host} sent more than the blob's {self._size} bytes; "
                "refused, not buffered"
            )
        self._stream_left -= n
        return n

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        if self._stream_deadline is not None:
            self._stream_deadline.cancel()
        if self._stream is not None:
            close_unread(self._stream)
            self._stream = None
        super().close()


def open_registry_image(
    ref: str, *, platform: oci.Platform, insecure: bool = False
) -> tuple[Registry, ResolvedImage]:
    reference = parse_reference(ref)
    registry = Registry(reference, insecure=insecure)
    try:
        data, content_type = registry.get_manifest(reference.ref)
        what = str(reference)
        if reference.digest is not None:
            check_bytes(data, reference.digest, None, what)
        doc = oci.load_json(data, f"{what} manifest")
        media_type = oci.media_type_of(doc, content_type)
        digest = reference.digest or Digest("sha256", hashlib.sha256(data).hexdigest())
        if media_type in oci.INDEX_TYPES:
            desc, manifest = resolve_index(registry, doc, ref="", platform=platform, what=what)
            digest = desc.digest
        else:
            manifest = oci.parse_manifest(doc, media_type, what)
        config_doc = oci.load_json(
            read_verified(registry, manifest.config, "config"), f"{what} config"
        )
        config = oci.parse_config(config_doc, f"{what} config")
        image = ResolvedImage(
            name=what,
            kind="registry",
            manifest_digest=str(digest),
            config=config,
            layers=layers_from_manifest(registry, manifest, config, what),
            transport=f"docker://{reference.registry}/{reference.repository}@{digest}",
        )
    except BaseException:
        registry.close()
        raise
    return registry, image
