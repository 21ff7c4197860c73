"""The metadata emulators speak each cloud's documented protocol, and their admin API works."""

from __future__ import annotations

import http.client as http_client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime

import pytest

from spotstart.emulate.metadata import MetadataEmulator
from tests.guard.conftest import W

GCE_PREEMPTED = "/computeMetadata/v1/instance/preempted"
GCE_MAINTENANCE = "/computeMetadata/v1/instance/maintenance-event"
AWS_ACTION = "/latest/meta-data/spot/instance-action"
AWS_REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
AZURE_EVENTS = "/metadata/scheduledevents?api-version=2020-07-01"


def http(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: object | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def poll_until(check: object, timeout_s: float = 5.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.02)


GOOGLE = {"Metadata-Flavor": "Google"}


# -- GCE ----------------------------------------------------------------------------------------


def test_gce_without_metadata_flavor_header_is_forbidden(gce: MetadataEmulator) -> None:
    status, _, _ = http("GET", gce.url + GCE_PREEMPTED)
    assert status == 403
    status, _, _ = http("GET", gce.url + GCE_PREEMPTED, {"Metadata-Flavor": "Other"})
    assert status == 403


def test_gce_rejects_requests_with_x_forwarded_for(gce: MetadataEmulator) -> None:
    status, _, _ = http("GET", gce.url + GCE_PREEMPTED, {**GOOGLE, "X-Forwarded-For": "1.2.3.4"})
    assert status == 403


def test_gce_answers_false_none_with_flavor_and_etag(gce: MetadataEmulator) -> None:
    status, headers, body = http("GET", gce.url + GCE_PREEMPTED, GOOGLE)
    assert (status, body, headers["Metadata-Flavor"]) == (200, b"FALSE", "Google")
    assert headers["ETag"]
    _, _, body = http("GET", gce.url + GCE_MAINTENANCE, GOOGLE)
    assert body == b"NONE"
    status, _, _ = http("GET", gce.url + "/computeMetadata/v1/instance/nothing", GOOGLE)
    assert status == 404


def test_gce_etag_is_stable_until_the_value_changes(gce: MetadataEmulator) -> None:
    etags = {http("GET", gce.url + GCE_PREEMPTED, GOOGLE)[1]["ETag"] for _ in range(3)}
    assert len(etags) == 1
    gce.preempt()
    _, headers, body = http("GET", gce.url + GCE_PREEMPTED, GOOGLE)
    assert body == b"TRUE" and headers["ETag"] not in etags


def test_gce_wait_for_change_returns_when_the_preemption_fires(gce: MetadataEmulator) -> None:
    _, headers, _ = http("GET", gce.url + GCE_PREEMPTED, GOOGLE)
    gce.preempt(in_s=0.3)
    query = f"?wait_for_change=true&last_etag={headers['ETag']}&timeout_sec=30"
    # a 10 s client timeout: only a change (not the 30 s server timeout) can answer in time
    status, changed, body = http("GET", gce.url + GCE_PREEMPTED + query, GOOGLE, timeout_s=10)
    assert (status, body) == (200, b"TRUE") and changed["ETag"] != headers["ETag"]


def test_gce_wait_for_change_with_stale_etag_returns_at_once(gce: MetadataEmulator) -> None:
    query = "?wait_for_change=true&last_etag=0000&timeout_sec=60"
    status, _, body = http("GET", gce.url + GCE_PREEMPTED + query, GOOGLE, timeout_s=5)
    assert (status, body) == (200, b"FALSE")


def test_gce_wait_for_change_answers_unchanged_value_at_timeout(gce: MetadataEmulator) -> None:
    _, headers, _ = http("GET", gce.url + GCE_MAINTENANCE, GOOGLE)
    query = f"?wait_for_change=true&last_etag={headers['ETag']}&timeout_sec=1"
    status, again, body = http("GET", gce.url + GCE_MAINTENANCE + query, GOOGLE, timeout_s=10)
    assert (status, body, again["ETag"]) == (200, b"NONE", headers["ETag"])


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("maintenance", b"MIGRATE_ON_HOST_MAINTENANCE"),
        ("termination", b"TERMINATE_ON_HOST_MAINTENANCE"),
    ],
)
def test_gce_maintenance_event_takes_documented_values(
    gce: MetadataEmulator, kind: str, value: bytes
) -> None:
    gce.preempt(kind=kind)
    assert http("GET", gce.url + GCE_MAINTENANCE, GOOGLE)[2] == value
    assert http("GET", gce.url + GCE_PREEMPTED, GOOGLE)[2] == b"FALSE"


# -- AWS ----------------------------------------------------------------------------------------


def aws_token(emu: MetadataEmulator, ttl: str = "60") -> str:
    status, headers, body = http(
        "PUT", emu.url + "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
    )
    assert status == 200 and headers["X-aws-ec2-metadata-token-ttl-seconds"] == ttl
    return body.decode()


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-1", "abc"])
def test_aws_token_ttl_outside_1_to_21600_is_rejected(
    aws: MetadataEmulator, ttl: str | None
) -> None:
    headers = {} if ttl is None else {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
    assert http("PUT", aws.url + "/latest/api/token", headers)[0] == 400


def test_aws_token_ttl_bounds_are_accepted(aws: MetadataEmulator) -> None:
    assert aws_token(aws, "1") and aws_token(aws, "21600")


def test_aws_token_put_with_x_forwarded_for_is_forbidden(aws: MetadataEmulator) -> None:
    headers = {"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "1.2.3.4"}
    assert http("PUT", aws.url + "/latest/api/token", headers)[0] == 403


def test_aws_get_needs_a_valid_token(aws: MetadataEmulator) -> None:
    assert http("GET", aws.url + AWS_ACTION)[0] == 401
    assert http("GET", aws.url + AWS_ACTION, {"X-aws-ec2-metadata-token": "forged"})[0] == 401
    token = aws_token(aws)
    assert http("GET", aws.url + AWS_ACTION, {"X-aws-ec2-metadata-token": token})[0] == 404


def test_aws_token_expires_after_its_ttl(aws: MetadataEmulator) -> None:
    token = {"X-aws-ec2-metadata-token": aws_token(aws, "1")}
    assert http("GET", aws.url + AWS_ACTION, token)[0] == 404
    poll_until(lambda: http("GET", aws.url + AWS_ACTION, token)[0] == 401)


def test_aws_instance_action_is_404_then_json_two_minutes_ahead(aws: MetadataEmulator) -> None:
    token = {"X-aws-ec2-metadata-token": aws_token(aws)}
    assert http("GET", aws.url + AWS_ACTION, token)[0] == 404
    aws.preempt()
    status, _, body = http("GET", aws.url + AWS_ACTION, token)
    expected = datetime.fromtimestamp(W + 120, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert status == 200 and json.loads(body) == {"action": "terminate", "time": expected}


def test_aws_rebalance_is_404_then_notice_time(aws: MetadataEmulator) -> None:
    token = {"X-aws-ec2-metadata-token": aws_token(aws)}
    assert http("GET", aws.url + AWS_REBALANCE, token)[0] == 404
    aws.preempt(kind="rebalance")
    status, _, body = http("GET", aws.url + AWS_REBALANCE, token)
    assert status == 200 and json.loads(body) == {"noticeTime": "2027-01-15T08:00:00Z"}
    assert http("GET", aws.url + AWS_ACTION, token)[0] == 404


# -- Azure --------------------------------------------------------------------------------------


def test_azure_needs_metadata_header_and_api_version(azure: MetadataEmulator) -> None:
    assert http("GET", azure.url + AZURE_EVENTS)[0] == 400
    assert http("GET", azure.url + "/metadata/scheduledevents", {"Metadata": "true"})[0] == 400
    status, _, body = http("GET", azure.url + AZURE_EVENTS, {"Metadata": "true"})
    assert status == 200 and json.loads(body) == {"DocumentIncarnation": 1, "Events": []}


def test_azure_preempt_event_has_documented_fields_and_bumps_incarnation(
    azure: MetadataEmulator,
) -> None:
    azure.preempt()
    doc = json.loads(http("GET", azure.url + AZURE_EVENTS, {"Metadata": "true"})[2])
    assert doc["DocumentIncarnation"] == 2
    (event,) = doc["Events"]
    assert event["EventType"] == "Preempt" and event["EventStatus"] == "Scheduled"
    assert event["ResourceType"] == "VirtualMachine" and event["EventSource"] == "Platform"
    assert event["DurationInSeconds"] == -1 and event["Resources"] == ["vm"]
    assert event["NotBefore"] == "Fri, 15 Jan 2027 08:00:30 GMT"  # 30 s after the notice


def test_azure_start_request_starts_the_event(azure: MetadataEmulator) -> None:
    azure.preempt()
    doc = json.loads(http("GET", azure.url + AZURE_EVENTS, {"Metadata": "true"})[2])
    event_id = doc["Events"][0]["EventId"]
    ack = {"StartRequests": [{"EventId": event_id}]}
    assert http("POST", azure.url + AZURE_EVENTS, {"Metadata": "true"}, ack)[0] == 200
    after = json.loads(http("GET", azure.url + AZURE_EVENTS, {"Metadata": "true"})[2])
    assert after["DocumentIncarnation"] == doc["DocumentIncarnation"] + 1
    assert after["Events"][0]["EventStatus"] == "Started"
    assert http("POST", azure.url + AZURE_EVENTS, {}, ack)[0] == 400  # Metadata header needed


# -- admin ----------------------------------------------------------------------------------------


def test_admin_faults_fire_count_times_then_the_protocol_answers(gce: MetadataEmulator) -> None:
    status, _, _ = http("POST", gce.url + "/__admin/fail", body={"mode": "500", "count": 1})
    assert status == 200
    assert http("GET", gce.url + GCE_PREEMPTED, GOOGLE)[0] == 500
    gce.fail("garbage", 1)
    status, _, body = http("GET", gce.url + GCE_PREEMPTED, GOOGLE)
    assert status == 200 and body not in (b"TRUE", b"FALSE")
    gce.fail("hang", 1)
    with pytest.raises(TimeoutError):
        http("GET", gce.url + GCE_PREEMPTED, GOOGLE, timeout_s=0.5)
    assert http("GET", gce.url + GCE_PREEMPTED, GOOGLE)[2] == b"FALSE"
    assert gce.requests()["faults_served"] == 3


def test_admin_preempt_schedules_reset_cancels_and_requests_counts(gce: MetadataEmulator) -> None:
    body = {"in_s": 0, "kind": "preemption"}
    assert http("POST", gce.url + "/__admin/preempt", body=body)[0] == 200
    assert http("GET", gce.url + GCE_PREEMPTED, GOOGLE)[2] == b"TRUE"
    assert http("POST", gce.url + "/__admin/reset", body={})[0] == 200
    assert http("GET", gce.url + GCE_PREEMPTED, GOOGLE)[2] == b"FALSE"
    counts = json.loads(http("GET", gce.url + "/__admin/requests")[2])
    assert counts["total"] == 1 and counts["by_path"] == {GCE_PREEMPTED: 1}
    bad = {"in_s": 0, "kind": "rebalance"}  # GCE has no rebalance recommendation
    assert http("POST", gce.url + "/__admin/preempt", body=bad)[0] == 400


def test_cli_main_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "spotstart.emulate.metadata", "--cloud", "azure", "--json"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            info = json.loads(proc.stdout.readline())
            assert info["cloud"] == "azure" and info["url"].startswith("http://127.0.0.1:")
            assert http("GET", info["url"] + AZURE_EVENTS, {"Metadata": "true"})[0] == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_admin_fault_limited_to_a_path_leaves_the_other_paths_answering(
    azure: MetadataEmulator,
) -> None:
    name = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
    body = {"mode": "html", "count": 2, "path": "/metadata/instance/compute/name"}
    assert http("POST", azure.url + "/__admin/fail", body=body)[0] == 200
    status, headers, events = http("GET", azure.url + AZURE_EVENTS, {"Metadata": "true"})
    assert status == 200 and "DocumentIncarnation" in json.loads(events)
    status, headers, page = http("GET", azure.url + name, {"Metadata": "true"})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert page.startswith(b"<html>") and b"\n" not in page  # one printable line
    http("GET", azure.url + name, {"Metadata": "true"})
    assert http("GET", azure.url + name, {"Metadata": "true"})[2] == b"vm"
    assert azure.requests()["faults_served"] == 2


def test_admin_body_fault_answers_the_given_bytes_with_the_genuine_content_type(
    gce: MetadataEmulator,
) -> None:
    gce.fail("body", 1, path=GCE_PREEMPTED, body=b"TRUEX")
    status, headers, body = http("GET", gce.url + GCE_PREEMPTED, GOOGLE)
    assert (status, body) == (200, b"TRUEX")
    assert headers["Content-Type"] == "application/text"
    assert headers["Metadata-Flavor"] == "Google"  # a broken server, still GCE's
    body_fault = {"mode": "body", "body": "nope", "status": 418, "content_type": "text/x-y"}
    assert http("POST", gce.url + "/__admin/fail", body=body_fault)[0] == 200
    status, headers, body = http("GET", gce.url + GCE_MAINTENANCE, GOOGLE)
    assert (status, body, headers["Content-Type"]) == (418, b"nope", "text/x-y")


def test_admin_huge_fault_streams_until_the_client_stops_reading(aws: MetadataEmulator) -> None:
    aws.fail("huge", 1, path=AWS_ACTION)
    request = urllib.request.Request(aws.url + AWS_ACTION)
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.headers.get("Content-Length") is None  # chunked: no length to refuse on
        assert len(resp.read(1024 * 1024)) == 1024 * 1024
    poll_until(lambda: aws.requests()["fault_bytes_sent"] >= 1024 * 1024)


def test_admin_truncated_fault_closes_before_the_declared_length(
    azure: MetadataEmulator,
) -> None:
    azure.fail("truncated", 1)
    request = urllib.request.Request(azure.url + AZURE_EVENTS, headers={"Metadata": "true"})
    with (
        pytest.raises(http_client.IncompleteRead),
        urllib.request.urlopen(request, timeout=5) as resp,
    ):
        resp.read()


@pytest.mark.parametrize(
    "body",
    [{"mode": "loud"}, {"mode": "html", "count": -1}, {"mode": "body", "status": 99}],
)
def test_admin_fail_refuses_what_it_cannot_arm(gce: MetadataEmulator, body: object) -> None:
    assert http("POST", gce.url + "/__admin/fail", body=body)[0] == 400
    with pytest.raises(ValueError):
        gce.fail("loud", 1)  # type: ignore[arg-type]
