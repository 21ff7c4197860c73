"""The Kubernetes API client the controller uses (lightkube; why: README "Running on
Kubernetes"), how it is configured, and what its errors mean: the status code of an API
error, whether it is worth retrying, and one retry loop with backoff for writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, Context, User
from lightkube.core.exceptions import ApiError, ConfigError

from spotstart.errors import UsageError
from spotstart.guard.kube import RETRYABLE  # one list of the API's retryable statuses

log = logging.getLogger("spotstart.k8s")
T = TypeVar("T")


def api_status(exc: BaseException) -> int | None:
    """The HTTP status of an API failure: from the Status object (also for an ERROR event in
    a watch stream, which has no response) or the response; None for a transport error."""
    if isinstance(exc, ApiError) and exc.status is not None and exc.status.code:
        return int(exc.status.code)
    if isinstance(exc, httpx2.HTTPStatusError):
        return exc.response.status_code
    return None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttled, a server error, a timeout or a broken connection."""
    if isinstance(exc, httpx2.TransportError):
        return True
    return api_status(exc) in RETRYABLE


def retry_after(exc: BaseException) -> float | None:
    if isinstance(exc, httpx2.HTTPStatusError):
        try:
            return float(exc.response.headers.get("Retry-After", ""))
        except ValueError:
            return None
    return None


class Backoff:
    """Exponential backoff with full jitter, capped; Retry-After wins when the server sets it."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 30.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self, exc: BaseException | None = None) -> float:
        self.failures += 1
        hinted = retry_after(exc) if exc is not None else None
        if hinted is not None:
            return min(max(hinted, 0.0), self.cap_s)
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** (self.failures - 1)))

    async def sleep(self, exc: BaseException | None = None) -> None:
        await asyncio.sleep(self.next_delay(exc))


async def with_retries(
    call: Callable[[], Awaitable[T]], what: str, attempts: int = 5, backoff: Backoff | None = None
) -> T:
    """``call()``, retried on transient failures; the last failure propagates. Only for
    idempotent requests (absolute replica counts, annotations): a retry never adds twice."""
    backoff = backoff or Backoff()
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts:
                raise
            delay = backoff.next_delay(exc)
            log.info("%s: %s, retrying in %.2f s", what, api_status(exc) or exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stop`` is set, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def make_client(api_url: str | None = None, sa_dir: Path | None = None) -> AsyncClient:
    """A client for ``api_url`` (``SPOTSTART_KUBE_API``; with the token in ``sa_dir`` /
    ``SPOTSTART_KUBE_SA_DIR`` if there is one), else the pod's service account, else
    ``KUBECONFIG`` / ``~/.kube/config``."""
    url = api_url or os.environ.get("SPOTSTART_KUBE_API")
    if url:
        folder = sa_dir or Path(os.environ.get("SPOTSTART_KUBE_SA_DIR", "/nonexistent"))
        token = folder / "token"
        user = User(token_file=str(token)) if token.is_file() else User()
        ca = folder / "ca.crt"
        cluster = Cluster(server=url, certificate_auth=str(ca) if ca.is_file() else None)
        config = KubeConfig(
            clusters={"api": cluster},
            users={"sa": user},
            contexts={"api": Context(cluster="api", user="sa")},
            current_context="api",
        )
        return AsyncClient(config, timeout=httpx2.Timeout(30.0))
    try:
        return AsyncClient(KubeConfig.from_env(), timeout=httpx2.Timeout(30.0))
    except ConfigError as exc:
        raise UsageError(
            f"no Kubernetes API to talk to ({exc}): run in a pod with a service account, "
            "set KUBECONFIG, or pass --kube-api URL"
        ) from exc
