"""The guard marks its own pod on a notice, through a Kubernetes API served by kmock (a real
HTTP server with Kubernetes semantics; no kube-apiserver installs here): the merge-patch, the
service-account token, and a refusal that never stops the drain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotstart.guard.kube import (
    DEADLINE_ANNOTATION,
    NOTICE_ANNOTATION,
    notice_patch,
    pod_from_env,
)
from spotstart.guard.notice import NoticeKind, PreemptionNotice
from tests.guard.test_proxy import Proc, start_guard, start_upstream, wait_until_ready

kmock = pytest.importorskip("kmock")

NS, POD = "serving", "llama-8b-spot-7d9f-abcde"


def token_dir(tmp_path: Path, token: str = "t0k3n-of-this-pod") -> Path:
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "token").write_text(token + "\n")
    return folder


async def exited(proc: Proc, timeout_s: float = 30) -> int:
    for _ in range(int(timeout_s / 0.05)):
        code = proc.popen.poll()
        if code is not None:
            proc.close()
            return code
        await asyncio.sleep(0.05)  # not a blocking wait: kmock serves on this loop
    raise AssertionError("guard did not exit")


def pod_env(kmock_url: str, sa: Path) -> dict[str, str]:
    return {
        "POD_NAME": POD,
        "POD_NAMESPACE": NS,
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "SPOTSTART_KUBE_API": kmock_url,
        "SPOTSTART_KUBE_SA_DIR": str(sa),
    }


@contextlib.contextmanager
def guard_in_pod(kmock: Any, tmp_path: Path) -> Iterator[Proc]:
    """A guard (and its upstream) in an emulated pod whose API is kmock; SIGTERM sent once
    it is ready (the notice), torn down after."""
    upstream, upstream_url = start_upstream()
    try:
        env = pod_env(str(kmock.url), token_dir(tmp_path))
        guard, url = start_guard(
            upstream_url, "--cloud", "none", "--health-interval", "0.05", env=env
        )
        try:
            wait_until_ready(url, proc=guard)
            guard.popen.send_signal(signal.SIGTERM)
            yield guard
        finally:
            guard.stop()
    finally:
        upstream.stop()


async def test_on_a_notice_the_guard_annotates_its_own_pod_with_its_own_token(
    kmock: Any, tmp_path: Path
) -> None:
    kmock.objects["v1/pods", NS, POD] = {"metadata": {"name": POD, "namespace": NS}}
    with guard_in_pod(kmock, tmp_path) as guard:
        annotations: dict[str, str] = {}
        for _ in range(400):
            annotations = dict(
                kmock.objects["v1/pods", NS, POD].get("metadata", {}).get("annotations", {})
            )
            if annotations:
                break
            await asyncio.sleep(0.05)
        code = await exited(guard)
    assert code == 0, guard.text
    assert annotations[NOTICE_ANNOTATION] == "termination"
    assert annotations[DEADLINE_ANNOTATION].endswith("Z")
    patches = [r for r in kmock if r.method == "PATCH"]
    assert len(patches) == 1
    assert patches[0].headers["Authorization"] == "Bearer t0k3n-of-this-pod"
    assert patches[0].headers["Content-Type"] == "application/merge-patch+json"
    assert str(patches[0].url).endswith(f"/api/v1/namespaces/{NS}/pods/{POD}")
    assert "marked pod" in guard.text


async def test_a_refused_mark_is_logged_and_the_drain_goes_on(kmock: Any, tmp_path: Path) -> None:
    # no such pod in the API: 404, not retried, not fatal
    with guard_in_pod(kmock, tmp_path) as guard:
        code = await exited(guard)
    assert code == 0, guard.text
    assert "could not mark pod" in guard.text and "HTTP 404" in guard.text, guard.text


def test_mark_pod_on_outside_a_pod_is_a_usage_error(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    res = run_cli(
        ["guard", "--upstream", "http://127.0.0.1:1", "--listen", "127.0.0.1:0", "--mark-pod", "on"]
    )
    assert res.code == 2 and "--mark-pod on" in res.stderr, res.stderr


def test_the_pod_is_found_only_with_every_piece_in_place(tmp_path: Path) -> None:
    sa = token_dir(tmp_path)
    env = {"POD_NAME": "p", "POD_NAMESPACE": "n", "KUBERNETES_SERVICE_HOST": "fd00::1"}
    pod = pod_from_env(env, sa)
    assert pod is not None and pod.url == "https://[fd00::1]:443/api/v1/namespaces/n/pods/p"
    assert pod.ca_path is None
    for missing in ("POD_NAME", "KUBERNETES_SERVICE_HOST"):
        assert pod_from_env({k: v for k, v in env.items() if k != missing}, sa) is None
    (sa / "namespace").write_text("from-the-mount\n")
    pod = pod_from_env({"POD_NAME": "p", "KUBERNETES_SERVICE_HOST": "h"}, sa)
    assert pod is not None and pod.namespace == "from-the-mount"
    os.unlink(sa / "token")
    assert pod_from_env(env, sa) is None


def test_the_patch_carries_the_kind_and_the_wall_clock_deadline() -> None:
    notice = PreemptionNotice(NoticeKind.PREEMPTION, "gce", 100.0, 115.0)
    patch = notice_patch(notice, now=100.0, wall_now=1_800_000_000.0)
    assert patch == {
        "metadata": {
            "annotations": {
                NOTICE_ANNOTATION: "preemption",
                DEADLINE_ANNOTATION: "2027-01-15T08:00:15Z",
            }
        }
    }
