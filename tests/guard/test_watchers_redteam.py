"""Red team of the notice watchers: a metadata server that trickles its answers (a hung poll is
a missed preemption), times IMDS could write that datetime cannot hold (a leap second), Azure
names that differ only in case or by a look-alike letter. A fault never drains and never
blinds: the real notice after it still arrives, in time.

The trickling server is a real aiohttp server on 127.0.0.1 speaking just enough of IMDS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from spotstart.guard.notice import NoticeKind
from spotstart.guard.watchers import aws as aws_mod
from spotstart.guard.watchers import azure as azure_mod
from tests.guard.test_watchers import Stream, W, aws_watcher, azure_watcher, until

ACTION = {"action": "terminate", "time": "2027-01-15T08:01:00Z"}


class Trickle:
    """IMDSv2 whose instance-action answers trickle a byte every 50 ms, without end, for the
    first ``slow`` requests; then the notice, at once."""

    def __init__(self, slow: int) -> None:
        self.slow = slow
        self.served = 0
        self.trickled = 0

    async def token(self, request: web.Request) -> web.Response:
        return web.Response(text="AQAEAFakeToken==", content_type="text/plain")

    async def action(self, request: web.Request) -> web.StreamResponse:
        self.served += 1
        if self.served > self.slow:
            return web.Response(text=json.dumps(ACTION), content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        while True:  # until the client hangs up (the write raises, the handler is cancelled)
            await resp.write(b" ")
            self.trickled += 1
            await asyncio.sleep(0.05)

    async def not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404)


@pytest.fixture
async def trickle() -> AsyncIterator[tuple[Trickle, str]]:
    state = Trickle(slow=3)
    app = web.Application()
    app.router.add_put("/latest/api/token", state.token)
    app.router.add_get("/latest/meta-data/spot/instance-action", state.action)
    app.router.add_get("/{tail:.*}", state.not_found)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield state, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_trickling_metadata_server_never_hangs_the_watcher(
    trickle: tuple[Trickle, str],
) -> None:
    """Each trickled answer is cut by the request's total deadline (a per-read timeout
    never fires while bytes keep coming), counted as a fault; the notice that follows is
    reported with its deadline."""
    state, url = trickle
    watcher = aws_watcher(url)
    stream = Stream(watcher)
    stream.start()
    try:
        notice = await asyncio.wait_for(stream.next(), 30)
    finally:
        await stream.close()
    assert notice.kind is NoticeKind.PREEMPTION
    assert state.served == 4 and state.trickled > 0
    assert watcher.faults.total >= 3


def test_a_leap_second_is_a_time_not_a_fault() -> None:
    """23:59:60 is a real UTC instant: read as :59 (the deadline a second early), never a
    malformed answer that hides the notice (before: MalformedMetadata)."""
    when = aws_mod.parse_utc("2016-12-31T23:59:60Z")
    assert when.timestamp() == aws_mod.parse_utc("2016-12-31T23:59:59Z").timestamp()
    assert aws_mod.parse_utc("2016-12-31T18:29:60-05:30").second == 59
    assert azure_mod.parse_not_before("Sat, 31 Dec 2016 23:59:60 GMT") == 1483228799.0
    action, _ = aws_mod.parse_instance_action(
        json.dumps({"action": "stop", "time": "2016-12-31T23:59:60Z"}).encode()
    )
    assert action == "stop"


@pytest.mark.parametrize(
    ("ours", "resources", "acted_on"),
    [
        ("MyVM", ["myvm"], True),  # Azure names are case-insensitive
        ("myvm", ["MYVM"], True),
        ("myvmss_3", ["_MyVmss_3"], True),  # a scale-set instance, listed with a "_"
        ("myvmss_3", ["myvmss_30"], False),
        ("myvmss_3", ["myvmss"], False),
        ("myvm", ["myvm."], False),
    ],
)
def test_azure_resources_match_this_vm_by_name_only(
    ours: str, resources: list[str], acted_on: bool
) -> None:
    assert azure_mod.names_this_vm(tuple(resources), ours) is acted_on


@pytest.mark.parametrize(
    "lookalike",
    [
        "myv\u043c",  # Cyrillic em
        "MYVM\u200b",  # a zero-width space
        "myvm\u212a",  # Kelvin sign: casefolds to "k"
        "\uff4dyvm",  # fullwidth m
    ],
)
def test_azure_names_with_look_alike_letters_are_not_names(lookalike: str) -> None:
    """Neither this VM's name (compute/name) nor a Resources entry: a non-ASCII letter that
    casefolds or looks like ours never makes a neighbour's event ours."""
    assert not azure_mod.is_vm_name(lookalike)
    with pytest.raises(azure_mod.MalformedMetadata):
        azure_mod.parse_vm_name(lookalike.encode())
    event = {
        "EventId": "602D9444-D2CD-49C7-8624-8643E7171297",
        "EventType": "Preempt",
        "Resources": [lookalike],
        "EventStatus": "Scheduled",
        "NotBefore": "Fri, 15 Jan 2027 08:00:30 GMT",
    }
    with pytest.raises(azure_mod.MalformedMetadata, match="Resources"):
        azure_mod.parse_event(event)


async def test_azure_preempt_with_a_leap_second_drains() -> None:
    """The whole path on the emulator: a Preempt whose NotBefore is a leap second is a
    notice, due at :59."""
    from spotstart.emulate.metadata import MetadataEmulator

    with MetadataEmulator("azure", wall_clock=lambda: W) as emu:
        watcher = azure_watcher(emu.url)
        stream = Stream(watcher)
        stream.start()
        try:
            await until(lambda: emu.requests()["by_path"].get("/metadata/scheduledevents", 0) > 0)
            doc = {
                "DocumentIncarnation": 3,
                "Events": [
                    {
                        "EventId": "602D9444-D2CD-49C7-8624-8643E7171297",
                        "EventType": "Preempt",
                        "ResourceType": "VirtualMachine",
                        "Resources": ["vm"],
                        "EventStatus": "Scheduled",
                        "NotBefore": "Fri, 15 Jan 2027 08:00:60 GMT",
                    }
                ],
            }
            emu.fail("body", 1000, path="/metadata/scheduledevents", body=json.dumps(doc).encode())
            notice = await asyncio.wait_for(stream.next(), 30)
        finally:
            await stream.close()
    assert notice.kind is NoticeKind.PREEMPTION
    assert notice.deadline == pytest.approx(100.0 + 59)


@pytest.mark.parametrize("ttl", ["\u00b2", "\u0663", "1\u00b2", "-5", "0", "99999"])
def test_an_imdsv2_ttl_header_that_is_no_ascii_number_is_a_fault(ttl: str) -> None:
    """ "²" passes str.isdigit() and fails int(): a ValueError is no WATCH_ERROR, so each
    token fetch crashed the poller (restarted, crashed again: no poll ever ran)."""
    with pytest.raises(aws_mod.MalformedMetadata, match="TTL"):
        aws_mod.parse_token(b"AQAEAFakeToken==", ttl, 21600)


@pytest.mark.parametrize(
    ("not_before", "left_s"),
    [
        ("Fri, 31 Dec 9999 23:59:59 -1400", 900.0),  # past year 9999 in UTC
        ("Fri, 15 Jan 2027 09:00:00 GMT", 900.0),  # an hour off: our clock behind
        ("Fri, 15 Jan 2027 08:00:30 GMT", 30.0),  # a Preempt's 30 s, as written
    ],
)
def test_an_azure_deadline_is_never_further_than_azure_gives_and_marks_the_pod(
    not_before: str, left_s: float
) -> None:
    """A NotBefore in year 9999 (-14:00: year 10000 in UTC) made a deadline no datetime
    holds: marking the pod raised ValueError out of the guard's notice handler. Scheduled
    Events give 15 minutes at most: a deadline is never further."""
    from spotstart.guard.kube import DEADLINE_ANNOTATION, notice_patch

    event = azure_mod.parse_event(
        {
            "EventId": "602D9444-D2CD-49C7-8624-8643E7171297",
            "EventType": "Preempt",
            "Resources": ["vm"],
            "EventStatus": "Scheduled",
            "NotBefore": not_before,
        }
    )
    notice = azure_mod.event_notice(event, NoticeKind.PREEMPTION, 100.0, W)
    assert notice.deadline == 100.0 + left_s
    annotations = notice_patch(notice, 100.0, W)["metadata"]["annotations"]  # type: ignore[index]
    assert annotations[DEADLINE_ANNOTATION].startswith("2027-01-15T08:")


def test_marking_a_pod_with_a_deadline_past_year_9999_does_not_raise() -> None:
    from spotstart.guard.kube import notice_patch
    from spotstart.guard.notice import PreemptionNotice

    notice = PreemptionNotice(NoticeKind.PREEMPTION, "azure", 0.0, 1e300, {})
    patch = notice_patch(notice, 0.0, W)
    assert "9999-12-31" in json.dumps(patch)
