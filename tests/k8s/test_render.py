"""`spotstart k8s render`: every object validates against the Kubernetes OpenAPI schema of a
current release (kubernetes-validate --strict) and the CRDs against their published schemas
(npm @kubernetes-models, run with node); golden-free property tests over configs; bad configs
are one-line errors with exit 2."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotstart.k8s import CLOUDS, DeployConfigError, load_config, parse_config, render
from spotstart.k8s.config import NOTICE_WINDOW_S, SPOTSTART_IMAGE
from spotstart.k8s.gpus import GPUS
from spotstart.k8s.render import GUARD_PORT, PEER_PORT, ZONE_LABEL, peer_token_command
from tests.conftest import error_line, run_cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "deploy.yaml"
K8S_VERSION = "1.33.0"
CRD_KINDS = {"ComputeClass", "NodePool", "EC2NodeClass"}
VALIDATE_CRDS = ROOT / "tests" / "node" / "validate-crds.mjs"


def validate_core(objs: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for obj in objs:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def validate_crds(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node is not None, "node is needed to check CRDs against their schemas"
    crds = [o for o in objs if o["kind"] in CRD_KINDS]
    done = subprocess.run(
        [node, str(VALIDATE_CRDS)],
        input=json.dumps(crds),
        capture_output=True,
        text=True,
        cwd=VALIDATE_CRDS.parent,
        timeout=60,
        check=False,
    )
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0, (done.stderr, [r for r in results if not r["ok"]])
    assert len(results) == len(crds)
    return results


def peer_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a pod spec that serve to peers or fetch from them."""
    out = []
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        argv = c.get("command", [])
        env = {e["name"] for e in c.get("env", [])}
        if {"serve-peers", "--peers", "--serve-peers"} & set(argv) or "SPOTSTART_PEERS" in env:
            out.append(c)
    return out


def token_ref(container: dict[str, Any]) -> str | None:
    """The Secret a container's $SPOTSTART_PEER_TOKEN comes from (None: no token); never a
    value in the manifest, never optional (a pod without its Secret waits, serving nothing)."""
    refs = [e for e in container.get("env", []) if e["name"] == "SPOTSTART_PEER_TOKEN"]
    if not refs:
        return None
    (ref,) = refs
    assert "value" not in ref, ref
    key_ref = ref["valueFrom"]["secretKeyRef"]
    assert key_ref["key"] == "token" and key_ref["optional"] is False
    return str(key_ref["name"])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector, as the API server reads it."""
    if not set(selector.get("matchLabels", {}).items()) <= set(labels.items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def admits(
    policy: dict[str, Any], src: dict[str, str], src_ns: str, dst: dict[str, str], port: int
) -> bool:
    """Whether ``policy`` (the only one in the namespace) lets a TCP connection from a pod
    labelled ``src`` in ``src_ns`` reach ``port`` of a pod labelled ``dst``: NetworkPolicy
    semantics for the peers this render uses (podSelector, namespaceSelector, none)."""
    spec = policy["spec"]
    if not selects(spec["podSelector"], dst) or "Ingress" not in spec["policyTypes"]:
        return True  # not selected: not isolated
    for rule in spec.get("ingress", []):
        ports = rule.get("ports")
        if ports is not None and not any(
            p.get("protocol", "TCP") == "TCP" and p["port"] <= port <= p.get("endPort", p["port"])
            for p in ports
        ):
            continue
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
            if "namespaceSelector" not in peer and src_ns != policy["metadata"]["namespace"]:
                continue
            if selects(peer.get("podSelector", {}), src):
                return True
    return False


def check_peer_policy(
    policy: dict[str, Any],
    deployments: list[dict[str, Any]],
    controller: dict[str, Any],
    server_port: int,
) -> None:
    """Only the model's own pods reach the peer port; the serving ports stay open to all."""
    ns = policy["metadata"]["namespace"]
    own = [d["spec"]["template"]["metadata"]["labels"] for d in deployments]
    name = own[0]["app.kubernetes.io/name"]
    # the policy applies to the model's pods only: not the controller's, not a stray pod
    # wearing the Service's label
    assert all(selects(policy["spec"]["podSelector"], labels) for labels in own)
    ctl = controller["spec"]["template"]["metadata"]["labels"]
    assert not selects(policy["spec"]["podSelector"], ctl)
    strangers = [
        ({}, ns),
        (ctl, ns),
        ({"app.kubernetes.io/name": name}, ns),  # the headless Service's label alone
        ({"app.kubernetes.io/name": name, "spotstart.dev/capacity": "x"}, ns),
        (own[0], "other-namespace"),  # the same labels, another namespace
    ]
    for dst in own:
        for src in own:
            assert admits(policy, src, ns, dst, PEER_PORT)
        for labels, src_ns in strangers:
            assert not admits(policy, labels, src_ns, dst, PEER_PORT), (labels, src_ns)
            # the Service, a router, Prometheus and the probes reach what they reached before
            for port in (GUARD_PORT, server_port):
                assert admits(policy, labels, src_ns, dst, port)
            # a port nobody listens on is not opened by the policy
            assert not admits(policy, labels, src_ns, dst, 9999)


@pytest.mark.parametrize("kcloud", CLOUDS)
def test_the_example_renders_for_every_cloud_and_every_object_validates(
    kcloud: str, tmp_path: Path
) -> None:
    res = run_cli(
        ["k8s", "render", "--config", str(EXAMPLE), "--cloud", kcloud, "-o", str(tmp_path)]
    )
    assert res.code == 0, res.stderr
    files = sorted(p for p in tmp_path.iterdir() if p.suffix == ".yaml")
    objs = [yaml.safe_load(p.read_text()) for p in files]
    assert all(isinstance(o, dict) and o.get("kind") for o in objs)  # one object per file
    kustomization = yaml.safe_load((tmp_path / "Kustomization").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in files]
    validate_core(objs)
    kinds = sorted(o["kind"] for o in objs)
    want_crds = {"gke": ["ComputeClass"] * 2, "eks": ["EC2NodeClass", "NodePool", "NodePool"]}
    assert sorted(k for k in kinds if k in CRD_KINDS) == want_crds.get(kcloud, [])
    if want_crds.get(kcloud):
        assert all(r["ok"] for r in validate_crds(objs))
    names = {o["metadata"]["name"] for o in objs if o["kind"] == "Deployment"}
    assert names == {"llama-8b-spot", "llama-8b-ondemand", "llama-8b-controller"}
    controller = next(
        o
        for o in objs
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "llama-8b-controller"
    )
    pod = controller["spec"]["template"]
    # the controller is not behind the model's Service (it serves nothing)
    service = next(o for o in objs if o["kind"] == "Service")
    assert not set(service["spec"]["selector"].items()) <= set(pod["metadata"]["labels"].items())
    args = pod["spec"]["containers"][0]["command"]
    assert args[:3] == ["spotstart", "k8s", "controller"]
    # the controller runs the image container/build.sh makes, not the server's
    assert pod["spec"]["containers"][0]["image"] == SPOTSTART_IMAGE
    # the flags it is rendered with are flags the controller takes
    from spotstart.cli.main import build_parser

    parsed = build_parser().parse_args(args[1:])
    assert (parsed.name, parsed.target, parsed.namespace) == ("llama-8b", 3, "serving")
    role = next(o for o in objs if o["kind"] == "Role" and "controller" in o["metadata"]["name"])
    verbs = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert ("", "pods", "delete") not in verbs and ("apps", "deployments", "patch") not in verbs
    assert ("apps", "deployments/scale", "patch") in verbs


def test_stdout_holds_every_object_as_one_yaml_stream() -> None:
    res = run_cli(["k8s", "render", "--config", str(EXAMPLE), "--cloud", "eks"])
    assert res.code == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    manifests = render(load_config(EXAMPLE, "eks"), "eks")
    written = {m.obj["kind"] for m in manifests}
    assert len(docs) == len(manifests) and {d["kind"] for d in docs} == written
    assert {"Deployment", "NodePool", "ValidatingAdmissionPolicy"} <= written


def configs(cloud: str) -> st.SearchStrategy[dict[str, Any]]:
    gpus = sorted(name for name, g in GPUS.items() if g.on(cloud))
    zone = st.from_regex(r"[a-z]{2,6}-[a-z]{4,8}[0-9]-[a-f]", fullmatch=True)
    return st.fixed_dictionaries(
        {
            "name": st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True),
            "model_url": st.sampled_from(["gs://m/llama/", "s3://m/x/", "az://c/m/"]),
            "image": st.just("ghcr.io/example/server:1"),
            "server": st.fixed_dictionaries(
                {
                    "command": st.lists(
                        st.from_regex(r"[a-z0-9/-]{1,8}", fullmatch=True), min_size=1, max_size=4
                    )
                }
            ),
            "gpu": st.fixed_dictionaries(
                {"type": st.sampled_from(gpus), "count": st.integers(1, 8)}
            ),
            "replicas": st.integers(1, 20),
            "zones": st.lists(zone, min_size=1, max_size=6, unique=True),
            "notice_window_seconds": st.integers(1, NOTICE_WINDOW_S[cloud]),  # type: ignore[index]
            "weights": st.sampled_from(["init", "in-process"]),
            "eks": st.just({"cluster_name": "c1"}),
            "peers": st.sampled_from(
                [False, True, {"token": False}, {"token": True, "token_secret": "peer.tok-1"}]
            ),
        }
    )


@pytest.mark.parametrize("kcloud", CLOUDS)
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_valid_config_renders_objects_that_validate_and_keep_the_rules(
    kcloud: str, data: st.DataObject
) -> None:
    raw = data.draw(configs(kcloud))
    cfg = parse_config(raw, kcloud)  # type: ignore[arg-type]
    objs = [m.obj for m in render(cfg, kcloud)]  # type: ignore[arg-type]
    validate_core(objs)
    deployments = [
        o
        for o in objs
        if o["kind"] == "Deployment"
        and o["metadata"]["name"] in (f"{cfg.name}-spot", f"{cfg.name}-ondemand")
    ]
    assert len(deployments) == 2
    controller = next(
        o
        for o in objs
        if o["kind"] == "Deployment" and o["metadata"]["name"] == f"{cfg.name}-controller"
    )
    argv = controller["spec"]["template"]["spec"]["containers"][0]["command"]
    # the controller keeps the config's target, ceiling, zones and notice
    assert argv[argv.index("--target") + 1] == str(cfg.replicas)
    assert argv[argv.index("--max-on-demand") + 1] == str(cfg.max_on_demand)
    assert argv[argv.index("--zones") + 1].split(",") == list(cfg.zones)
    assert argv[argv.index("--notice-s") + 1] == str(cfg.notice_window_s)
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        (server,) = pod["containers"]
        argv = server["command"]
        # the guard is the entrypoint, in front of the server's own command
        assert argv[:2] == ["spotstart", "guard"] and argv[argv.index("--") + 1 :] == list(
            cfg.server_command
        )
        # the grace period is within the kcloud's notice and is the guard's termination window
        grace = pod["terminationGracePeriodSeconds"]
        assert grace == cfg.notice_window_s <= NOTICE_WINDOW_S[kcloud]  # type: ignore[index]
        assert argv[argv.index("--termination-window") + 1] == str(grace)
        margin = int(argv[argv.index("--safety-margin") + 1])
        assert 0 < margin <= max(1, grace // 5)
        # probes point at the guard's own endpoints, on the port the guard listens on
        assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert server["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
        assert server["ports"][0]["containerPort"] == GUARD_PORT
        assert argv[argv.index("--listen") + 1] == f"0.0.0.0:{GUARD_PORT}"
        # spread over every zone given, and only those
        (spread,) = pod["topologySpreadConstraints"]
        assert spread["topologyKey"] == ZONE_LABEL
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (zones,) = [
            e for e in terms["nodeSelectorTerms"][0]["matchExpressions"] if e["key"] == ZONE_LABEL
        ]
        assert zones["values"] == list(cfg.zones)
        assert server["resources"]["limits"]["nvidia.com/gpu"] == str(cfg.gpu_count)
        env = {e["name"]: e for e in server["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == "/spotstart/metrics"
        assert ("initContainers" in pod) == (cfg.weights == "init" or cfg.peers is not None)
        inits = {c["name"]: c for c in pod.get("initContainers", [])}
        assert ("fetch-weights" in inits) == (cfg.weights == "init")
        # the server runs the user's image; fetch and the peer sidecar the spotstart image
        assert server["image"] == cfg.image
        assert {c["image"] for c in inits.values()} <= {SPOTSTART_IMAGE}
        if cfg.peers:
            # the sidecar starts first and stays; every fetch and load is told the peers
            sidecar = pod["initContainers"][0]
            assert sidecar["name"] == "serve-peers" and sidecar["restartPolicy"] == "Always"
            assert sidecar["command"][:3] == ["spotstart", "serve-peers", "/weights"]
            dns = f"dns:{cfg.name}-peers.{cfg.namespace}.svc.cluster.local:8471"
            assert env["SPOTSTART_PEERS"]["value"] == dns
            if cfg.weights == "init":
                fetch = inits["fetch-weights"]["command"]
                assert fetch[fetch.index("--peers") + 1] == dns
            # every peer container (server and clients) has the token from the Secret, or,
            # opted out, the server says --no-token and nobody has a token
            for c in peer_containers(pod):
                assert token_ref(c) == (cfg.peers.token_secret if cfg.peers.token else None)
            assert ("--no-token" in sidecar["command"]) == (not cfg.peers.token)
        else:
            assert "serve-peers" not in inits and "SPOTSTART_PEERS" not in env
            assert "SPOTSTART_PEER_TOKEN" not in json.dumps(pod)
        # the guard marks its own pod: the pods run as the ServiceAccount the RBAC is for
        assert pod["serviceAccountName"] == cfg.name
    (binding,) = [
        o
        for o in objs
        if o["kind"] == "RoleBinding" and o["roleRef"]["name"] == f"{cfg.name}-mark-own-pod"
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": cfg.name, "namespace": cfg.namespace}
    ]
    (vap,) = [o for o in objs if o["kind"] == "ValidatingAdmissionPolicy"]
    assert f"system:serviceaccount:{cfg.namespace}:{cfg.name}" in json.dumps(vap)
    headless = [o for o in objs if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None"]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert not [o for o in objs if o["kind"] == "Secret"]  # never a secret in the manifests
    if cfg.peers:
        (policy,) = policies
        check_peer_policy(policy, deployments, controller, cfg.port)
        (svc,) = headless
        assert svc["metadata"]["name"] == f"{cfg.name}-peers"
        assert svc["spec"]["publishNotReadyAddresses"] is True
        labels = deployments[0]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert svc["spec"]["ports"][0]["targetPort"] == "peers"
    else:
        assert not headless and not policies
    by_name = {d["metadata"]["name"]: d for d in deployments}
    assert by_name[f"{cfg.name}-spot"]["spec"]["replicas"] == cfg.replicas
    assert by_name[f"{cfg.name}-ondemand"]["spec"]["replicas"] == 0


BASE: dict[str, Any] = {
    "name": "m",
    "model_url": "gs://b/m/",
    "image": "i",
    "server": {"command": ["serve"]},
    "gpu": {"type": "nvidia-t4"},
    "replicas": 2,
    "zones": ["us-central1-a"],
    "eks": {"cluster_name": "c"},
}


@pytest.mark.parametrize(
    ("change", "kcloud", "needle"),
    [
        ({"colour": "blue"}, "gke", "unknown key 'colour'"),
        ({"server": {"command": ["s"], "helth_path": "/h"}}, "gke", "unknown key 'helth_path'"),
        ({"notice_window_seconds": 30}, "gke", "more than gke gives a spot pod (15 s)"),
        ({"notice_window_seconds": 120}, "eks", "more than eks gives"),
        ({"zones": []}, "gke", "at least one zone"),
        ({"gpu": {"type": "nvidia-b999"}}, "gke", "unknown GPU 'nvidia-b999'"),
        ({"gpu": {"type": "nvidia-l4"}}, "aks", "nvidia-l4 is not offered on aks"),
        ({"replicas": 0}, "gke", "replicas"),
        ({"name": "Bad_Name"}, "gke", "lowercase letters"),
        ({"eks": {}}, "eks", "eks.cluster_name"),
        ({"zones": ["a-1", "a-1"]}, "gke", "listed twice"),
        ({"peers": True, "port": 8471}, "gke", "8471 is the peer sidecar's port"),
        ({"port": 8080}, "gke", "8080 is the guard's port"),
        ({"peers": "yes"}, "gke", "peers: 'yes'"),
        ({"peers": {"tokn": False}}, "gke", "unknown key 'tokn'"),
        ({"peers": {"token": "no"}}, "gke", "peers.token: 'no': true or false"),
        ({"peers": {"token_secret": "Peer_Token"}}, "gke", "peers.token_secret: 'Peer_Token'"),
        ({"peers": {"token_secret": "a b; rm -rf ~"}}, "eks", "peers.token_secret"),
        ({"peers": {"token": False, "token_secret": "t"}}, "aks", "given with token: false"),
    ],
)
def test_bad_configs_are_refused_with_the_key_and_the_fix(
    change: dict[str, Any], kcloud: str, needle: str
) -> None:
    with pytest.raises(DeployConfigError, match="deploy config") as caught:
        parse_config({**BASE, **change}, kcloud)  # type: ignore[arg-type]
    assert needle in str(caught.value)


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "deploy.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "notice_window_seconds": 31}))
    res = run_cli(["k8s", "render", "--config", str(bad), "--cloud", "aks"])
    assert res.code == 2
    assert "notice_window_seconds" in error_line(res.stderr)


def rendered(tmp_path: Path, config: Path, kcloud: str, env: dict[str, str] | None = None) -> Any:
    """`spotstart k8s render -o DIR` as a user runs it: (result, objects, text of the files)."""
    out = tmp_path / f"out-{kcloud}"
    res = run_cli(
        ["k8s", "render", "--config", str(config), "--cloud", kcloud, "-o", str(out)], env=env
    )
    assert res.code == 0, res.stderr
    files = sorted(out.iterdir())
    objs = [yaml.safe_load(p.read_text()) for p in files if p.suffix == ".yaml"]
    return res, objs, {p.name: p.read_text() for p in files}


def model_pods(objs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [
        o["spec"]["template"]["spec"]
        for o in objs
        if o["kind"] == "Deployment"
        and o["metadata"]["name"] in (f"{name}-spot", f"{name}-ondemand")
    ]


@pytest.mark.parametrize("kcloud", CLOUDS)
def test_with_peers_every_peer_container_takes_the_token_from_a_secret_and_no_token_is_written(
    kcloud: str, tmp_path: Path
) -> None:
    # a token in the user's shell must not find its way into the manifests
    leaked = "do-not-render-3f9a1c"
    res, objs, texts = rendered(tmp_path, EXAMPLE, kcloud, env={"SPOTSTART_PEER_TOKEN": leaked})
    assert not [t for t in [res.stdout, res.stderr, *texts.values()] if leaked in t]
    assert not [o for o in objs if o["kind"] == "Secret"]
    validate_core(objs)
    pods = model_pods(objs, "llama-8b")
    assert len(pods) == 2
    for pod in pods:
        containers = peer_containers(pod)
        # the sidecar that serves, the init fetch and the server (in-process loads) that read
        assert {c["name"] for c in containers} == {"serve-peers", "fetch-weights", "server"}
        assert {token_ref(c) for c in containers} == {"llama-8b-peer-token"}
        for c in [*pod["initContainers"], *pod["containers"]]:
            assert "--no-token" not in c["command"]
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["namespace"] == "serving"
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    controller = next(d for d in deployments if d["metadata"]["name"] == "llama-8b-controller")
    check_peer_policy(
        policy, [d for d in deployments if d is not controller], controller, server_port=8000
    )
    # where the cluster does not enforce NetworkPolicy, the comment says so for this cloud
    enforced = {"gke": "Dataplane V2", "eks": "enableNetworkPolicy", "aks": "--network-policy"}
    assert enforced[kcloud] in " ".join(texts["networkpolicy-peers.yaml"].split())
    # the one command that creates the Secret: on stderr, and whole in the peers' Service file
    command = peer_token_command(load_config(EXAMPLE, kcloud))  # type: ignore[arg-type]
    assert command is not None and res.stderr.strip().splitlines()[-1] == command
    assert f"#   {command}\n" in texts["service-peers.yaml"]


@pytest.mark.parametrize("token", [True, False])
def test_rendered_peer_commands_are_ones_the_cli_takes(token: bool) -> None:
    from spotstart.cli.main import build_parser

    cfg = parse_config({**BASE, "peers": {"token": token}}, "gke")
    (pod, _) = model_pods([m.obj for m in render(cfg, "gke")], cfg.name)
    inits = {c["name"]: c["command"] for c in pod["initContainers"]}
    serve = build_parser().parse_args(inits["serve-peers"][1:])
    assert serve.peer_token_file is None  # the token comes from $SPOTSTART_PEER_TOKEN
    assert serve.no_token is not token  # the opt-out only where the config says so
    fetch = build_parser().parse_args(inits["fetch-weights"][1:])
    assert fetch.peer_token_file is None and not fetch.serve_peers


def fake_bin(tmp_path: Path, scripts: dict[str, str]) -> str:
    """A PATH whose first directory holds these small shell scripts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        script = bin_dir / name
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def test_the_printed_command_creates_the_secret_with_a_fresh_random_token_never_in_argv(
    tmp_path: Path,
) -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None and shutil.which("openssl") is not None
    cfg = parse_config({**BASE, "namespace": "ml", "peers": {"token_secret": "m.tok"}}, "gke")
    command = peer_token_command(cfg)
    assert command is not None
    argv_log = tmp_path / "argv"
    # the real kubectl, asked not to contact a cluster; every argv it got is recorded
    path = fake_bin(
        tmp_path,
        {
            "kubectl": f'printf "%s\\n" "$@" >> {argv_log}\n'
            f'exec {kubectl} "$@" --dry-run=client -o json\n'
        },
    )
    tokens = []
    for _ in range(2):
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            env={"PATH": path, "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        secret = json.loads(done.stdout)
        assert (secret["kind"], secret["metadata"]) == (
            "Secret",
            {"name": "m.tok", "namespace": "ml", "creationTimestamp": None},
        )
        assert set(secret["data"]) == {"token"}
        token = base64.b64decode(secret["data"]["token"]).decode()
        assert len(token) == 64 and set(token) <= set("0123456789abcdef")  # 256 bits, no "\n"
        tokens.append(token)
    assert tokens[0] != tokens[1]
    assert not [t for t in tokens if t in argv_log.read_text()]
    assert tokens[0] not in command


def test_the_printed_command_creates_no_secret_when_no_token_could_be_made(
    tmp_path: Path,
) -> None:
    cfg = parse_config({**BASE, "peers": True}, "gke")
    command = peer_token_command(cfg)
    assert command is not None
    ran = tmp_path / "kubectl-ran"
    path = fake_bin(
        tmp_path,
        {
            "openssl": "echo 'openssl: not today' >&2\nexit 1\n",
            "kubectl": f"touch {ran}\ncat >/dev/null\n",
        },
    )
    done = subprocess.run(
        ["/bin/sh", "-c", command],
        env={"PATH": path, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # no Secret with an empty token (the pods would then start with none)
    assert done.returncode != 0 and not ran.exists()


def test_peers_token_false_renders_no_token_and_no_secret_and_says_so_loudly(
    tmp_path: Path,
) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({**BASE, "namespace": "ml", "peers": {"token": False}}))
    res, objs, texts = rendered(tmp_path, config, "aks")
    validate_core(objs)
    assert "secretKeyRef" not in "".join(texts.values())
    assert "SPOTSTART_PEER_TOKEN" not in "".join(texts.values())
    for pod in model_pods(objs, "m"):
        (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "serve-peers"]
        assert sidecar["command"][-1] == "--no-token"
        assert all(token_ref(c) is None for c in peer_containers(pod))
    # the NetworkPolicy is then the only lock, and still there
    assert [o["metadata"]["name"] for o in objs if o["kind"] == "NetworkPolicy"] == ["m-peers"]
    assert "\n# WARNING: NO TOKEN (peers: {token: false})" in texts["service-peers.yaml"]
    assert "warning: peers.token is false" in res.stderr
    assert "kubectl create secret" not in res.stderr


def test_without_peers_there_is_no_network_policy_no_token_and_no_note(tmp_path: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({**BASE, "peers": False}))
    res, objs, texts = rendered(tmp_path, config, "eks")
    assert not [o for o in objs if o["kind"] in ("NetworkPolicy", "Secret")]
    assert "SPOTSTART_PEER_TOKEN" not in "".join(texts.values())
    assert res.stderr == ""
