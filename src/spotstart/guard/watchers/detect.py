"""Which cloud are we on, and the watchers for it. ``detect_cloud`` asks the three metadata
servers at once with short timeouts; only a genuine protocol answer counts (GCE's
``Metadata-Flavor: Google`` header, an IMDSv2 token, an Azure scheduled-events document), each
read to a bound and checked as the watchers check it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from spotstart.guard.watchers._common import (
    WATCH_ERRORS,
    Clock,
    Cloud,
    client_session,
    read_body,
    resolve_metadata_url,
    timeout,
)
from spotstart.guard.watchers.aws import (
    MAX_TOKEN_BYTES,
    TOKEN_PATH,
    AwsWatcher,
    AwsWatcherConfig,
    parse_token,
)
from spotstart.guard.watchers.azure import (
    EVENTS_CONTENT_TYPES,
    EVENTS_PATH,
    AzureWatcher,
    AzureWatcherConfig,
    parse_scheduled_events,
)
from spotstart.guard.watchers.gce import GceWatcher, GceWatcherConfig
from spotstart.guard.watchers.signals import SignalWatcher, SignalWatcherConfig

if TYPE_CHECKING:
    import aiohttp

    from spotstart.guard.notice import NoticeWatcher

CLOUDS: tuple[Cloud, ...] = ("gce", "aws", "azure")
# On GKE the kubelet's graceful node shutdown gives non-system pods the first 15 s of the 30 s
# preemption notice (system pods get the rest); a longer terminationGracePeriodSeconds has no
# effect. https://cloud.google.com/kubernetes-engine/docs/concepts/spot-vms
GKE_POD_PREEMPTION_WINDOW_S = 15.0


async def _probe(session: aiohttp.ClientSession, cloud: Cloud, base: str, timeout_s: float) -> bool:
    try:
        if cloud == "gce":
            async with session.get(
                f"{base}/computeMetadata/v1/instance/preempted",
                headers={"Metadata-Flavor": "Google"},
                timeout=timeout(timeout_s),
                allow_redirects=False,
            ) as resp:
                return resp.status == 200 and resp.headers.get("Metadata-Flavor") == "Google"
        if cloud == "aws":
            async with session.put(
                base + TOKEN_PATH,
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
                timeout=timeout(timeout_s),
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    return False
                token = await read_body(resp, "token PUT", limit=MAX_TOKEN_BYTES)
                parse_token(token, resp.headers.get("X-aws-ec2-metadata-token-ttl-seconds"), 60)
                return True
        async with session.get(
            base + EVENTS_PATH,
            params={"api-version": "2020-07-01"},
            headers={"Metadata": "true"},
            timeout=timeout(timeout_s),
            allow_redirects=False,
        ) as resp:
            if resp.status != 200:
                return False
            body = await read_body(
                resp, EVENTS_PATH, content_types=EVENTS_CONTENT_TYPES, require_content_type=True
            )
            parse_scheduled_events(body)
            return True
    except WATCH_ERRORS:
        return False


async def detect_cloud(
    *,
    endpoints: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    timeout_s: float = 1.0,
) -> Cloud | None:
    """Probe GCE, AWS and Azure in parallel; the first that answers its protocol, in that order,
    or None (not on a cloud VM, or metadata blocked).

    ``endpoints`` maps a cloud to its metadata base URL (tests: emulators on 127.0.0.1); a cloud
    not in it uses the SDK override or the documented address. ``AWS_EC2_METADATA_DISABLED=true``
    skips AWS unless it has an explicit endpoint.

    Example::

        cloud = await detect_cloud()  # "gce" on a GKE node
    """
    env = os.environ if environ is None else environ
    explicit = endpoints or {}
    targets: dict[Cloud, str] = {}
    for cloud in CLOUDS:
        disabled = env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
        if cloud == "aws" and cloud not in explicit and disabled:
            continue
        targets[cloud] = resolve_metadata_url(cloud, explicit.get(cloud), env)
    async with client_session() as session:
        answers = await asyncio.gather(
            *(_probe(session, cloud, base, timeout_s) for cloud, base in targets.items())
        )
    for cloud, answered in zip(targets, answers, strict=True):
        if answered:
            return cloud
    return None


def make_watchers(
    cloud: str | None,
    metadata_url: str | None = None,
    clock: Clock = time.monotonic,
    *,
    wall_clock: Clock = time.time,
    grace_s: float = 30.0,
    azure_acknowledge: bool = False,
    azure_vm_name: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[NoticeWatcher]:
    """The watchers for ``cloud`` ("gce", "aws", "azure" or None), always with a SIGTERM
    watcher (``grace_s``: terminationGracePeriodSeconds) first. In a Kubernetes pod on GCE
    (``KUBERNETES_SERVICE_HOST`` set) a preemption is due after 15 s, not 30: that is when the
    kubelet kills non-system pods.

    Example::

        watchers = make_watchers(await detect_cloud(), clock=time.monotonic, grace_s=30)
    """
    watchers: list[NoticeWatcher] = [
        SignalWatcher(SignalWatcherConfig(grace_s=grace_s), clock=clock)
    ]
    env = os.environ if environ is None else environ
    if cloud == "gce":
        window_s = GceWatcherConfig.preemption_window_s
        if env.get("KUBERNETES_SERVICE_HOST"):
            window_s = GKE_POD_PREEMPTION_WINDOW_S
        config = GceWatcherConfig(metadata_url=metadata_url, preemption_window_s=window_s)
        watchers.append(GceWatcher(config, clock=clock, environ=env))
    elif cloud == "aws":
        watchers.append(
            AwsWatcher(
                AwsWatcherConfig(metadata_url=metadata_url),
                clock=clock,
                wall_clock=wall_clock,
                environ=env,
            )
        )
    elif cloud == "azure":
        watchers.append(
            AzureWatcher(
                AzureWatcherConfig(
                    metadata_url=metadata_url,
                    acknowledge=azure_acknowledge,
                    resource_name=azure_vm_name,
                ),
                clock=clock,
                wall_clock=wall_clock,
                environ=environ,
            )
        )
    elif cloud is not None:
        raise ValueError(f"unknown cloud {cloud!r}: expected gce, aws, azure or None")
    return watchers
