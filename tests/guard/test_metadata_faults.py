"""Metadata answers are validated before they are believed: every watcher against its metadata
emulator on 127.0.0.1 answering what a broken server, a captive portal or a misrouted proxy
answers (HTML, garbage, endless, cut, out-of-grammar bodies). A fault never drains (no notice),
is counted, and never blinds the watcher: the next valid notice still arrives.

Deadlines are checked exactly on injected (fixed) clocks; time passes for real only in polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from spotstart.emulate.metadata import HTML_BODY, MetadataEmulator
from spotstart.guard.kube import MAX_TOKEN_BYTES, PodRef, mark_pod, pod_from_env
from spotstart.guard.notice import NoticeKind, NoticeWatcher, PreemptionNotice
from spotstart.guard.watchers import AzureWatcherConfig, PollConfig
from spotstart.guard.watchers import aws as aws_mod
from spotstart.guard.watchers import azure as azure_mod
from spotstart.guard.watchers._common import (
    MAX_BODY_BYTES,
    Faults,
    MalformedMetadata,
    run_pollers,
)
from tests.guard.test_watchers import (
    AWS_ACTION,
    AWS_TOKEN,
    AZURE_EVENTS,
    GCE_PREEMPTED,
    Stream,
    W,
    aws_watcher,
    azure_document,
    azure_watcher,
    gce_watcher,
    requests_to,
    until,
)

AZURE_NAME = "/metadata/instance/compute/name"
Streams = Callable[[NoticeWatcher], Stream]


@pytest.fixture
async def streams() -> AsyncIterator[Streams]:
    opened: list[Stream] = []

    def open_stream(watcher: NoticeWatcher) -> Stream:
        stream = Stream(watcher)
        stream.start()
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        await stream.close()


# A Preempt document as IMDS writes it, for this VM ("vm") unless told otherwise.
GUID = "602D9444-D2CD-49C7-8624-8643E7171297"


def azure_event(**fields: Any) -> dict[str, Any]:
    event = {
        "EventId": GUID,
        "EventType": "Preempt",
        "ResourceType": "VirtualMachine",
        "Resources": ["vm"],
        "EventStatus": "Scheduled",
        "NotBefore": "Fri, 15 Jan 2027 08:00:30 GMT",  # W + 30
        "Description": "Spot eviction",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
    }
    event.update(fields)
    return event


def azure_doc(*events: dict[str, Any], incarnation: int = 7) -> bytes:
    return json.dumps({"DocumentIncarnation": incarnation, "Events": list(events)}).encode()


def faults_of(watcher: NoticeWatcher) -> Faults:
    faults = getattr(watcher, "faults", None)
    assert isinstance(faults, Faults)
    return faults


async def no_notice_after_faults(
    emu: MetadataEmulator, watcher: NoticeWatcher, stream: Stream, count: int
) -> None:
    """The faults were served and counted by the watcher, and none became a notice."""
    await until(lambda: emu.requests()["faults_served"] >= count)
    await until(lambda: faults_of(watcher).total >= count)
    assert not stream.has_notice()
    assert faults_of(watcher).crashes == 0  # a fault, not a crash


# -- Azure: this VM's name -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "body", "content_type"),
    [
        ("html", b"", None),  # a captive portal: 200 text/html, one printable line
        ("body", HTML_BODY, "text/plain"),  # the same page mislabelled as text
        ("body", b"Sign in to continue", "text/plain"),  # a sentence, not a name
        ("body", b"vm", "text/html"),  # a name, but not with IMDS's content type
        ("body", b"-vm", "text/plain"),
        ("body", b"vm." + b"x" * 100, "text/plain"),  # longer than a VM name
        ("huge", b"", None),
    ],
)
async def test_azure_name_answered_once_as_a_fault_then_correctly_the_preempt_is_acted_on(
    azure: MetadataEmulator,
    streams: Streams,
    mode: Any,
    body: bytes,
    content_type: str | None,
) -> None:
    # Before: a one-line HTML 200 became this VM's name, and every Preempt naming "vm" was
    # dismissed as another VM's.
    azure.fail(mode, 1, path=AZURE_NAME, body=body, content_type=content_type)
    watcher = azure_watcher(azure.url)
    stream = streams(watcher)
    await no_notice_after_faults(azure, watcher, stream, 1)
    azure.preempt()
    notice = await stream.next()
    assert notice.kind is NoticeKind.PREEMPTION
    assert (notice.received_at, notice.deadline) == (100.0, 130.0)
    assert watcher.vm_name == "vm"
    assert faults_of(watcher).by_endpoint[AZURE_NAME] == 1


async def test_azure_preempt_while_the_name_is_unknown_waits_and_is_judged_once_it_is_known(
    azure: MetadataEmulator, streams: Streams, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spotstart.guard.watchers")
    azure.fail("html", 10**6, path=AZURE_NAME)  # IMDS's name answers are a portal's, for now
    watcher = azure_watcher(azure.url)
    stream = streams(watcher)
    azure.preempt(resources=["other-vm-7"])
    azure.preempt()  # this VM's
    await until(lambda: len(watcher.unattributed) == 2)
    seen = azure.requests()["by_path"][AZURE_EVENTS]
    await until(requests_to(azure, AZURE_EVENTS, seen + 5))
    assert not stream.has_notice()  # neither drained nor dismissed
    assert watcher.vm_name is None
    assert caplog.text.count("while this VM's name is unknown") == 2  # once per event
    azure.fail("html", 0)  # IMDS answers the name again
    notice = await stream.next()
    assert notice.kind is NoticeKind.PREEMPTION
    assert (notice.received_at, notice.deadline) == (100.0, 130.0)  # still from NotBefore
    events = {e["EventId"]: e["Resources"] for e in azure_document(azure)["Events"]}
    assert events[notice.detail["event_id"]] == ["vm"]
    seen = azure.requests()["by_path"][AZURE_EVENTS]
    await until(requests_to(azure, AZURE_EVENTS, seen + 3))
    assert not stream.has_notice()  # the neighbour's eviction is not ours
    assert watcher.unattributed == set()


def test_azure_vm_name_grammar() -> None:
    ok = ["vm", "web-1", "my.vm_2", "A" * 64, "myvmss_3", "myvmss_1a2b3c4d", "x"]
    bad = ["", "-vm", "vm-", "vm.", "_vm", "my vm", "vm\n\n", "<html>", "vm/1", "A" * 65, "é"]
    for name in ok:
        assert azure_mod.parse_vm_name(name.encode()) == name
    assert azure_mod.parse_vm_name(b"vm\n") == "vm"  # one newline is framing
    for name in bad:
        with pytest.raises(MalformedMetadata):
            azure_mod.parse_vm_name(name.encode())


def test_azure_vm_name_given_by_the_user_is_checked_too() -> None:
    from spotstart.errors import UsageError

    with pytest.raises(UsageError, match="not an Azure VM resource name"):
        AzureWatcherConfig(resource_name="<html>")
    assert AzureWatcherConfig(resource_name="myvmss_3").resource_name == "myvmss_3"


# -- Azure: scheduled events ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resources", "acted_on"),
    [(["other-vm-7"], False), (["other-vm-7", "vm"], True), ([], False), (["_VM"], True)],
)
async def test_azure_preempt_is_acted_on_only_when_resources_name_this_vm(
    azure: MetadataEmulator, streams: Streams, resources: list[str], acted_on: bool
) -> None:
    watcher = azure_watcher(azure.url)
    stream = streams(watcher)
    azure.fail("body", 1, path=AZURE_EVENTS, body=azure_doc(azure_event(Resources=resources)))
    await until(lambda: azure.requests()["faults_served"] == 1)
    seen = azure.requests()["by_path"][AZURE_EVENTS]
    await until(requests_to(azure, AZURE_EVENTS, seen + 2))
    assert stream.has_notice() is acted_on
    assert faults_of(watcher).total == 0  # a valid document, read as such


BAD_EVENTS = [
    pytest.param({"NotBefore": "tomorrow"}, id="not-before-not-a-date"),
    pytest.param({"NotBefore": "Fri, 15 Jan 2027 08:00:30"}, id="not-before-without-zone"),
    pytest.param({"NotBefore": 1800000030}, id="not-before-a-number"),
    pytest.param({"EventId": "<html>"}, id="event-id-not-a-guid"),
    pytest.param({"EventStatus": "Soon"}, id="status-outside-enum"),
    pytest.param({"EventType": "Pre empt"}, id="type-not-a-word"),
    pytest.param({"Resources": "vm"}, id="resources-a-string"),
    pytest.param({"Resources": ["vm", "<b>x</b>"]}, id="resources-markup"),
]


@pytest.mark.parametrize("bad", BAD_EVENTS)
async def test_azure_malformed_event_is_a_fault_and_the_later_valid_one_drains(
    azure: MetadataEmulator, streams: Streams, bad: dict[str, Any]
) -> None:
    watcher = azure_watcher(azure.url)
    stream = streams(watcher)
    await until(requests_to(azure, AZURE_EVENTS, 1))
    azure.fail("body", 2, path=AZURE_EVENTS, body=azure_doc(azure_event(**bad)))
    await no_notice_after_faults(azure, watcher, stream, 2)
    assert faults_of(watcher).by_endpoint["event"] >= 2
    azure.preempt()
    assert (await stream.next()).kind is NoticeKind.PREEMPTION


async def test_azure_a_malformed_event_does_not_hide_a_valid_preempt_beside_it(
    azure: MetadataEmulator, streams: Streams
) -> None:
    watcher = azure_watcher(azure.url)
    stream = streams(watcher)
    other = "00000000-0000-0000-0000-00000000000A"
    doc = azure_doc(azure_event(EventId=other, NotBefore="soon"), azure_event())
    azure.fail("body", 3, path=AZURE_EVENTS, body=doc)
    notice = await stream.next()
    assert notice.detail["event_id"] == GUID
    await until(lambda: azure.requests()["faults_served"] == 3)
    # the document was read again (the bad event may become readable), the good one not resent
    await until(lambda: faults_of(watcher).by_endpoint["event"] >= 2)
    assert not stream.has_notice()


async def test_azure_unknown_event_type_is_not_acted_on_nor_a_fault(
    azure: MetadataEmulator, streams: Streams
) -> None:
    watcher = azure_watcher(azure.url)
    stream = streams(watcher)
    azure.fail("body", 2, path=AZURE_EVENTS, body=azure_doc(azure_event(EventType="Hover")))
    await until(lambda: azure.requests()["faults_served"] == 2)
    assert not stream.has_notice() and faults_of(watcher).total == 0
    azure.preempt()
    assert (await stream.next()).kind is NoticeKind.PREEMPTION


# -- every cloud's notice endpoint ---------------------------------------------------------------

NESTED_JSON = b'{"a":' * 10_000 + b"1" + b"}" * 10_000  # 60 KB: deeper than json's recursion


def _notice_path(cloud: str) -> str:
    return {"gce": GCE_PREEMPTED, "aws": AWS_ACTION, "azure": AZURE_EVENTS}[cloud]


def _watcher(cloud: str, emu: MetadataEmulator) -> NoticeWatcher:
    makers: dict[str, Callable[[str], NoticeWatcher]] = {
        "gce": gce_watcher,
        "aws": aws_watcher,
        "azure": azure_watcher,
    }
    return makers[cloud](emu.url)


FAULTS = [
    pytest.param("html", b"", id="html"),
    pytest.param("garbage", b"", id="garbage"),
    pytest.param("huge", b"", id="huge"),
    pytest.param("truncated", b"", id="truncated"),
    pytest.param("body", b"", id="empty"),
    pytest.param("body", NESTED_JSON, id="nested-json"),
    pytest.param("body", json.dumps({"action": "terminate"}).encode("utf-16"), id="utf16"),
]


@pytest.mark.parametrize("cloud_name", ["gce", "aws", "azure"])
@pytest.mark.parametrize(("mode", "body"), FAULTS)
async def test_a_malformed_notice_answer_is_a_counted_fault_and_a_later_notice_drains(
    streams: Streams, cloud_name: str, mode: Any, body: bytes
) -> None:
    with MetadataEmulator(cloud_name, wall_clock=lambda: W) as emu:  # type: ignore[arg-type]
        watcher = _watcher(cloud_name, emu)
        stream = streams(watcher)
        path = _notice_path(cloud_name)
        await until(requests_to(emu, path, 1))  # the token PUT is not what is faulted
        emu.fail(mode, 2, path=path, body=body)
        await no_notice_after_faults(emu, watcher, stream, 2)
        # an endless answer was cut at the bound: the client took a few socket buffers of it
        assert emu.requests()["fault_bytes_sent"] < 16 * 1024 * 1024
        emu.preempt()
        assert (await stream.next()).kind is NoticeKind.PREEMPTION


# -- GCE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "preempted"),
    [
        (b"TRUE", True),
        (b"TRUE\n", True),  # one newline: line framing
        (b"TRUEX", False),
        (b" TRUE", False),
        (b"TRUE \n", False),
        (b"TRUE\n\n", False),
        (b"true", False),
        (b"TRUE\x00", False),
    ],
)
async def test_gce_preempted_is_exactly_true_or_false(
    gce: MetadataEmulator, streams: Streams, body: bytes, preempted: bool
) -> None:
    watcher = gce_watcher(gce.url)
    stream = streams(watcher)
    await until(requests_to(gce, GCE_PREEMPTED, 1))
    gce.fail("body", 1, path=GCE_PREEMPTED, body=body)
    await until(lambda: gce.requests()["faults_served"] == 1)
    if preempted:
        assert (await stream.next()).kind is NoticeKind.PREEMPTION
        return
    await until(lambda: faults_of(watcher).total >= 1)
    assert not stream.has_notice()
    gce.preempt()
    assert (await stream.next()).kind is NoticeKind.PREEMPTION


async def test_gce_answer_with_a_non_text_content_type_is_a_fault(
    gce: MetadataEmulator, streams: Streams
) -> None:
    watcher = gce_watcher(gce.url)
    stream = streams(watcher)
    gce.fail("body", 2, path=GCE_PREEMPTED, body=b"TRUE", content_type="text/html")
    await no_notice_after_faults(gce, watcher, stream, 2)


def test_gce_etag_that_is_not_one_is_not_sent_back() -> None:
    from spotstart.guard.watchers.gce import checked_etag

    assert checked_etag("a1b2c3d4e5f60718") == "a1b2c3d4e5f60718"
    assert checked_etag(None) is None
    assert checked_etag("x" * 200) is None and checked_etag("a b&c=d") is None


# -- AWS ----------------------------------------------------------------------------------------

GOOD_TIME = "2027-01-15T08:02:00Z"


@pytest.mark.parametrize(
    "document",
    [
        {"action": "reboot", "time": GOOD_TIME},
        {"action": "TERMINATE", "time": GOOD_TIME},
        {"action": ["terminate"], "time": GOOD_TIME},
        {"action": "terminate"},
        {"action": "terminate", "time": "2027-01-15"},
        {"action": "terminate", "time": "2027-01-15T08:02:00"},  # no zone
        {"action": "terminate", "time": "20270115T080200Z"},  # ISO 8601 basic, not RFC 3339
        {"action": "terminate", "time": "2027-02-30T08:02:00Z"},  # no such day
        {"action": "terminate", "time": 1800000120},
        ["terminate", GOOD_TIME],
    ],
)
async def test_aws_instance_action_with_a_bad_action_or_time_is_a_fault(
    aws: MetadataEmulator, streams: Streams, document: object
) -> None:
    watcher = aws_watcher(aws.url)
    stream = streams(watcher)
    await until(requests_to(aws, AWS_ACTION, 1))
    aws.fail("body", 2, path=AWS_ACTION, body=json.dumps(document).encode())
    await no_notice_after_faults(aws, watcher, stream, 2)
    aws.preempt()
    assert (await stream.next()).kind is NoticeKind.PREEMPTION


async def test_aws_interruption_far_in_the_future_is_still_due_within_two_minutes(
    aws: MetadataEmulator, streams: Streams
) -> None:
    stream = streams(aws_watcher(aws.url))
    body = json.dumps({"action": "terminate", "time": "2030-01-01T00:00:00Z"}).encode()
    aws.fail("body", 1, path=AWS_ACTION, body=body)
    notice = await stream.next()
    assert (notice.received_at, notice.deadline) == (500.0, 620.0)


@pytest.mark.parametrize(
    ("mode", "body"),
    [("html", b""), ("body", b"tok en"), ("body", b"x" * 2000), ("huge", b"")],
)
async def test_aws_token_that_is_not_a_token_is_a_fault(
    aws: MetadataEmulator, streams: Streams, mode: Any, body: bytes
) -> None:
    aws.fail(mode, 2, path=AWS_TOKEN, body=body)
    watcher = aws_watcher(aws.url)
    stream = streams(watcher)
    await no_notice_after_faults(aws, watcher, stream, 2)
    aws.preempt()
    assert (await stream.next()).kind is NoticeKind.PREEMPTION


def test_aws_token_ttl_stated_by_the_answer_is_bounded_by_what_was_asked() -> None:
    assert aws_mod.parse_token(b"AQAEAtoken==", "60", 21600) == ("AQAEAtoken==", 60)
    assert aws_mod.parse_token(b"AQAEAtoken==\n", None, 300) == ("AQAEAtoken==", 300)
    for ttl in ("0", "21601", "-1", "1e3", "60 "):
        with pytest.raises(MalformedMetadata):
            aws_mod.parse_token(b"AQAEAtoken==", ttl, 21600)
    for token in (b"", b"a b", b"<html>", b"\xff", b"x" * 1025):
        with pytest.raises(MalformedMetadata):
            aws_mod.parse_token(token, None, 21600)


async def test_aws_rebalance_with_a_bad_notice_time_is_a_fault(
    aws: MetadataEmulator, streams: Streams
) -> None:
    watcher = aws_watcher(aws.url)
    stream = streams(watcher)
    path = "/latest/meta-data/events/recommendations/rebalance"
    await until(requests_to(aws, path, 1))
    aws.fail("body", 2, path=path, body=b'{"noticeTime": "now"}')
    await no_notice_after_faults(aws, watcher, stream, 2)
    aws.preempt(kind="rebalance")
    assert (await stream.next()).kind is NoticeKind.REBALANCE


# -- bounds and supervision ----------------------------------------------------------------------


async def test_a_body_over_the_bound_is_refused_whether_declared_or_streamed(
    azure: MetadataEmulator, streams: Streams
) -> None:
    # a valid document padded past 64 KiB is still a fault: the bound is not about the grammar
    padded = azure_doc(azure_event(Description="x" * MAX_BODY_BYTES))
    watcher = azure_watcher(azure.url)
    stream = streams(watcher)
    await until(requests_to(azure, AZURE_EVENTS, 1))
    azure.fail("body", 2, path=AZURE_EVENTS, body=padded)  # with a Content-Length
    await no_notice_after_faults(azure, watcher, stream, 2)
    azure.fail("huge", 2, path=AZURE_EVENTS)  # chunked, no length: only reading tells
    await no_notice_after_faults(azure, watcher, stream, 4)
    assert azure.requests()["fault_bytes_sent"] < 16 * 1024 * 1024


async def test_a_crashing_poller_is_logged_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="spotstart.guard.watchers")
    calls = 0
    faults = Faults()

    async def flaky(emit: Callable[[PreemptionNotice], None]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("a bug in the poller")
        emit(PreemptionNotice(NoticeKind.PREEMPTION, "test", 1.0, 2.0))
        await asyncio.Event().wait()

    poll = PollConfig(backoff_initial_s=0.01, backoff_max_s=0.02)
    notices = run_pollers([flaky], what="test poller", poll=poll, faults=faults)
    try:
        notice = await asyncio.wait_for(anext(notices), 10.0)
    finally:
        await notices.aclose()
    assert notice.source == "test" and calls == 2 and faults.crashes == 1
    assert "test poller crashed (a bug)" in caplog.text and "a bug in the poller" in caplog.text


def test_parsers_refuse_what_json_would_take_but_imds_never_sends() -> None:
    utf16 = json.dumps({"action": "terminate", "time": GOOD_TIME}).encode("utf-16")
    nan = b'{"DocumentIncarnation": NaN, "Events": []}'
    for parse, body in [
        (aws_mod.parse_instance_action, utf16),
        (aws_mod.parse_instance_action, NESTED_JSON),
        (azure_mod.parse_scheduled_events, nan),
        (azure_mod.parse_scheduled_events, NESTED_JSON),
        (azure_mod.parse_scheduled_events, b'{"DocumentIncarnation": -1, "Events": []}'),
    ]:
        with pytest.raises(MalformedMetadata):
            parse(body)


# -- Kubernetes: marking this pod ----------------------------------------------------------------


def _sa_dir(
    tmp_path: Path, token: bytes = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwb2QifQ.c2ln\n"
) -> Path:
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "token").write_bytes(token)
    return folder


@pytest.mark.parametrize(
    ("name", "namespace"),
    [
        ("../../nodes/n1", "serving"),
        ("p", "a/b"),
        ("p?dryRun=All", "serving"),
        ("Pod-1", "serving"),
        ("p", "x" * 64),
        ("p" * 254, "serving"),
    ],
)
def test_a_pod_name_or_namespace_that_is_not_a_kubernetes_name_is_not_patched(
    tmp_path: Path, name: str, namespace: str
) -> None:
    env = {"POD_NAME": name, "POD_NAMESPACE": namespace, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert pod_from_env(env, _sa_dir(tmp_path)) is None


def test_a_pod_with_kubernetes_names_is_found(tmp_path: Path) -> None:
    env = {
        "POD_NAME": "llama-8b-7d9f.x",
        "POD_NAMESPACE": "serving",
        "KUBERNETES_SERVICE_HOST": "h",
    }
    pod = pod_from_env(env, _sa_dir(tmp_path))
    assert pod is not None and pod.url.endswith("/namespaces/serving/pods/llama-8b-7d9f.x")


@contextlib.asynccontextmanager
async def kube_api(answer_bytes: int) -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A real HTTP server on 127.0.0.1 answering every PATCH 500 with ``answer_bytes`` of body,
    streamed; counts requests and the body bytes the client took."""
    seen = {"requests": 0, "sent": 0}

    async def patch(request: web.Request) -> web.StreamResponse:
        seen["requests"] += 1
        resp = web.StreamResponse(status=500)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"E" * 65536
        with contextlib.suppress(ConnectionError, RuntimeError):
            while seen["sent"] < answer_bytes:
                await resp.write(chunk)
                seen["sent"] += len(chunk)
        return resp

    app = web.Application()
    app.router.add_patch("/{tail:.*}", patch)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_marking_reads_a_bounded_answer_and_refuses_an_oversized_token(
    tmp_path: Path,
) -> None:
    patch: dict[str, object] = {"metadata": {"annotations": {"a": "b"}}}
    async with kube_api(answer_bytes=256 * 1024 * 1024) as (url, seen):
        sa = _sa_dir(tmp_path)
        pod = PodRef(url, "serving", "p", sa / "token", None)
        assert not await mark_pod(pod, patch, timeout_s=10.0, attempts=1)
        assert seen["requests"] == 1 and seen["sent"] < 16 * 1024 * 1024  # not 256 MiB
        (sa / "token").write_bytes(b"x" * (MAX_TOKEN_BYTES + 1))
        assert not await mark_pod(pod, patch, timeout_s=10.0, attempts=1)
        (sa / "token").write_bytes(b"a\r\nX-Injected: 1")
        assert not await mark_pod(pod, patch, timeout_s=10.0, attempts=1)
        assert seen["requests"] == 1  # neither bad token was sent
