"""`spotstart k8s render`: the containers that run the spotstart image (the fetch init
container, the serve-peers sidecar, the controller) run as its uid 65532, non-root, with a
read-only root, no capabilities, RuntimeDefault seccomp and their own /tmp; the server's
container keeps its image's user; the weights volume (and the controller's trace volume) belong
to group 65532. `controller: {record_trace: ...}` makes the controller record onto a volume.
Every object still validates (kubernetes-validate --strict). And the rendered fetch and
serve-peers commands run under a read-only root as uid 65532 (bubblewrap), writing only the
weights volume."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotstart.cli.main import build_parser
from spotstart.k8s import CLOUDS, DeployConfigError, parse_config, render
from spotstart.k8s.config import SPOTSTART_IMAGE, Cloud
from spotstart.k8s.render import TMP_DIR, TRACE_DIR, WEIGHTS_DIR
from tests.conftest import error_line, run_cli
from tests.k8s.test_render import BASE, EXAMPLE, validate_core

SECURE = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
VARIANTS: list[dict[str, Any]] = [
    {},  # init fetch, no peers
    {"peers": True},
    {"peers": {"token": False}, "weights": "in-process"},
    {
        "server": {"engine": "vllm", "load_format": "spotstart"},
        "peers": True,
        "controller": {"record_trace": {"volume": "llm-traces", "gap_seconds": 30}},
    },
    {"controller": {"record_trace": True}},
]


def pods(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Deployment"]


def controller_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (pod,) = [
        o["spec"]["template"]["spec"]
        for o in objs
        if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-controller")
    ]
    return pod


def mounted(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume ``container`` has at ``path`` (asserting there is one, writable)."""
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert not mount.get("readOnly")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


@pytest.mark.parametrize("kcloud", CLOUDS)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_spotstart_containers_are_locked_down_and_the_server_is_left_alone(
    kcloud: Cloud, variant: int
) -> None:
    cfg = parse_config({**BASE, **VARIANTS[variant]}, kcloud)
    objs = [m.obj for m in render(cfg, kcloud)]
    validate_core(objs)
    ours = 0
    for pod in pods(objs):
        # the volumes the spotstart containers write are group 65532's
        assert pod["securityContext"]["fsGroup"] == 65532
        assert "runAsUser" not in pod["securityContext"]  # the server's user is its image's
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            if c["image"] == SPOTSTART_IMAGE:
                ours += 1
                assert c["securityContext"] == SECURE, c["name"]
                # its own /tmp: an emptyDir, never the node's
                assert "emptyDir" in mounted(pod, c, TMP_DIR)
                if c["name"] != "controller":
                    assert mounted(pod, c, WEIGHTS_DIR) == {"name": "weights", "emptyDir": {}}
            else:
                assert c["name"] == "server" and c["image"] == "i"
                assert "securityContext" not in c  # as the user's image says (may be root)
    streamed = cfg.vllm is not None and cfg.vllm.load_format == "spotstart"
    init = (cfg.peers is not None) + (cfg.weights == "init" or streamed)
    assert ours == 1 + 2 * init  # the controller, each model pod's init containers


@pytest.mark.parametrize("kcloud", CLOUDS)
@pytest.mark.parametrize(
    ("record", "volume"),
    [
        ({"volume": "llm-traces", "gap_seconds": 30}, {"persistentVolumeClaim": {"claimName": "llm-traces"}}),  # noqa: E501
        ({"volume": "emptyDir"}, {"emptyDir": {}}),
        (True, {"emptyDir": {}}),
    ],
)  # fmt: skip
def test_the_controller_records_onto_its_volume(
    kcloud: Cloud, record: Any, volume: dict[str, Any]
) -> None:
    cfg = parse_config({**BASE, "controller": {"record_trace": record}}, kcloud)
    objs = [m.obj for m in render(cfg, kcloud)]
    validate_core(objs)
    pod = controller_pod(objs)
    (c,) = pod["containers"]
    assert mounted(pod, c, TRACE_DIR) == {"name": "trace", **volume}
    assert pod["securityContext"]["fsGroup"] == 65532  # the claim is made writable by 65532
    # flags the controller takes, meaning what the config said
    args = build_parser().parse_args(c["command"][1:])
    gap = record["gap_seconds"] if isinstance(record, dict) and "gap_seconds" in record else 60
    assert (args.record_trace, args.record_gap) == (TRACE_DIR, gap)
    from spotstart.cli.k8s_cmd import controller_config

    assert controller_config(args).record_dir == TRACE_DIR


@pytest.mark.parametrize("kcloud", CLOUDS)
@pytest.mark.parametrize("controller", [None, {}, {"record_trace": False}])
def test_without_record_trace_nothing_is_recorded(kcloud: Cloud, controller: Any) -> None:
    raw = {**BASE} if controller is None else {**BASE, "controller": controller}
    objs = [m.obj for m in render(parse_config(raw, kcloud), kcloud)]
    pod = controller_pod(objs)
    assert "--record-trace" not in pod["containers"][0]["command"]
    assert [v["name"] for v in pod["volumes"]] == ["spotstart-tmp"]


@pytest.mark.parametrize(
    ("controller", "needle"),
    [
        ("yes", "controller: 'yes': a mapping"),
        ({"record": True}, "unknown key 'record'"),
        ({"record_trace": "pvc"}, "controller.record_trace: 'pvc': true, false or"),
        ({"record_trace": {"volume": "Traces_1"}}, "record_trace.volume: 'Traces_1'"),
        ({"record_trace": {"volume": "a" * 254}}, "record_trace.volume"),
        ({"record_trace": {"volume": "../x"}}, "record_trace.volume: '../x'"),
        ({"record_trace": {"volume": 7}}, "record_trace.volume: '7'"),
        ({"record_trace": {"gap_seconds": 0}}, "record_trace.gap_seconds: 0 is not an integer"),
        ({"record_trace": {"gap_seconds": 86401}}, "record_trace.gap_seconds: 86401"),
        ({"record_trace": {"gap_seconds": 1.5}}, "record_trace.gap_seconds"),
        ({"record_trace": {"gap_seconds": True}}, "record_trace.gap_seconds"),
        ({"record_trace": {"gap": 60}}, "unknown key 'gap'"),
    ],
)
def test_bad_controller_configs_are_refused(controller: Any, needle: str) -> None:
    with pytest.raises(DeployConfigError, match="deploy config") as caught:
        parse_config({**BASE, "controller": controller}, "gke")
    assert needle in str(caught.value)


def test_cli_bad_record_trace_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "deploy.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "controller": {"record_trace": {"volume": "A"}}}))
    res = run_cli(["k8s", "render", "--config", str(bad), "--cloud", "gke"])
    assert res.code == 2
    assert "controller.record_trace.volume" in error_line(res.stderr)


def test_the_example_renders_every_spotstart_container_locked_down(tmp_path: Path) -> None:
    res = run_cli(
        ["k8s", "render", "--config", str(EXAMPLE), "--cloud", "gke", "-o", str(tmp_path)]
    )
    assert res.code == 0, res.stderr
    objs = [yaml.safe_load(p.read_text()) for p in sorted(tmp_path.glob("*.yaml"))]
    containers = [
        c for pod in pods(objs) for c in [*pod.get("initContainers", []), *pod["containers"]]
    ]
    names = sorted(c["name"] for c in containers if c.get("securityContext") == SECURE)
    assert names == ["controller", "fetch-weights", "fetch-weights", "serve-peers", "serve-peers"]


# --- the rendered commands under a read-only root, as uid 65532 ---------------------------


def _beneath_tmp() -> set[Path]:
    """The venv (its scripts, an editable install's source) and the checkout, where /tmp holds
    them: the sandbox's own /tmp would hide them."""
    here = Path(__file__).resolve().parents[2]
    paths = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), here}
    tmp = Path("/tmp").resolve()
    return {p for p in paths if p.is_relative_to(tmp)}


def sandbox(tmp_path: Path) -> list[str]:
    """bubblewrap: the host's root read-only, uid/gid 65532, a fresh /tmp; /mnt/weights the
    only other writable path (the pod's emptyDir), the model read-only at /mnt/src."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    (tmp_path / "weights").mkdir()
    (tmp_path / "src").mkdir()
    argv = [
        bwrap, "--unshare-user", "--uid", "65532", "--gid", "65532", "--ro-bind", "/", "/",
        "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/mnt",
        "--bind", str(tmp_path / "weights"), "/mnt/weights",
        "--ro-bind", str(tmp_path / "src"), "/mnt/src", "--remount-ro", "/mnt",
        # this checkout and its venv, where they lie beneath the fresh /tmp (a clone in /tmp)
        *[
            a
            for d in sorted(_beneath_tmp())
            for a in ("--ro-bind", str(d), str(d))
        ],
        "--setenv", "HOME", "/nonexistent",
        "--setenv", "PATH", f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "--",
    ]  # fmt: skip
    probe = subprocess.run([*argv, "id", "-u"], capture_output=True, text=True, check=False)
    if probe.returncode != 0 or probe.stdout.strip() != "65532":
        pytest.skip(f"bubblewrap cannot make a user namespace here: {probe.stderr.strip()}")
    return argv


def rendered_command(objs: list[dict[str, Any]], name: str) -> list[str]:
    for pod in pods(objs):
        for c in pod.get("initContainers", []):
            if c["name"] == name:
                return [
                    "/mnt/weights" if a == WEIGHTS_DIR else a for a in c["command"]
                ]  # the sandbox's mount point (the host's root has no /weights)
    raise AssertionError(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fetch_and_serve_peers_run_with_a_read_only_root_as_65532(tmp_path: Path) -> None:
    box = sandbox(tmp_path)
    (tmp_path / "src" / "config.json").write_text("{}")
    (tmp_path / "src" / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    cfg = parse_config({**BASE, "model_url": "file:///mnt/src/", "peers": {"token": False}}, "gke")
    objs = [m.obj for m in render(cfg, "gke")]
    fetch = rendered_command(objs, "fetch-weights")
    fetch = fetch[: fetch.index("--peers")]  # no peers in the sandbox
    done = subprocess.run([*box, *fetch], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    got = tmp_path / "weights" / "model.safetensors"
    assert got.read_bytes() == (tmp_path / "src" / "model.safetensors").read_bytes()
    # nothing outside the weights volume could have been written: the root is read-only
    assert (
        "Read-only file system"
        in subprocess.run([*box, "touch", "/x"], capture_output=True, text=True, check=False).stderr
    )

    port = free_port()
    serve = rendered_command(objs, "serve-peers")
    serve[serve.index("--listen") + 1] = f"127.0.0.1:{port}"
    log = tmp_path / "serve-peers.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*box, *serve], stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/inventory") as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.05)
        else:
            raise AssertionError("serve-peers never answered")
    finally:
        proc.terminate()
        proc.wait(10)
    assert "Traceback" not in log.read_text()


def test_the_example_names_the_images_container_builds_and_its_comments_parse() -> None:
    """examples/deploy.yaml names the server image container/Containerfile.vllm makes and
    (commented: the default) the one container/build.sh makes, at this version; the commented
    spotstart_image and controller keys are ones the config takes."""
    from spotstart.k8s.config import VLLM_SPOTSTART_IMAGE

    text = EXAMPLE.read_text()
    assert "example/" not in text
    raw = yaml.safe_load(text)
    assert raw["image"] == VLLM_SPOTSTART_IMAGE
    # uncomment the commented top-level keys (`# key:` at column 0 and what is indented under)
    lines, on = [], False
    for line in text.splitlines():
        if line.startswith("# ") and line[2:3].isalpha() and ":" in line.split()[1]:
            key = line.split()[1].rstrip(":")
            on = key in ("spotstart_image", "controller")
            line = line[2:] if on else line
        elif on and line.startswith("#   "):
            line = line[2:]
        elif on and not line.startswith("#    "):
            on = False
        lines.append(line)
    uncommented = yaml.safe_load("\n".join(lines))
    assert uncommented["spotstart_image"] == SPOTSTART_IMAGE
    cfg = parse_config(uncommented, "gke")
    assert cfg.spotstart_image == SPOTSTART_IMAGE
    assert cfg.record_trace is not None and cfg.record_trace.volume == "llama-8b-traces"
