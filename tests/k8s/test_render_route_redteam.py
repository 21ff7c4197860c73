"""Red team of `k8s render` with `route:`: two deployments side by side in one namespace, one
named like another's router (``m`` and ``m-route``)."""

from __future__ import annotations

from typing import Any

import pytest

from spotstart.k8s import CLOUDS, DeployConfigError, parse_config, render
from spotstart.k8s.config import Cloud
from tests.k8s.test_render import BASE, selects

ROUTE = {"route": {"enabled": True}}


def _render(raw: dict[str, Any], cloud: Cloud) -> list[dict[str, Any]] | None:
    try:
        cfg = parse_config(raw, cloud)
    except DeployConfigError:
        return None
    return [m.obj for m in render(cfg, cloud)]


def _pod_labels(objs: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [
        o["spec"]["template"]["metadata"]["labels"]
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
    ]


@pytest.mark.parametrize("kcloud", CLOUDS)
@pytest.mark.parametrize("suffix", ["route", "replicas", "serving", "peers"])
def test_a_deployment_named_like_anothers_router_is_neither_selected_nor_overwritten(
    kcloud: Cloud, suffix: str
) -> None:
    """``m`` with a router selected its router pods by ``app.kubernetes.io/name: m-route``,
    the name label of every serving pod of a deployment named ``m-route``: m's Service sent
    m's clients straight to m-route's guards (another model), and m's guards admitted
    m-route's pods; m's router PodDisruptionBudget ``m-route`` was m-route's own (one
    overwrote the other). Either such a name is refused, or nothing is shared."""
    first = _render({**BASE, "name": "m", **ROUTE}, kcloud)
    assert first is not None
    second = _render({**BASE, "name": f"m-{suffix}", **ROUTE}, kcloud)
    if second is None:
        return  # refused: a usage error naming `name`
    for a, b in ((first, second), (second, first)):
        for obj in a:
            spec = obj.get("spec", {})
            selectors = []
            if obj["kind"] == "Service" and spec.get("selector"):
                selectors.append({"matchLabels": spec["selector"]})
            if obj["kind"] in ("PodDisruptionBudget", "Deployment"):
                selectors.append(spec["selector"])
            if obj["kind"] == "NetworkPolicy":
                selectors.append(spec["podSelector"])
                for rule in spec.get("ingress", []):
                    selectors += [
                        p["podSelector"] for p in rule.get("from", []) if "podSelector" in p
                    ]
            for sel in selectors:
                for labels in _pod_labels(b):
                    assert not selects(sel, labels), (obj["kind"], obj["metadata"]["name"])
    names = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in first}
    clash = [
        (o["kind"], o["metadata"]["name"])
        for o in second
        if (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) in names
    ]
    assert clash == []
