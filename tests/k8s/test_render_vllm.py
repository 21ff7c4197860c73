"""`spotstart k8s render` with `server: {engine: vllm}`: the module form of vLLM's server on
loopback behind the guard, its --shutdown-timeout inside the notice window (checked against
the guard's own drain state machine, as the rendered guard flags configure it), and with
`load_format: spotstart` the weights streamed by the loader plugin after an init container
fetched only the config and tokenizer. Every object validates against the Kubernetes schema;
other engines keep their own commands."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotstart.cli.main import build_parser
from spotstart.guard.drain import Command, DrainController
from spotstart.guard.notice import NoticeKind, PreemptionNotice
from spotstart.k8s import CLOUDS, DeployConfigError, load_config, parse_config, render, to_yaml
from spotstart.k8s.config import NOTICE_WINDOW_S, VLLM_OWNED_FLAGS, VLLM_SPOTSTART_IMAGE
from spotstart.k8s.render import (
    STOP_GRACE_S,
    VLLM_EXIT_S,
    server_argv,
    vllm_shutdown_timeout_s,
)
from tests.k8s.test_render import (
    EXAMPLE,
    model_pods,
    peer_containers,
    token_ref,
    validate_core,
)
from tests.k8s.test_render_redteam import BREAKOUT

BASE: dict[str, Any] = {
    "name": "llm",
    "namespace": "ml",
    "model_url": "gs://models/llama-3-8b/",
    "image": VLLM_SPOTSTART_IMAGE,  # container/Containerfile.vllm
    "server": {"engine": "vllm"},
    "gpu": {"type": "nvidia-t4"},
    "replicas": 2,
    "zones": ["us-central1-a", "us-central1-b"],
    "eks": {"cluster_name": "c"},
}


def pods(raw: dict[str, Any], cloud: str) -> tuple[Any, list[dict[str, Any]]]:
    cfg = parse_config(raw, cloud)  # type: ignore[arg-type]
    objs = [m.obj for m in render(cfg, cloud)]  # type: ignore[arg-type]
    validate_core(objs)
    return cfg, model_pods(objs, cfg.name)


def split_guard(argv: list[str]) -> tuple[list[str], list[str]]:
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


@pytest.mark.parametrize("kcloud", CLOUDS)
def test_the_example_runs_the_vllm_module_on_loopback_behind_the_guard(kcloud: str) -> None:
    cfg = load_config(EXAMPLE, kcloud)  # type: ignore[arg-type]
    objs = [m.obj for m in render(cfg, kcloud)]  # type: ignore[arg-type]
    validate_core(objs)
    window = NOTICE_WINDOW_S[kcloud]  # type: ignore[index]
    for pod in model_pods(objs, "llama-8b"):
        (server,) = pod["containers"]
        guard, vllm = split_guard(server["command"])
        assert vllm == [
            "python3",
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            "8000",
            "--model",
            "/weights",
            "--served-model-name",
            "llama-8b",
            "--shutdown-timeout",
            str({"gke": 4, "eks": 8, "aks": 8}[kcloud]),
        ]
        # the guard polls the engine's /health for its /readyz, the pod's readiness probe
        assert guard[guard.index("--upstream") + 1] == "http://127.0.0.1:8000"
        assert guard[guard.index("--health-path") + 1] == "/health"
        assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert pod["terminationGracePeriodSeconds"] == window
        # the default loader reads what the init container fetched: every file
        (fetch,) = [c for c in pod["initContainers"] if c["name"] == "fetch-weights"]
        assert "--exclude" not in fetch["command"]


def drain_windows(guard: list[str], window: int, finish_at: float | None) -> tuple[float, float]:
    """(time of the guard's SIGTERM to the server, time of its SIGKILL) after a SIGTERM
    notice at t=0, with one request in flight that ends at ``finish_at`` (None: never), as
    the guard parses the rendered flags (its own CLI, its own drain state machine)."""
    from spotstart.cli.guard_cmd import config_from_args

    args = build_parser().parse_args(
        [*guard[1:], "--mark-pod", "off", "--", "python3", "-m", "vllm"]
    )
    config = config_from_args(args)
    assert config.termination_window_s == window
    now = [0.0]
    ctl = DrainController(config.drain, clock=lambda: now[0])
    ctl.set_upstream_health(True)  # vLLM is up and serving (a starting one is killed sooner)
    assert ctl.try_accept()
    ctl.on_notice(
        PreemptionNotice(NoticeKind.TERMINATION, "signal", 0.0, config.termination_window_s)
    )
    stop = kill = None
    while now[0] <= window + 5 and kill is None:
        if finish_at is not None and now[0] >= finish_at and ctl.counters.in_flight:
            ctl.finish("ok")
        for command in ctl.tick():
            if command is Command.CANCEL_IN_FLIGHT:
                ctl.finish("cut")
            elif command is Command.STOP_SERVER:
                stop = now[0]
            elif command is Command.KILL_SERVER:
                kill = now[0]
        now[0] = round(now[0] + 0.01, 2)
    assert stop is not None and kill is not None
    return stop, kill


@pytest.mark.parametrize("kcloud", CLOUDS)
@pytest.mark.parametrize("finish", [None, 0.0, 0.5, 0.45])
def test_the_shutdown_timeout_lets_vllm_exit_by_itself_before_the_guards_sigkill(
    kcloud: str, finish: float | None
) -> None:
    """Whatever the window and however the drain ends (requests done at once, half-way,
    just before the drain deadline, or cut at it), vLLM's drain plus its exit fits between
    the guard's SIGTERM and its SIGKILL, and the SIGKILL comes inside the pod's window."""
    top = NOTICE_WINDOW_S[kcloud]  # type: ignore[index]
    for window in sorted({1, 2, 3, 5, 8, 10, 12, 15, 20, 25, 30, 45, 60, 110, top}):
        if window > top:
            continue
        _, (pod, _) = pods({**BASE, "notice_window_seconds": window}, kcloud)
        guard, vllm = split_guard(pod["containers"][0]["command"])
        timeout = int(vllm[vllm.index("--shutdown-timeout") + 1])
        assert timeout == vllm_shutdown_timeout_s(window)
        finish_at = None if finish is None else finish * window
        stop, kill = drain_windows(guard, window, finish_at)
        assert kill <= window, (window, stop, kill)
        if timeout > 0:
            assert kill - stop >= timeout + VLLM_EXIT_S - 0.011, (window, finish, stop, kill)
        else:  # a window of 6 s or less: vLLM aborts at once, its exit may be cut
            assert window <= 6
    # the figures the README gives
    assert [vllm_shutdown_timeout_s(w) for w in (15, 30, 110)] == [4, 8, 8]
    assert [vllm_shutdown_timeout_s(w) for w in (1, 6, 7)] == [0, 0, 1] and STOP_GRACE_S == 10


@pytest.mark.parametrize("kcloud", CLOUDS)
@pytest.mark.parametrize("peers", [False, True])
def test_load_format_spotstart_streams_the_weights_after_fetching_only_config_and_tokenizer(
    kcloud: str, peers: bool
) -> None:
    raw = {**BASE, "server": {"engine": "vllm", "load_format": "spotstart"}, "peers": peers}
    cfg, model = pods(raw, kcloud)
    assert cfg.weights == "in-process"
    for pod in model:
        inits = {c["name"]: c for c in pod["initContainers"]}
        assert "fetch-weights" not in inits
        fetch = inits["fetch-config"]["command"]
        assert fetch[:4] == ["spotstart", "fetch", "gs://models/llama-3-8b/", "/weights"]
        parsed = build_parser().parse_args(fetch[1:])
        assert parsed.exclude == ["*.safetensors"] and not parsed.include
        (server,) = pod["containers"]
        _, vllm = split_guard(server["command"])
        assert vllm[vllm.index("--model") + 1] == "/weights"
        assert vllm[vllm.index("--load-format") + 1] == "spotstart"
        extra = json.loads(vllm[vllm.index("--model-loader-extra-config") + 1])
        dns = "dns:llm-peers.ml.svc.cluster.local:8471"
        want = {"source": "gs://models/llama-3-8b/", "cache_dir": "/weights"}
        assert extra == ({**want, "peers": dns} if peers else want)
        assert vllm == server_argv(cfg)
        if peers:
            # the loader and the config fetch take the token from the Secret, never from argv
            names = {c["name"] for c in peer_containers(pod)}
            assert names == {"serve-peers", "fetch-config", "server"}
            assert {token_ref(c) for c in peer_containers(pod)} == {"llm-peer-token"}
            assert "token" not in json.dumps(extra)
            assert parsed.peers == dns


@pytest.mark.parametrize("kcloud", CLOUDS)
def test_other_engines_keep_their_own_command(kcloud: str) -> None:
    tgi = ["text-generation-launcher", "--model-id", "/weights", "--port", "8000"]
    cfg, model = pods({**BASE, "server": {"command": tgi, "health_path": "/health"}}, kcloud)
    for pod in model:
        _, argv = split_guard(pod["containers"][0]["command"])
        assert argv == tgi and cfg.vllm is None


@pytest.mark.parametrize(
    ("server", "extra", "needle"),
    [
        ({"engine": "tgi"}, {}, "give server.command instead"),
        ({"engine": "vllm", "command": ["x"]}, {}, "given with server.engine"),
        ({"command": ["x"], "load_format": "spotstart"}, {}, "needs server.engine: vllm"),
        ({"engine": "vllm", "load_format": "runai"}, {}, "'runai': auto or spotstart"),
        ({"engine": "vllm", "load_format": "spotstart"}, {"weights": "init"}, "drop one"),
        ({"engine": "vllm"}, {"weights": "in-process"}, "needs server.load_format: spotstart"),
        ({"engine": "vllm", "args": ["--port", "9000"]}, {}, "--port is set by the render"),
        ({"engine": "vllm", "args": ["--shutdown-timeout=60"]}, {}, "--shutdown-timeout is"),
        ({"engine": "vllm", "args": ["--load_format=auto"]}, {}, "--load_format is set"),
        ({"engine": "vllm", "args": "--max-model-len 8"}, {}, "server.args: a list"),
        ({"engine": "vllm", "served_model_name": "a b"}, {}, "server.served_model_name"),
        ({"engine": "vllm", "python": "python3; id"}, {}, "server.python"),
    ],
)
def test_bad_vllm_configs_name_the_key_and_the_fix(
    server: dict[str, Any], extra: dict[str, Any], needle: str
) -> None:
    with pytest.raises(DeployConfigError, match="deploy config") as caught:
        parse_config({**BASE, "server": server, **extra}, "gke")
    assert needle in str(caught.value)


def vllm_configs(cloud: str) -> st.SearchStrategy[dict[str, Any]]:
    flag = st.sampled_from(["--max-model-len", "--dtype", "--enforce-eager", "--seed"])
    server = st.fixed_dictionaries(
        {
            "engine": st.just("vllm"),
            "load_format": st.sampled_from(["auto", "spotstart"]),
            "args": st.lists(st.one_of(flag, st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True))),
        },
        optional={
            "served_model_name": st.from_regex(r"[a-z][a-z0-9._/:-]{0,30}", fullmatch=True),
            "python": st.sampled_from(["python3", "/opt/venv/bin/python"]),
        },
    )
    return st.fixed_dictionaries(
        {
            **{k: st.just(v) for k, v in BASE.items() if k != "server"},
            "server": server,
            "notice_window_seconds": st.integers(1, NOTICE_WINDOW_S[cloud]),  # type: ignore[index]
            "port": st.integers(1024, 8079),
            "peers": st.sampled_from([False, True, {"token": False}]),
        }
    )


@pytest.mark.parametrize("kcloud", CLOUDS)
@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_vllm_config_renders_valid_objects_with_the_render_owning_its_flags(
    kcloud: str, data: st.DataObject
) -> None:
    raw = data.draw(vllm_configs(kcloud))
    cfg, model = pods(raw, kcloud)
    assert cfg.vllm is not None
    for pod in model:
        guard, vllm = split_guard(pod["containers"][0]["command"])
        assert vllm == server_argv(cfg)
        assert vllm[:3] == [cfg.vllm.python, "-m", "vllm.entrypoints.openai.api_server"]
        # each flag the render owns once, before the user's own flags, which follow verbatim
        owned = [a for a in vllm if a in VLLM_OWNED_FLAGS]
        assert len(owned) == len(set(owned))
        assert vllm[len(vllm) - len(cfg.vllm.args) :] == list(cfg.vllm.args)
        assert vllm[vllm.index("--port") + 1] == str(cfg.port)
        assert guard[guard.index("--upstream") + 1] == f"http://127.0.0.1:{cfg.port}"
        timeout = int(vllm[vllm.index("--shutdown-timeout") + 1])
        assert 0 <= timeout < cfg.notice_window_s
        inits = {c["name"] for c in pod.get("initContainers", [])}
        streamed = cfg.vllm.load_format == "spotstart"
        assert ("fetch-config" in inits, "fetch-weights" in inits) == (streamed, not streamed)
        assert ("--load-format" in vllm) == streamed


@pytest.mark.parametrize("kcloud", CLOUDS)
def test_a_hostile_model_url_stays_one_value_in_the_loader_config_and_the_yaml(
    kcloud: str,
) -> None:
    """The URL goes into vLLM's --model-loader-extra-config as JSON in one argv element (no
    shell anywhere): quotes, braces and YAML breakers come back as they went in."""
    url = 'gs://b/m/"},"source":"gs://evil/",' + BREAKOUT
    raw = {**BASE, "model_url": url, "server": {"engine": "vllm", "load_format": "spotstart"}}
    cfg = parse_config(raw, kcloud)  # type: ignore[arg-type]
    for m in render(cfg, kcloud):  # type: ignore[arg-type]
        assert list(yaml.safe_load_all(to_yaml(m))) == [m.obj], m.filename
    for pod in model_pods([m.obj for m in render(cfg, kcloud)], "llm"):  # type: ignore[arg-type]
        _, vllm = split_guard(pod["containers"][0]["command"])
        extra = json.loads(vllm[vllm.index("--model-loader-extra-config") + 1])
        assert extra == {"source": url, "cache_dir": "/weights"}
