"""`spotstart k8s render` with `route:`: `spotstart route` as its own Deployment (on on-demand
nodes of each cloud, a PodDisruptionBudget, the slim spotstart image locked down like the
other spotstart containers), the serving Service pointing at it, a headless Service through
which it finds the guards, the guards' port open to the router alone, and the guards'
--continue-grace. Every object validates (kubernetes-validate --strict); the rendered commands
are ones the CLI takes."""

from __future__ import annotations

from typing import Any

import pytest

from spotstart.cli.main import build_parser
from spotstart.k8s import CLOUDS, DeployConfigError, parse_config, render
from spotstart.k8s.config import SPOTSTART_IMAGE, Cloud
from spotstart.k8s.render import GUARD_PORT, PEER_PORT, TMP_DIR
from tests.k8s.test_render import BASE, admits, model_pods, selects, validate_core
from tests.k8s.test_render_security import SECURE

ROUTE = {"route": {"enabled": True}}


def objects(raw: dict[str, Any], cloud: Cloud) -> list[dict[str, Any]]:
    return [m.obj for m in render(parse_config(raw, cloud), cloud)]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def node_admits(pod: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether the pod's required node affinity lets it onto a node with ``labels`` (its
    terms ORed, each term's expressions ANDed)."""
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    return any(selects({"matchExpressions": t["matchExpressions"]}, labels) for t in terms)


# what each cloud labels its nodes with: (labels, is on-demand and not a model GPU pool)
NODES: dict[str, list[tuple[dict[str, str], bool]]] = {
    "gke": [
        ({}, True),
        ({"cloud.google.com/gke-spot": "false"}, True),
        ({"cloud.google.com/gke-spot": "true"}, False),
        ({"cloud.google.com/gke-preemptible": "true"}, False),
    ],
    "eks": [
        ({"karpenter.sh/capacity-type": "on-demand"}, True),
        ({"eks.amazonaws.com/capacityType": "ON_DEMAND"}, True),
        ({"karpenter.sh/capacity-type": "spot"}, False),
        ({"eks.amazonaws.com/capacityType": "SPOT"}, False),
        ({}, False),  # unknown capacity: not taken for on-demand
        ({"karpenter.sh/capacity-type": "on-demand", "spotstart.dev/pool": "m-ondemand"}, False),
    ],
    "aks": [
        ({}, True),
        ({"kubernetes.azure.com/scalesetpriority": "regular"}, True),
        ({"kubernetes.azure.com/scalesetpriority": "spot"}, False),
    ],
}


@pytest.mark.parametrize("peers", [False, True])
@pytest.mark.parametrize("kcloud", CLOUDS)
def test_the_router_is_its_own_deployment_on_on_demand_nodes_and_every_object_validates(
    kcloud: Cloud, peers: bool
) -> None:
    objs = objects({**BASE, **ROUTE, "peers": peers, "namespace": "serving"}, kcloud)
    validate_core(objs)
    dep = one(objs, "Deployment", "m-route")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (c,) = pod["containers"]
    # the slim image, locked down like every spotstart container, with its own /tmp
    assert c["image"] == SPOTSTART_IMAGE
    assert c["securityContext"] == SECURE
    assert {m["mountPath"] for m in c["volumeMounts"]} == {TMP_DIR}
    assert pod["automountServiceAccountToken"] is False
    assert c["ports"] == [{"name": "http", "containerPort": 8090, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    # the command is one `spotstart route` takes, pointed at the headless Service of guards
    args = build_parser().parse_args(c["command"][1:])
    assert c["command"][:2] == ["spotstart", "route"] and args.listen == ("0.0.0.0", 8090)
    assert args.replicas == f"dns:m-replicas.serving.svc.cluster.local:{GUARD_PORT}"
    from spotstart.cli.route_cmd import config_from_args

    source = config_from_args(args).source  # type: ignore[attr-defined]
    assert (source.dns_name, source.dns_port) == (
        "m-replicas.serving.svc.cluster.local",
        GUARD_PORT,
    )
    assert args.shutdown_delay + args.shutdown_timeout < pod["terminationGracePeriodSeconds"]
    headless = one(objs, "Service", "m-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"][0]["port"] == GUARD_PORT
    serving = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in objs
        if d["kind"] == "Deployment" and d["metadata"]["name"] in ("m-spot", "m-ondemand")
    ]
    assert len(serving) == 2
    assert all(selects({"matchLabels": headless["spec"]["selector"]}, s) for s in serving)
    assert not selects({"matchLabels": headless["spec"]["selector"]}, labels)
    # the serving Service is the router's, not the guards'
    service = one(objs, "Service", "m")
    assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    assert not any(selects({"matchLabels": service["spec"]["selector"]}, s) for s in serving)
    # the router's pods are not the model's: not in its PodDisruptionBudget
    model_pdb = one(objs, "PodDisruptionBudget", "m")
    assert not selects(model_pdb["spec"]["selector"], labels)
    pdb = one(objs, "PodDisruptionBudget", "m-route")
    assert pdb["spec"]["minAvailable"] == 1 and selects(pdb["spec"]["selector"], labels)
    # on-demand nodes only, each cloud's way; no toleration for a spot taint
    for node, ok in NODES[kcloud]:
        assert node_admits(pod, node) is ok, (kcloud, node)
    assert "tolerations" not in pod


@pytest.mark.parametrize("peers", [False, True])
@pytest.mark.parametrize("kcloud", CLOUDS)
def test_the_guards_port_admits_the_router_alone_and_the_rest_is_as_before(
    kcloud: Cloud, peers: bool
) -> None:
    objs = objects({**BASE, **ROUTE, "peers": peers}, kcloud)
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    router = one(objs, "Deployment", "m-route")["spec"]["template"]["metadata"]["labels"]
    own = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in objs
        if d["kind"] == "Deployment" and d["metadata"]["name"] in ("m-spot", "m-ondemand")
    ]
    ns = policy["metadata"]["namespace"]
    strangers = [({}, ns), ({"app.kubernetes.io/name": "m"}, ns), (router, "other-namespace")]
    for dst in own:
        assert admits(policy, router, ns, dst, GUARD_PORT)
        for src, src_ns in strangers:
            assert not admits(policy, src, src_ns, dst, GUARD_PORT), (src, src_ns)
            assert admits(policy, src, src_ns, dst, 8000)  # the server's port as before
            assert not admits(policy, src, src_ns, dst, PEER_PORT)
        # the router gets no more than the guard's port
        assert admits(policy, router, ns, dst, PEER_PORT) is False


def test_continue_grace_goes_to_the_guards_only_when_set() -> None:
    parser = build_parser()
    for route, want in (
        ({"enabled": True}, None),
        ({"enabled": True, "continue_grace_seconds": 4}, 4.0),
        ({"continue_grace_seconds": 2.5}, 2.5),
    ):
        cfg = parse_config({**BASE, "route": route}, "gke")
        for pod in model_pods([m.obj for m in render(cfg, "gke")], "m"):
            argv = pod["containers"][0]["command"]
            cut = argv.index("--")
            args = parser.parse_args([*argv[1:cut], "--", "true"])
            assert args.continue_grace == want


def test_without_route_or_with_enabled_false_nothing_changes() -> None:
    plain = objects(BASE, "eks")
    for raw in ({**BASE, "route": False}, {**BASE, "route": {"enabled": False}}):
        assert objects(raw, "eks") == plain
    assert not [o for o in plain if "route" in o["metadata"]["name"]]


def test_the_routers_replicas_and_resources_come_from_the_config() -> None:
    resources = {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    raw = {**BASE, "route": {"replicas": 3, "port": 9000, "resources": resources}}
    objs = objects(raw, "aks")
    validate_core(objs)
    dep = one(objs, "Deployment", "m-route")
    assert dep["spec"]["replicas"] == 3
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["resources"] == resources
    assert build_parser().parse_args(c["command"][1:]).listen == ("0.0.0.0", 9000)


@pytest.mark.parametrize(
    ("route", "needle"),
    [
        ({"replicas": 0}, "route.replicas"),
        ({"enabled": "yes"}, "route.enabled"),
        ({"listen": 1}, "unknown key 'listen'"),
        ({"resources": {"requests": {"cpu": "1; rm -rf"}}}, "route.resources.requests.cpu"),
        ({"resources": {"requests": {"gpu": "1"}}}, "unknown key 'gpu'"),
        ({"continue_grace_seconds": 15}, "route.continue_grace_seconds"),
        ({"continue_grace_seconds": -1}, "route.continue_grace_seconds"),
        ("on", "route"),
    ],
)
def test_bad_route_configs_name_the_key(route: object, needle: str) -> None:
    with pytest.raises(DeployConfigError, match=needle.replace(".", r"\.")):
        parse_config({**BASE, "route": route}, "gke")
