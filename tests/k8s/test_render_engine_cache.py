"""`engine_cache:` in a deploy config: the guard's --engine-cache flags (ones the CLI takes),
the cache's emptyDir, the HMAC key from a Secret (a reference, the server's container only),
cache peers on their own port that only the model's pods reach; every object still validates
against the Kubernetes schema; bad blocks are refused with the key and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from spotstart.k8s import CLOUDS, DeployConfigError, parse_config, render
from spotstart.k8s.config import ENGINE_CACHE_PORT, GUARD_PORT, PEER_PORT
from spotstart.k8s.render import ENGINE_CACHE_DIR, engine_cache_secret_command
from tests.k8s.test_render import BASE, admits, model_pods, validate_core

CACHE = {"url": "gs://b/engine-cache", "secret_name": "m-engine-cache-key"}


def objs_of(change: dict[str, Any], cloud: str = "gke") -> list[dict[str, Any]]:
    return [m.obj for m in render(parse_config({**BASE, **change}, cloud), cloud)]  # type: ignore[arg-type]


def server_of(pod: dict[str, Any]) -> dict[str, Any]:
    (server,) = [c for c in pod["containers"] if c["name"] == "server"]
    return server


def guard_args(server: dict[str, Any]) -> Any:
    from spotstart.cli.main import build_parser

    return build_parser().parse_args(server["command"][1:])


@pytest.mark.parametrize("kcloud", CLOUDS)
def test_engine_cache_renders_flags_volume_and_secret_that_validate(kcloud: str) -> None:
    objs = objs_of({"peers": True, "engine_cache": CACHE}, kcloud)
    validate_core(objs)
    for pod in model_pods(objs, "m"):
        server = server_of(pod)
        args = guard_args(server)
        assert args.engine_cache == "gs://b/engine-cache"
        assert str(args.engine_cache_dir) == ENGINE_CACHE_DIR
        assert not args.engine_cache_no_publish
        assert args.engine_cache_serve == f"0.0.0.0:{ENGINE_CACHE_PORT}"
        assert args.engine_cache_peers.endswith(f".svc.cluster.local:{ENGINE_CACHE_PORT}")
        assert args.server == ["--", "serve"]
        # the cache dir lies in an emptyDir of its own, mounted in the server's container
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
        (mount,) = [path for path in mounts if ENGINE_CACHE_DIR.startswith(path + "/")]
        assert volumes[mounts[mount]] == {"name": mounts[mount], "emptyDir": {}}
        # the key: a Secret reference, never a value, only where the guard runs
        (ref,) = [e for e in server["env"] if e["name"] == "SPOTSTART_ENGINE_CACHE_SECRET"]
        assert "value" not in ref
        assert ref["valueFrom"]["secretKeyRef"] == {
            "name": "m-engine-cache-key",
            "key": "secret",
            "optional": False,
        }
        for init in pod.get("initContainers", []):
            assert all(e["name"] != "SPOTSTART_ENGINE_CACHE_SECRET" for e in init.get("env", []))
        ports = {p["containerPort"] for p in server["ports"]}
        assert ports == {GUARD_PORT, ENGINE_CACHE_PORT}


def test_cache_peers_are_reachable_from_the_models_own_pods_only() -> None:
    objs = objs_of({"peers": True, "engine_cache": CACHE})
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    own = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in objs
        if d["kind"] == "Deployment" and d["metadata"]["name"] in ("m-spot", "m-ondemand")
    ]
    assert len(own) == 2
    ns = policy["metadata"]["namespace"]
    for dst in own:
        for src in own:
            assert admits(policy, src, ns, dst, ENGINE_CACHE_PORT)
            assert admits(policy, src, ns, dst, PEER_PORT)
        assert not admits(policy, {}, ns, dst, ENGINE_CACHE_PORT)
        assert not admits(policy, {"app.kubernetes.io/name": "m"}, ns, dst, ENGINE_CACHE_PORT)
        assert not admits(policy, dst, "elsewhere", dst, ENGINE_CACHE_PORT)
    (svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "m-peers"]
    assert ENGINE_CACHE_PORT in {p["port"] for p in svc["spec"]["ports"]}


def test_publish_never_and_key_extra_and_no_peers() -> None:
    objs = objs_of({"engine_cache": {**CACHE, "publish": "never", "key_extra": ["rev-7"]}})
    for pod in model_pods(objs, "m"):
        args = guard_args(server_of(pod))
        assert args.engine_cache_no_publish
        assert args.engine_cache_key_extra == ["rev-7"]
        assert args.engine_cache_serve is None and args.engine_cache_peers is None
    assert not [o for o in objs if o["kind"] == "NetworkPolicy"]
    validate_core(objs)


def test_peers_token_false_serves_the_cache_with_no_token_as_the_config_says() -> None:
    objs = objs_of({"peers": {"token": False}, "engine_cache": {"url": "s3://b/ec"}})
    for pod in model_pods(objs, "m"):
        server = server_of(pod)
        args = guard_args(server)
        assert args.no_token and args.engine_cache_serve
        assert all(e["name"] != "SPOTSTART_ENGINE_CACHE_SECRET" for e in server["env"])


def test_without_engine_cache_nothing_of_it_is_rendered() -> None:
    objs = objs_of({"peers": True})
    for pod in model_pods(objs, "m"):
        server = server_of(pod)
        assert not [a for a in server["command"] if a.startswith("--engine-cache")]
        assert {v["name"] for v in pod["volumes"]} & {"engine-cache"} == set()
    assert engine_cache_secret_command(parse_config(BASE, "gke")) is None


def test_the_secret_command_never_puts_the_key_in_argv() -> None:
    cfg = parse_config({**BASE, "engine_cache": CACHE}, "gke")
    command = engine_cache_secret_command(cfg)
    assert command is not None and "openssl rand -hex 32" in command
    assert "--from-file=secret=/dev/stdin" in command and "m-engine-cache-key" in command


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ("gs://b/x", "engine_cache: 'gs://b/x': a mapping"),
        ({"secret_name": "x"}, "engine_cache.url"),
        ({"url": "nope"}, "engine_cache.url"),
        ({"url": "gs://b/x", "publish": "always"}, "first or never"),
        ({"url": "https://h/x"}, "publish: never"),
        ({"url": "gs://b/x", "secret_name": "Bad_Name"}, "engine_cache.secret_name"),
        ({"url": "gs://b/x", "peers": True}, "needs the top-level peers"),
        ({"url": "gs://b/x", "peers": "yes"}, "true or false"),
        ({"url": "gs://b/x", "key_extra": "one"}, "engine_cache.key_extra"),
        ({"url": "gs://b/x", "dir": "/x"}, "unknown key 'dir'"),
    ],
)
def test_bad_engine_cache_blocks_are_refused(block: Any, needle: str) -> None:
    with pytest.raises(DeployConfigError, match="deploy config") as caught:
        parse_config({**BASE, "engine_cache": block}, "gke")
    assert needle in str(caught.value)


def test_the_cache_port_is_taken_from_the_server() -> None:
    with pytest.raises(DeployConfigError, match="engine cache peers"):
        parse_config(
            {**BASE, "peers": True, "engine_cache": CACHE, "port": ENGINE_CACHE_PORT}, "gke"
        )
