"""Each notice watcher against its metadata emulator on 127.0.0.1 (and real SIGTERM): notices are
seen with the right kind and deadline, and faults never turn into a notice.

Deadlines are checked exactly on injected (fixed) clocks; time passes for real only in polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotstart.emulate.metadata import MetadataEmulator
from spotstart.emulate.servers import free_port
from spotstart.guard.notice import NoticeKind, NoticeWatcher, PreemptionNotice
from spotstart.guard.watchers import (
    AwsWatcher,
    AwsWatcherConfig,
    AzureWatcher,
    AzureWatcherConfig,
    GceWatcher,
    GceWatcherConfig,
    PollConfig,
    SignalWatcher,
    SignalWatcherConfig,
    detect_cloud,
    make_watchers,
    resolve_metadata_url,
    watch_all,
)
from spotstart.guard.watchers import aws as aws_mod
from spotstart.guard.watchers import azure as azure_mod
from spotstart.guard.watchers import gce as gce_mod
from spotstart.guard.watchers._common import Backoff, MalformedMetadata, WarningLimiter
from tests.guard.conftest import W

FAST = PollConfig(
    poll_interval_s=0.05, request_timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.2
)
NOTICE_TIMEOUT_S = 10.0


class FixedClock:
    """A clock that stands still unless told: deadlines come out exact."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Stream:
    """Iterates a watcher in the background so a test can check "nothing yet" and then await."""

    def __init__(self, watcher: NoticeWatcher) -> None:
        # every watcher's watch() is an async generator; the protocol only promises an iterator
        self._agen = cast(AsyncGenerator[PreemptionNotice, None], watcher.watch())
        self._next: asyncio.Future[PreemptionNotice] | None = None

    def _pending(self) -> asyncio.Future[PreemptionNotice]:
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._agen))
        return self._next

    def start(self) -> None:
        self._pending()

    def has_notice(self) -> bool:
        return self._pending().done()

    async def next(self, timeout_s: float = NOTICE_TIMEOUT_S) -> PreemptionNotice:
        future = self._pending()
        notice = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        self._next = None
        return notice

    async def close(self) -> None:
        if self._next is not None and not self._next.done():
            self._next.cancel()
            await asyncio.gather(self._next, return_exceptions=True)
        await self._agen.aclose()


@pytest.fixture
async def streams() -> AsyncIterator[Callable[[NoticeWatcher], Stream]]:
    opened: list[Stream] = []

    def open_stream(watcher: NoticeWatcher) -> Stream:
        stream = Stream(watcher)
        stream.start()
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        await stream.close()


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``check`` with a deadline (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


def faults_served(emu: MetadataEmulator, n: int) -> Callable[[], bool]:
    return lambda: emu.requests()["faults_served"] >= n


def requests_to(emu: MetadataEmulator, path: str, n: int) -> Callable[[], bool]:
    return lambda: emu.requests()["by_path"].get(path, 0) >= n


def gce_watcher(url: str, clock: Callable[[], float] | None = None) -> GceWatcher:
    config = GceWatcherConfig(metadata_url=url, long_poll_timeout_s=2, poll=FAST)
    return GceWatcher(config, clock=clock or FixedClock(1000.0))


def aws_watcher(url: str, **config: Any) -> AwsWatcher:
    return AwsWatcher(
        AwsWatcherConfig(metadata_url=url, poll=FAST, **config),
        clock=FixedClock(500.0),
        wall_clock=lambda: W + 3,
    )


def azure_watcher(url: str, **config: Any) -> AzureWatcher:
    return AzureWatcher(
        AzureWatcherConfig(metadata_url=url, poll=FAST, **config),
        clock=FixedClock(100.0),
        wall_clock=lambda: W,
    )


GCE_PREEMPTED = "/computeMetadata/v1/instance/preempted"
AWS_TOKEN = "/latest/api/token"
AWS_ACTION = "/latest/meta-data/spot/instance-action"
AZURE_EVENTS = "/metadata/scheduledevents"

# -- GCE ----------------------------------------------------------------------------------------


async def test_gce_preemption_arrives_by_long_poll_due_30s_after_receipt(
    gce: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    stream = streams(gce_watcher(gce.url))
    await until(requests_to(gce, GCE_PREEMPTED, 2))  # the plain read, then the long poll
    gce.preempt()
    notice = await stream.next()
    assert notice.kind is NoticeKind.PREEMPTION and notice.source == "gce"
    assert (notice.received_at, notice.deadline) == (1000.0, 1030.0)
    # the long poll answered the change (plain polling every 50 ms would have sent many more);
    # the watcher may already have sent its next long poll
    assert gce.requests()["by_path"][GCE_PREEMPTED] <= 3


async def test_gce_preemption_window_is_configurable(
    gce: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    gce.preempt()
    config = GceWatcherConfig(metadata_url=gce.url, preemption_window_s=25.0, poll=FAST)
    notice = await streams(GceWatcher(config, clock=FixedClock(7.0))).next()
    assert notice.deadline == 32.0


@pytest.mark.parametrize(
    ("kind", "expected", "early"),
    [("maintenance", NoticeKind.MIGRATION, True), ("termination", NoticeKind.TERMINATION, False)],
)
async def test_gce_maintenance_event_is_reported_with_its_kind(
    gce: MetadataEmulator,
    streams: Callable[[NoticeWatcher], Stream],
    kind: str,
    expected: NoticeKind,
    early: bool,
) -> None:
    stream = streams(gce_watcher(gce.url))
    gce.preempt(in_s=0.2, kind=kind)
    notice = await stream.next()
    assert notice.kind is expected and notice.kind.is_early_signal is early
    assert notice.deadline == 1060.0  # GCE: 60 s before host maintenance
    assert notice.detail["key"] == "maintenance-event"


@pytest.mark.parametrize(("mode", "count"), [("500", 4), ("garbage", 4), ("hang", 1)])
async def test_gce_faults_give_no_notice_and_watching_goes_on(
    gce: MetadataEmulator,
    streams: Callable[[NoticeWatcher], Stream],
    caplog: pytest.LogCaptureFixture,
    mode: str,
    count: int,
) -> None:
    caplog.set_level(logging.WARNING, logger="spotstart.guard.watchers")
    gce.fail(mode, count)  # type: ignore[arg-type]
    stream = streams(gce_watcher(gce.url, clock=asyncio.get_running_loop().time))
    await until(faults_served(gce, count))
    await until(lambda: "no notice assumed" in caplog.text)
    assert not stream.has_notice()
    gce.preempt()
    assert (await stream.next()).kind is NoticeKind.PREEMPTION


async def test_gce_watcher_outlives_a_down_metadata_server(
    streams: Callable[[NoticeWatcher], Stream], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="spotstart.guard.watchers")
    port = free_port()
    # the SDK override, as GKE workloads and tests set it
    config = GceWatcherConfig(long_poll_timeout_s=2, poll=FAST)
    watcher = GceWatcher(config, environ={"GCE_METADATA_HOST": f"127.0.0.1:{port}"})
    stream = streams(watcher)
    await until(lambda: "ClientConnectorError" in caplog.text)
    assert not stream.has_notice()
    with MetadataEmulator("gce", port=port) as gce:
        gce.preempt()
        assert (await stream.next()).kind is NoticeKind.PREEMPTION


# -- AWS ----------------------------------------------------------------------------------------


async def test_aws_interruption_time_becomes_a_monotonic_deadline(
    aws: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    stream = streams(aws_watcher(aws.url))
    await until(requests_to(aws, AWS_ACTION, 1))
    aws.preempt(action="stop")
    notice = await stream.next()
    assert notice.kind is NoticeKind.PREEMPTION and notice.source == "aws"
    # time = W + 120 on the cloud's wall clock; we read it at W + 3 and monotonic 500
    assert (notice.received_at, notice.deadline) == (500.0, 617.0)
    assert notice.detail["action"] == "stop"


async def test_aws_rebalance_is_an_early_signal_then_the_interruption_follows(
    aws: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    stream = streams(aws_watcher(aws.url))
    aws.preempt(kind="rebalance")
    first = await stream.next()
    assert first.kind is NoticeKind.REBALANCE and first.kind.is_early_signal
    assert first.detail["noticeTime"] == "2027-01-15T08:00:00Z"
    aws.preempt()
    second = await stream.next()
    assert second.kind is NoticeKind.PREEMPTION  # the rebalance is not reported again


async def test_aws_takes_a_new_token_after_a_401(
    aws: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    stream = streams(aws_watcher(aws.url))
    await until(requests_to(aws, AWS_ACTION, 2))
    assert aws.requests()["by_path"][AWS_TOKEN] == 1  # the token is reused while valid
    aws.revoke_tokens()
    await until(requests_to(aws, AWS_TOKEN, 2))
    aws.preempt()
    assert (await stream.next()).kind is NoticeKind.PREEMPTION


async def test_aws_short_ttl_token_is_renewed_and_the_notice_still_arrives(
    aws: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    watcher = AwsWatcher(
        AwsWatcherConfig(metadata_url=aws.url, token_ttl_s=1, poll=FAST),
        clock=asyncio.get_running_loop().time,
        wall_clock=lambda: W,
    )
    stream = streams(watcher)
    await until(requests_to(aws, AWS_TOKEN, 3))
    assert not stream.has_notice()
    aws.preempt()
    assert (await stream.next()).kind is NoticeKind.PREEMPTION


@pytest.mark.parametrize(("mode", "count"), [("500", 4), ("garbage", 4), ("hang", 1)])
async def test_aws_faults_give_no_notice_and_watching_goes_on(
    aws: MetadataEmulator,
    streams: Callable[[NoticeWatcher], Stream],
    caplog: pytest.LogCaptureFixture,
    mode: str,
    count: int,
) -> None:
    caplog.set_level(logging.WARNING, logger="spotstart.guard.watchers")
    stream = streams(aws_watcher(aws.url))
    await until(requests_to(aws, AWS_ACTION, 1))  # garbage must hit the documents, not the PUT
    aws.fail(mode, count)  # type: ignore[arg-type]
    await until(faults_served(aws, count))
    await until(lambda: "no notice assumed" in caplog.text)
    assert not stream.has_notice()
    aws.preempt()
    assert (await stream.next()).kind is NoticeKind.PREEMPTION


# -- Azure --------------------------------------------------------------------------------------


def azure_document(emu: MetadataEmulator) -> dict[str, Any]:
    request = urllib.request.Request(
        emu.url + AZURE_EVENTS + "?api-version=2020-07-01", headers={"Metadata": "true"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        document: dict[str, Any] = json.loads(resp.read())
    return document


async def test_azure_preempt_deadline_is_not_before_on_the_monotonic_clock(
    azure: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    stream = streams(azure_watcher(azure.url))
    await until(requests_to(azure, AZURE_EVENTS, 1))
    azure.preempt()
    notice = await stream.next()
    assert notice.kind is NoticeKind.PREEMPTION and notice.source == "azure"
    assert (notice.received_at, notice.deadline) == (100.0, 130.0)  # NotBefore = W + 30
    assert notice.detail["event_type"] == "Preempt"
    assert azure_document(azure)["Events"][0]["EventStatus"] == "Scheduled"  # not approved


async def test_azure_reports_each_event_once_across_incarnations(
    azure: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    stream = streams(azure_watcher(azure.url))
    azure.preempt(kind="maintenance")
    first = await stream.next()
    assert first.kind is NoticeKind.RESTART and first.detail["event_type"] == "Reboot"
    azure.preempt()
    second = await stream.next()
    assert second.kind is NoticeKind.PREEMPTION
    assert second.detail["event_id"] != first.detail["event_id"]


async def test_azure_event_for_another_vm_of_the_scale_set_is_ignored(
    azure: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    # Scheduled Events reach every member of an availability/scale set: before, any member's
    # eviction drained every replica. The watcher asks IMDS compute/name and compares.
    stream = streams(azure_watcher(azure.url))
    await until(requests_to(azure, AZURE_EVENTS, 1))
    assert azure.requests()["by_path"].get("/metadata/instance/compute/name", 0) == 1
    azure.preempt(resources=["other-vm-7"])
    await until(requests_to(azure, AZURE_EVENTS, 4))
    assert not stream.has_notice()
    azure.preempt()  # names this VM ("vm")
    notice = await stream.next()
    assert notice.kind is NoticeKind.PREEMPTION
    assert notice.detail["event_id"] == azure_document(azure)["Events"][1]["EventId"]


async def test_azure_scale_set_instance_names_match_with_their_leading_underscore(
    streams: Callable[[NoticeWatcher], Stream],
) -> None:
    with MetadataEmulator("azure", wall_clock=lambda: W, vm_name="myvmss_3") as emu:
        stream = streams(azure_watcher(emu.url))
        emu.preempt(resources=["_myvmss_4"])
        emu.preempt(resources=["_MyVmss_3"])
        notice = await stream.next()
        assert notice.detail["event_id"] == azure_document(emu)["Events"][1]["EventId"]


async def test_azure_events_wait_until_this_vms_name_is_known(
    azure: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    name_path = "/metadata/instance/compute/name"
    azure.fail("500", count=3, path=name_path)  # IMDS answers 500 to the name lookups first
    azure.preempt()
    watcher = azure_watcher(azure.url)
    stream = streams(watcher)
    await until(faults_served(azure, 3))
    notice = await stream.next()
    assert notice.kind is NoticeKind.PREEMPTION
    assert azure.requests()["by_path"].get(name_path, 0) == 4
    assert watcher.faults.by_endpoint[name_path] == 3


def test_azure_resource_matching_is_exact_but_case_and_underscore_blind() -> None:
    from spotstart.guard.watchers.azure import names_this_vm

    assert names_this_vm(("FrontEnd_IN_0", "BackEnd_IN_0"), "backend_in_0")
    assert not names_this_vm(("FrontEnd_IN_0",), "FrontEnd_IN_01")
    assert not names_this_vm((), "vm") and not names_this_vm(("vm",), "")


async def test_azure_acknowledges_preempt_when_configured(
    azure: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    stream = streams(azure_watcher(azure.url, acknowledge=True))
    azure.preempt()
    notice = await stream.next()
    await until(lambda: azure_document(azure)["Events"][0]["EventStatus"] == "Started")
    assert azure_document(azure)["Events"][0]["EventId"] == notice.detail["event_id"]


async def test_azure_acknowledge_on_demand_starts_the_event(
    azure: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    watcher = azure_watcher(azure.url)
    stream = streams(watcher)
    azure.preempt()
    notice = await stream.next()
    incarnation = azure_document(azure)["DocumentIncarnation"]
    assert await watcher.acknowledge(notice.detail["event_id"])
    after = azure_document(azure)
    assert after["DocumentIncarnation"] == incarnation + 1
    assert after["Events"][0]["EventStatus"] == "Started"


@pytest.mark.parametrize(("mode", "count"), [("500", 4), ("garbage", 4), ("hang", 1)])
async def test_azure_faults_give_no_notice_and_watching_goes_on(
    azure: MetadataEmulator,
    streams: Callable[[NoticeWatcher], Stream],
    caplog: pytest.LogCaptureFixture,
    mode: str,
    count: int,
) -> None:
    caplog.set_level(logging.WARNING, logger="spotstart.guard.watchers")
    azure.fail(mode, count)  # type: ignore[arg-type]
    stream = streams(azure_watcher(azure.url))
    await until(faults_served(azure, count))
    await until(lambda: "no notice assumed" in caplog.text)
    assert not stream.has_notice()
    azure.preempt()
    assert (await stream.next()).kind is NoticeKind.PREEMPTION


# -- SIGTERM ------------------------------------------------------------------------------------


async def test_sigterm_is_a_termination_due_after_the_grace_period_and_handler_is_restored(
    streams: Callable[[NoticeWatcher], Stream],
) -> None:
    received: list[int] = []

    def sentinel(signum: int, frame: object) -> None:
        received.append(signum)  # catches a SIGTERM that arrives outside the watcher

    original = signal.signal(signal.SIGTERM, sentinel)
    try:
        watcher = SignalWatcher(SignalWatcherConfig(grace_s=12.0), clock=FixedClock(50.0))
        stream = streams(watcher)
        await until(lambda: signal.getsignal(signal.SIGTERM) is not sentinel)
        os.kill(os.getpid(), signal.SIGTERM)
        notice = await stream.next()
        assert notice.kind is NoticeKind.TERMINATION and notice.source == "signal"
        assert (notice.received_at, notice.deadline) == (50.0, 62.0)
        assert notice.detail["signal"] == "SIGTERM"
        await stream.close()
        assert signal.getsignal(signal.SIGTERM) is sentinel
        assert received == []
    finally:
        signal.signal(signal.SIGTERM, original)


class CrashingWatcher:
    name = "broken"

    async def watch(self) -> AsyncIterator[PreemptionNotice]:
        raise RuntimeError("bug in a watcher")
        yield  # pragma: no cover


async def test_watch_all_merges_watchers_and_survives_a_crashing_one(
    gce: MetadataEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    signal_watcher = SignalWatcher(clock=FixedClock(0.0))
    stream = streams_of(watch_all([CrashingWatcher(), signal_watcher, gce_watcher(gce.url)]))
    pending = asyncio.ensure_future(anext(stream))
    try:
        await until(lambda: "bug in a watcher" in caplog.text)
        await until(lambda: signal.getsignal(signal.SIGTERM) is not before)  # SIGTERM watched
        gce.preempt()
        notice = await asyncio.wait_for(pending, NOTICE_TIMEOUT_S)
        assert notice.source == "gce"
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await stream.aclose()
    assert signal.getsignal(signal.SIGTERM) is before


class FlakyWatcher:
    """Crashes on its first run, then reports one notice: a bug that must not blind the guard."""

    name = "flaky"

    def __init__(self) -> None:
        self.runs = 0

    async def watch(self) -> AsyncIterator[PreemptionNotice]:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("transient bug in a watcher")
        yield PreemptionNotice(NoticeKind.PREEMPTION, "flaky", 1.0, 2.0)
        await asyncio.Event().wait()


async def test_watch_all_restarts_a_watcher_that_crashed(caplog: pytest.LogCaptureFixture) -> None:
    watcher = FlakyWatcher()
    stream = streams_of(watch_all([watcher]))
    try:
        notice = await asyncio.wait_for(anext(stream), NOTICE_TIMEOUT_S)
    finally:
        await stream.aclose()
    assert notice.source == "flaky" and watcher.runs == 2
    assert "notice watcher 'flaky' crashed (a bug)" in caplog.text
    assert "transient bug in a watcher" in caplog.text  # with its traceback


def streams_of(
    iterator: AsyncIterator[PreemptionNotice],
) -> AsyncGenerator[PreemptionNotice, None]:
    return cast(AsyncGenerator[PreemptionNotice, None], iterator)


# -- detection and endpoints ----------------------------------------------------------------------


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize("cloud_name", ["gce", "aws", "azure"])
async def test_detect_cloud_finds_the_cloud_that_answers_its_protocol(cloud_name: str) -> None:
    # (not called "cloud": tests/conftest.py gives that name to the storage emulator fixture)
    with MetadataEmulator(cloud_name) as emu:  # type: ignore[arg-type]
        # every emulator is offered for every cloud: only its own protocol may match
        endpoints = {name: emu.url for name in ("gce", "aws", "azure")}
        assert await detect_cloud(endpoints=endpoints, timeout_s=2.0) == cloud_name


async def test_detect_cloud_is_none_when_no_metadata_server_answers() -> None:
    endpoints = {name: dead_url() for name in ("gce", "aws", "azure")}
    assert await detect_cloud(endpoints=endpoints, timeout_s=0.5) is None


def test_make_watchers_always_includes_the_signal_watcher() -> None:
    url = "http://127.0.0.1:9"
    assert [w.name for w in make_watchers(None)] == ["signal"]
    assert [w.name for w in make_watchers("gce", url)] == ["signal", "gce"]
    assert [w.name for w in make_watchers("aws", url)] == ["signal", "aws"]
    assert [w.name for w in make_watchers("azure", url)] == ["signal", "azure"]
    with pytest.raises(ValueError, match="unknown cloud"):
        make_watchers("oci")


def test_gce_preemption_in_a_gke_pod_is_due_when_the_kubelet_kills_pods() -> None:
    url = "http://127.0.0.1:9"
    in_pod = make_watchers("gce", url, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1"})[1]
    on_vm = make_watchers("gce", url, environ={})[1]
    assert isinstance(in_pod, GceWatcher) and isinstance(on_vm, GceWatcher)
    assert (in_pod.config.preemption_window_s, on_vm.config.preemption_window_s) == (15.0, 30.0)


@pytest.mark.parametrize(
    ("cloud_name", "explicit", "environ", "expected"),
    [
        ("gce", None, {}, "http://metadata.google.internal"),
        ("gce", None, {"GCE_METADATA_HOST": "127.0.0.1:8080"}, "http://127.0.0.1:8080"),
        ("gce", "http://127.0.0.1:1/", {"GCE_METADATA_HOST": "127.0.0.1:2"}, "http://127.0.0.1:1"),
        ("aws", None, {}, "http://169.254.169.254"),
        (
            "aws",
            None,
            {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:3/"},
            "http://127.0.0.1:3",
        ),
        ("azure", None, {}, "http://169.254.169.254"),
        ("azure", "http://127.0.0.1:4", {}, "http://127.0.0.1:4"),
        (
            "azure",
            None,
            {"SPOTSTART_AZURE_METADATA_URL": "http://127.0.0.1:5"},
            "http://127.0.0.1:5",
        ),
    ],
)
def test_metadata_url_prefers_argument_then_sdk_override_then_default(
    cloud_name: Any, explicit: str | None, environ: dict[str, str], expected: str
) -> None:
    assert resolve_metadata_url(cloud_name, explicit, environ) == expected


async def test_azure_ignores_events_for_other_vms_when_its_name_is_set(
    azure: MetadataEmulator, streams: Callable[[NoticeWatcher], Stream]
) -> None:
    ours = streams(azure_watcher(azure.url, resource_name="vm"))
    other = streams(azure_watcher(azure.url, resource_name="web-1"))
    azure.preempt()
    assert (await ours.next()).kind is NoticeKind.PREEMPTION
    seen = azure.requests()["by_path"][AZURE_EVENTS]
    await until(requests_to(azure, AZURE_EVENTS, seen + 4))  # both watchers read it again
    assert not other.has_notice()


# -- pure core ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
aws_like = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(["terminate", "stop", "hibernate", "reboot", ""]) | st.text(),
        "time": st.sampled_from(["2026-11-28T08:22:00Z", "2026-11-28", "", "soon"]) | st.text(),
        "noticeTime": st.text(),
    },
)
azure_like = st.fixed_dictionaries(
    {"DocumentIncarnation": st.integers() | st.text() | st.none()},
    optional={
        "Events": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "EventId": st.text(),
                    "EventType": st.sampled_from(["Preempt", "Reboot", "x"]),
                    "EventStatus": st.text(),
                    "NotBefore": st.text(),
                    "Resources": json_values,
                },
            ),
            max_size=3,
        )
    },
)
bodies = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | aws_like.map(lambda v: json.dumps(v).encode())
    | azure_like.map(lambda v: json.dumps(v).encode())
)


@given(bodies)
@settings(max_examples=300, deadline=None)
def test_parsers_answer_a_value_or_malformed_never_anything_else(body: bytes) -> None:
    """Whatever a broken metadata server sends, parsing either yields a valid document or raises
    MalformedMetadata, which the watchers turn into "warn and keep watching", never a notice."""
    for parse in (
        lambda b: gce_mod.parse_value(gce_mod.PREEMPTED, b),
        lambda b: gce_mod.parse_value(gce_mod.MAINTENANCE_EVENT, b),
        aws_mod.parse_instance_action,
        aws_mod.parse_rebalance,
        azure_mod.parse_scheduled_events,
        lambda b: [
            azure_mod.event_notice(e, NoticeKind.PREEMPTION, 0.0, W)
            for e in azure_mod.parse_scheduled_events(b).events
        ],
    ):
        with contextlib.suppress(MalformedMetadata):
            parse(body)
    with contextlib.suppress(MalformedMetadata):
        assert gce_mod.parse_value(gce_mod.PREEMPTED, body) in ("TRUE", "FALSE")
    with contextlib.suppress(MalformedMetadata):
        name = azure_mod.parse_vm_name(body)
        assert azure_mod.is_vm_name(name) and "<" not in name and " " not in name
    with contextlib.suppress(MalformedMetadata):
        token, ttl = aws_mod.parse_token(body, None, 21600)
        assert token.isascii() and token.isprintable() and " " not in token and ttl == 21600


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("preempted", "FALSE", None),
        ("preempted", "TRUE", NoticeKind.PREEMPTION),
        ("maintenance-event", "NONE", None),
        ("maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE", NoticeKind.MIGRATION),
        ("maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE", NoticeKind.TERMINATION),
        ("maintenance-event", "SOME_FUTURE_VALUE", NoticeKind.MAINTENANCE),
    ],
)
def test_gce_values_map_to_notice_kinds(key: str, value: str, kind: NoticeKind | None) -> None:
    notice = gce_mod.notice_for(key, value, 10.0, GceWatcherConfig())
    assert (notice.kind if notice else None) is kind


def test_aws_interruption_time_already_past_means_deadline_now() -> None:
    when = aws_mod.parse_utc("2027-01-15T08:00:00Z")
    notice = aws_mod.interruption_notice("terminate", when, received_at=5.0, wall_now=W + 30)
    assert notice.deadline == 5.0


def test_aws_token_ttl_outside_imds_bounds_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"1\.\.21600"):
        AwsWatcherConfig(token_ttl_s=0)
    with pytest.raises(ValueError, match=r"1\.\.21600"):
        AwsWatcherConfig(token_ttl_s=21601)


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_warnings_are_rate_limited_on_the_injected_clock(caplog: pytest.LogCaptureFixture) -> None:
    clock = FixedClock(0.0)
    limiter = WarningLimiter(logging.getLogger("spotstart.guard.watchers.test"), clock, 60.0)
    with caplog.at_level(logging.WARNING, logger="spotstart.guard.watchers.test"):
        for t in (0.0, 1.0, 2.0, 61.0):
            clock.now = t
            limiter.warn("metadata down")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "2 similar warnings suppressed" in messages[1]


@pytest.mark.parametrize("cloud_name", ["gce", "aws", "azure"])
async def test_closing_a_watcher_stops_all_its_polling(cloud_name: str) -> None:
    makers: dict[str, Callable[[str], NoticeWatcher]] = {
        "gce": gce_watcher,
        "aws": aws_watcher,
        "azure": azure_watcher,
    }
    with MetadataEmulator(cloud_name) as emu:  # type: ignore[arg-type]
        stream = Stream(makers[cloud_name](emu.url))
        stream.start()
        await until(lambda: emu.requests()["total"] >= 2)
        await stream.close()
        current = asyncio.current_task()
        assert [t for t in asyncio.all_tasks() if t is not current] == []
