"""Pure core of the link emulator: token buckets with fake time, fault rules, HTTP heads."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotstart.emulate.link import (
    FaultPlan,
    FaultRule,
    HeadError,
    LinkConfig,
    LinkStats,
    TokenBucket,
    could_be_request,
    fault_response,
    parse_request_head,
    parse_response_head,
    rules_from_json,
    rules_to_json,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_paces_sends_to_the_rate_after_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1_000_000, clock, burst_bytes=100_000)
    assert bucket.reserve(100_000) == 0.0  # the burst is free
    # the next 500 kB must wait 0.5 s at 1 MB/s
    assert bucket.reserve(500_000) == pytest.approx(0.5)


def test_token_bucket_long_run_rate_matches_the_cap() -> None:
    clock = FakeClock()
    rate = 50e6
    bucket = TokenBucket(rate, clock, burst_bytes=256 * 1024)
    sent = 0
    start = clock.now
    for _ in range(2000):  # a sender that sleeps exactly what it is told
        clock.now += bucket.reserve(256 * 1024)
        sent += 256 * 1024
    elapsed = clock.now - start
    assert sent / elapsed == pytest.approx(rate, rel=0.01)


def test_token_bucket_refills_while_idle_but_never_beyond_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock, burst_bytes=100)
    bucket.reserve(100)
    clock.now += 3600  # an hour idle earns only the burst
    assert bucket.reserve(100) == 0.0
    assert bucket.reserve(100) == pytest.approx(0.1)


def test_token_bucket_rate_change_applies_to_later_sends() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock, burst_bytes=0)
    bucket.set_rate(2000)
    assert bucket.reserve(1000) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bucket.set_rate(0)


def test_link_config_validates_and_round_trips() -> None:
    config = LinkConfig(per_conn_bytes_per_s=None, aggregate_bytes_per_s=1e9)
    assert LinkConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError):
        LinkConfig(per_conn_bytes_per_s=0)
    with pytest.raises(ValueError):
        LinkConfig.from_dict({"bogus": 1})


def request(method: str = "GET", target: str = "/b/o", **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: x"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines).encode()


def test_fault_rule_matches_method_path_and_range() -> None:
    rule = FaultRule(kind="reset", method="get", path_regex=r"^/models/", ranged_only=True)
    assert rule.matches(parse_request_head(request(target="/models/a", Range="bytes=0-9")))
    assert not rule.matches(parse_request_head(request(target="/models/a")))
    assert not rule.matches(parse_request_head(request("PUT", "/models/a", Range="bytes=0-1")))
    assert not rule.matches(parse_request_head(request(target="/other/a", Range="bytes=0-1")))


def test_fault_plan_fires_count_times_then_is_spent() -> None:
    plan = FaultPlan([FaultRule(kind="status", count=2), FaultRule(kind="corrupt", count=1)])
    head = parse_request_head(request())
    fired = [plan.take(head) for _ in range(4)]
    assert [rule.kind if rule else None for rule in fired] == [
        "status",
        "status",
        "corrupt",
        None,
    ]
    assert [left for _, left in plan.remaining()] == [0, 0]


def test_fault_rules_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        FaultRule(kind="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FaultRule(kind="reset", count=0)
    with pytest.raises(ValueError):
        FaultRule.from_dict({"kind": "reset", "color": "red"})
    with pytest.raises(ValueError):
        rules_from_json('{"kind": "reset"}')


@given(
    st.lists(
        st.builds(
            FaultRule,
            kind=st.sampled_from(["status", "reset", "stall", "truncate", "corrupt"]),
            count=st.integers(1, 100),
            method=st.none() | st.sampled_from(["GET", "HEAD", "PUT"]),
            path_regex=st.none() | st.sampled_from([r"^/b/", r"\.safetensors$"]),
            ranged_only=st.booleans(),
            status=st.sampled_from([429, 500, 503]),
            retry_after_s=st.none() | st.floats(0, 60),
            after_bytes=st.integers(0, 1 << 30),
            seconds=st.floats(0, 100),
            at_byte=st.integers(0, 1 << 30),
        ),
        max_size=5,
    )
)
def test_fault_rules_json_round_trip(rules: list[FaultRule]) -> None:
    assert rules_from_json(rules_to_json(rules)) == rules


def test_request_head_parsing_gives_body_length() -> None:
    head = parse_request_head(request("PUT", "/b/o", Content_Length="12"))
    assert (head.method, head.target, head.body_bytes) == ("PUT", "/b/o", 12)
    chunked = parse_request_head(request("PUT", "/b/o", Transfer_Encoding="chunked"))
    assert chunked.body_bytes is None
    with pytest.raises(HeadError):
        parse_request_head(b"\x16\x03\x01 tls hello")


def test_response_head_body_length_rules() -> None:
    ok = parse_response_head(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10")
    assert ok.body_bytes("GET") == 10
    assert ok.body_bytes("HEAD") == 0
    chunked = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")
    assert chunked.body_bytes("GET") is None
    assert parse_response_head(b"HTTP/1.1 304 Not Modified").body_bytes("GET") == 0
    assert parse_response_head(b"HTTP/1.1 200 OK").body_bytes("GET") is None


@pytest.mark.parametrize(
    ("flavor", "marker"), [("s3", b"<Code>SlowDown</Code>"), ("gcs", b'"backendError"')]
)
def test_status_fault_response_looks_like_the_cloud(flavor: str, marker: bytes) -> None:
    raw = fault_response(FaultRule(kind="status", retry_after_s=2), flavor)  # type: ignore[arg-type]
    head, _, body = raw.partition(b"\r\n\r\n")
    parsed = parse_response_head(head)
    assert parsed.status == 503
    assert parsed.headers["retry-after"] == "2"
    assert parsed.body_bytes("GET") == len(body)
    assert marker in body


def test_stats_reset_keeps_open_connections() -> None:
    stats = LinkStats()
    stats.connection_opened()
    stats.connection_opened()
    stats.connection_closed()
    stats.add_down(10, 8)
    stats.add_fault("reset")
    stats.reset()
    snap = stats.snapshot()
    assert snap["bytes_down"] == 0
    assert snap["connections_open"] == 1
    assert snap["max_concurrent_connections"] == 1
    assert snap["faults_fired"]["reset"] == 0


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (b"", True),
        (b"GE", True),
        (b"GET /x HTTP/1.1", True),
        (b"PROPFIND / HTTP/1.1", True),
        (b"\x16\x03\x01\x02\x00", False),
        (b"get / HTTP/1.1", False),
        (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", False),
    ],
)
def test_could_be_request_spots_non_http_early(start: bytes, expected: bool) -> None:
    assert could_be_request(start) is expected
