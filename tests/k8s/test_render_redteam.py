"""Red team of `k8s render`: config values built to break out of where they are put (YAML
structure, comments, the printed shell command), and the peer NetworkPolicy against the pods
that actually serve the peer port (a policy that selects none of them isolates nothing)."""

from __future__ import annotations

import shlex
from typing import Any

import pytest
import yaml

from spotstart.k8s import CLOUDS, DeployConfigError, parse_config, render
from spotstart.k8s.config import PEER_PORT
from spotstart.k8s.render import peer_token_command, to_yaml
from tests.k8s.test_render import BASE, selects

BREAKOUT = "x\n  hostNetwork: true\n# injected: 1\n---\nkind: Secret\n'\"${IFS}$(id)`id`;&|<>*"


def _hostile(kcloud: str) -> dict[str, Any]:
    return {
        **BASE,
        "image": "registry.example/app:1" + BREAKOUT,
        "spotstart_image": "registry.example/spotstart:1" + BREAKOUT,
        "model_url": "gs://b/m/" + BREAKOUT,
        "server": {"command": ["serve", BREAKOUT, "--x=$(id)"], "health_path": "/h" + BREAKOUT},
        "eks": {"cluster_name": "c" + BREAKOUT, "node_role": {"a": BREAKOUT}},
        "peers": True,
    }


@pytest.mark.parametrize("kcloud", CLOUDS)
def test_hostile_values_stay_values_in_every_manifest(kcloud: str) -> None:
    """Each file parses back to exactly the object rendered: one document, no key or
    document a value added, comments only in the header."""
    cfg = parse_config(_hostile(kcloud), kcloud)  # type: ignore[arg-type]
    for m in render(cfg, kcloud):  # type: ignore[arg-type]
        text = to_yaml(m)
        docs = list(yaml.safe_load_all(text))
        assert docs == [m.obj], m.filename
        body = text.split("\n")
        header = 0
        while body[header].startswith("#"):
            header += 1
        assert not any(line.startswith("#") for line in body[header:]), m.filename
        assert "hostNetwork" not in _keys(m.obj)


def _keys(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


@pytest.mark.parametrize(
    "change",
    [
        {"namespace": "ml;id"},
        {"namespace": "$(id)"},
        {"peers": {"token_secret": "t`id`"}},
        {"peers": {"token_secret": "t\nid"}},
        {"peers": {"token_secret": "-t"}},
    ],
)
def test_values_the_shell_would_read_never_reach_the_printed_command(
    change: dict[str, Any],
) -> None:
    with pytest.raises(DeployConfigError):
        parse_config({**BASE, "peers": True, **change}, "gke")


def test_the_printed_command_is_one_sh_c_with_the_names_as_single_words() -> None:
    cfg = parse_config({**BASE, "namespace": "ml", "peers": {"token_secret": "a.b-c"}}, "gke")
    command = peer_token_command(cfg)
    assert command is not None
    argv = shlex.split(command)
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3
    inner = shlex.split(argv[2].split("| ", 1)[1])
    assert inner == [
        "kubectl",
        "create",
        "secret",
        "generic",
        "a.b-c",
        "--namespace",
        "ml",
        "--from-file=token=/dev/stdin",
    ]


@pytest.mark.parametrize("kcloud", CLOUDS)
def test_the_policy_selects_every_pod_that_listens_on_the_peer_port(kcloud: str) -> None:
    """Every pod template with a container port or a serve-peers sidecar on PEER_PORT is
    selected by the policy: an unselected one would be reachable by every pod."""
    cfg = parse_config({**BASE, "peers": True}, kcloud)  # type: ignore[arg-type]
    objs = [m.obj for m in render(cfg, kcloud)]  # type: ignore[arg-type]
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    serving = []
    for o in objs:
        template = o.get("spec", {}).get("template")
        if not template or "containers" not in template.get("spec", {}):
            continue  # not a pod template (a Karpenter NodePool's)
        spec = template["spec"]
        containers = [*spec.get("initContainers", []), *spec["containers"]]
        ports = {p["containerPort"] for c in containers for p in c.get("ports", [])}
        if PEER_PORT in ports or any("serve-peers" in c.get("command", []) for c in containers):
            assert not spec.get("hostNetwork"), o["metadata"]["name"]
            serving.append((o["metadata"]["namespace"], template["metadata"]["labels"]))
    assert len(serving) == 2  # spot and on-demand
    for ns, labels in serving:
        assert ns == policy["metadata"]["namespace"]
        assert selects(policy["spec"]["podSelector"], labels)
