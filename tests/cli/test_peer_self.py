"""Where a node stands on the single-flight ring when a serve-peers sidecar (not the fetch
itself) serves its weights dir, as `k8s render` makes it: every node must name itself by the
address the others reach it at, or the nodes' rings disagree and chunks are read from the
origin by several nodes (measured in the namespace bench before this: 6.6x the model at N=8)."""

from __future__ import annotations

import argparse

import pytest

from spotstart.cli.fetch_cmd import config_from_args
from spotstart.cli.main import build_parser
from spotstart.errors import UsageError
from spotstart.fetch.peers import PeerSpec


def _args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["fetch", "gs://b/m/", "/tmp/x", *flags])


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPOTSTART_PEERS", "POD_IP", "SPOTSTART_PEER_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_a_sidecar_node_is_its_pod_ip_at_the_peers_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_IP", "10.0.0.9")
    spec = config_from_args(_args("--peers", "dns:llm-peers:8471")).peers
    assert spec is not None
    assert spec.me == "10.0.0.9:8471"
    assert spec.exclude == ("10.0.0.9:8471",)  # its own sidecar is not asked


def test_the_same_through_the_environment_and_the_python_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POD_IP", "fd00::7")
    monkeypatch.setenv("SPOTSTART_PEERS", "dns:llm-peers:9000,10.0.0.3:8471")
    spec = PeerSpec.parse(None)
    assert (spec.me, spec.exclude) == ("[fd00::7]:9000", ("[fd00::7]:9000",))


def test_an_explicit_place_wins_and_nothing_is_guessed_without_pod_ip() -> None:
    spec = config_from_args(_args("--peers", "10.0.0.2:8471", "--peer-self", "10.0.0.5:8471")).peers
    assert spec is not None and (spec.me, spec.exclude) == ("10.0.0.5:8471", ("10.0.0.5:8471",))
    spec = config_from_args(_args("--peers", "10.0.0.2:8471")).peers
    assert spec is not None and (spec.me, spec.exclude) == (None, ())


def test_serving_and_an_explicit_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_IP", "10.0.0.9")
    flags = ["--peers", "dns:svc:8471", "--serve-peers", "0.0.0.0:8471", "--no-token"]
    spec = config_from_args(_args(*flags, "--peer-self", "node-3.example:8471")).peers
    assert spec is not None and spec.me == "node-3.example:8471"
    assert set(spec.exclude) == {"0.0.0.0:8471", "node-3.example:8471"}


@pytest.mark.parametrize(
    "bad", ["dns:x:1", "http://10.0.0.1:8471", "10.0.0.1", "10.0.0.1:0", "a b:1", "[::1:80"]
)
def test_a_place_that_is_not_host_port_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="--peer-self"):
        config_from_args(_args("--peers", "10.0.0.2:8471", "--peer-self", bad))


def test_a_pod_ip_that_is_not_an_address_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_IP", "not an ip/x")
    with pytest.raises(UsageError):
        PeerSpec.parse("dns:svc:8471")
