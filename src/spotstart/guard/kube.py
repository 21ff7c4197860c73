"""Marking this pod on a preemption notice, so that a controller (or anyone watching pods) can
start the replacement before the pod is gone: a JSON merge-patch of two annotations on the pod
itself, through the Kubernetes API with the pod's own service-account token. In-cluster only:
``KUBERNETES_SERVICE_HOST``/``_PORT``, the mounted token and CA, ``POD_NAME``/``POD_NAMESPACE``
from the downward API. Never fatal: a failure is logged and the drain goes on.

What is believed: the pod's name and namespace only as Kubernetes names (they are joined into the
API path: a ``/`` or ``..`` would aim the patch elsewhere), the service-account files and the
API's answers only up to small bounds (a token is a few KiB; an answer is kept for the log only).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from spotstart.guard.notice import PreemptionNotice

log = logging.getLogger("spotstart.guard")

NOTICE_ANNOTATION = "spotstart.dev/notice"  # the notice's kind: preemption, termination...
DEADLINE_ANNOTATION = "spotstart.dev/notice-deadline"  # RFC 3339, UTC: when the pod goes
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RETRYABLE = frozenset({429, 500, 502, 503, 504})
# Kubernetes object names: a pod is a DNS-1123 subdomain, a namespace a DNS-1123 label.
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_POD_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NAMESPACE = re.compile(_LABEL)
# A projected service-account token is a JWT (about 1 KiB); the namespace file a name.
MAX_TOKEN_BYTES = 64 * 1024
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")
MAX_ANSWER_LOG_BYTES = 200


def is_pod_name(name: str) -> bool:
    return len(name) <= 253 and _POD_NAME.fullmatch(name) is not None


def is_namespace(name: str) -> bool:
    return _NAMESPACE.fullmatch(name) is not None


def read_small(path: Path, limit: int) -> str:
    """The stripped text of ``path``, at most ``limit`` bytes; ValueError if longer or not
    UTF-8, OSError if unreadable."""
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: longer than {limit} bytes")
    return data.decode("utf-8").strip()


def read_token(path: Path) -> str:
    """The service-account token at ``path``; ValueError if it is not a bearer token."""
    token = read_small(path, MAX_TOKEN_BYTES)
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"{path}: not a bearer token")
    return token


@dataclass(frozen=True)
class PodRef:
    """Where this pod is in the API and how to authenticate as it."""

    api: str  # base URL, e.g. https://10.0.0.1:443
    namespace: str
    name: str
    token_path: Path
    ca_path: Path | None

    @property
    def url(self) -> str:
        return f"{self.api}/api/v1/namespaces/{self.namespace}/pods/{self.name}"


def pod_from_env(environ: Mapping[str, str], sa_dir: Path | None = None) -> PodRef | None:
    """This pod, when the guard runs in one with its token mounted; else None. The API URL is
    ``SPOTSTART_KUBE_API`` if set (tests), else https on the service host and port; the token
    directory ``SPOTSTART_KUBE_SA_DIR`` if set, else the standard mount."""
    folder = sa_dir or Path(environ.get("SPOTSTART_KUBE_SA_DIR") or SA_DIR)
    name = environ.get("POD_NAME", "")
    namespace = environ.get("POD_NAMESPACE", "")
    if not namespace and (folder / "namespace").is_file():
        try:
            namespace = read_small(folder / "namespace", 1024)
        except (OSError, ValueError) as exc:
            log.warning("cannot read this pod's namespace: %s", exc)
            return None
    for what, value, valid in (
        ("POD_NAME", name, is_pod_name),
        ("namespace", namespace, is_namespace),
    ):
        if value and not valid(value):
            log.warning("%s %r is not a Kubernetes name: this pod is not marked", what, value[:80])
            return None
    api = environ.get("SPOTSTART_KUBE_API", "").rstrip("/")
    host = environ.get("KUBERNETES_SERVICE_HOST", "")
    if not api and host:
        port = environ.get("KUBERNETES_SERVICE_PORT", "443")
        api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    token = folder / "token"
    if not (name and namespace and api and token.is_file()):
        return None
    ca = folder / "ca.crt"
    return PodRef(api, namespace, name, token, ca if ca.is_file() else None)


def notice_patch(notice: PreemptionNotice, now: float, wall_now: float) -> dict[str, object]:
    """The merge-patch: the notice's kind and its deadline as wall-clock UTC."""
    # within what datetime holds: a deadline past year 9999 (a watcher's absurd date) was a
    # ValueError out of the notice handler
    when = min(max(wall_now + notice.deadline - now, 0.0), 253_402_300_799.0)
    deadline = datetime.fromtimestamp(when, UTC)
    return {
        "metadata": {
            "annotations": {
                NOTICE_ANNOTATION: notice.kind.value,
                DEADLINE_ANNOTATION: deadline.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        }
    }


async def mark_pod(
    pod: PodRef,
    patch: dict[str, object],
    *,
    timeout_s: float = 5.0,
    attempts: int = 3,
) -> bool:
    """PATCH the pod's annotations; True once the API accepted it. 429/5xx and connection
    failures are retried (bounded), anything else is logged and given up."""
    ssl_ctx: ssl.SSLContext | bool = True
    if pod.ca_path is not None:
        try:
            ssl_ctx = ssl.create_default_context(cafile=str(pod.ca_path))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning(
                "could not mark pod %s/%s: CA %s: %s", pod.namespace, pod.name, pod.ca_path, exc
            )
            return False
    body = json.dumps(patch)
    deadline = time.monotonic() + timeout_s
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        for attempt in range(1, attempts + 1):
            # projected service-account tokens rotate: read it for every request
            try:
                token = read_token(pod.token_path)
            except (OSError, ValueError) as exc:
                status, text = 0, f"service-account token: {exc}"
                break
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
            }
            try:
                async with session.patch(pod.url, data=body, headers=headers, ssl=ssl_ctx) as r:
                    # kept for the log only: a bounded read, whatever the answer's length
                    raw = await r.content.read(MAX_ANSWER_LOG_BYTES)
                    text = raw.decode("utf-8", "replace")
                    status = r.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                status, text = 0, f"{type(exc).__name__}: {exc}"
            if 200 <= status < 300:
                log.info("marked pod %s/%s with the notice", pod.namespace, pod.name)
                return True
            if status not in RETRYABLE and status != 0:
                break
            if attempt < attempts and time.monotonic() + 0.2 * attempt < deadline:
                await asyncio.sleep(0.2 * attempt)
    log.warning(
        "could not mark pod %s/%s with the notice (HTTP %s: %s); the replacement starts only "
        "once the pod is gone",
        pod.namespace,
        pod.name,
        status or "-",
        text,
    )
    return False
