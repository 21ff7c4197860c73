"""The pod `spotstart k8s render` writes for vLLM, run here for real: a `load_format:
spotstart` config rendered for GKE, its init container's command (config and tokenizer
only), then its server container's command (the guard in front of vLLM, weights streamed
from the bucket through the loader plugin into the pod's weights dir). Only what a node
gives a pod differs: paths, ports, the metadata cloud (none here: a SIGTERM is the notice),
the interpreter that has vLLM, and the emulator's endpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from spotstart.emulate.storage import StorageEmulator
from spotstart.k8s import parse_config, render
from tests.conftest import BUCKET
from tests.engines import kit


def rendered_pod(model_url: str) -> dict[str, Any]:
    raw = {
        "name": "tiny",
        "model_url": model_url,
        "image": "example.com/serving:1",
        "server": {
            "engine": "vllm",
            "load_format": "spotstart",
            "served_model_name": kit.MODEL_NAME,
            "args": ["--max-model-len", "2048", "--enforce-eager"],
        },
        "gpu": {"type": "nvidia-l4"},
        "replicas": 1,
        "zones": ["us-central1-a"],
    }
    objs = [m.obj for m in render(parse_config(raw, "gke"), "gke")]
    spot = next(
        o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "tiny-spot"
    )
    pod: dict[str, Any] = spot["spec"]["template"]["spec"]
    return pod


def on_this_node(argv: list[str], sub: dict[str, str], weights: Path) -> list[str]:
    """The container's argv with what the node gives it: our interpreters, paths and ports."""
    out = []
    for arg in argv:
        if arg in sub:
            out.append(sub[arg])
        elif arg.startswith("{"):  # the loader's JSON: its cache_dir is the pod's weights dir
            settings = json.loads(arg)
            settings["cache_dir"] = str(weights)
            out.append(json.dumps(settings))
        else:
            out.append(arg)
    if out[0] == "spotstart":
        out[:1] = [sys.executable, "-m", "spotstart"]
    return out


def test_the_rendered_vllm_pod_loads_from_the_bucket_serves_and_drains(
    engine_python: Path,
    tiny_llama: Path,
    engine_cache: dict[str, str],
    cloud: StorageEmulator,
    tmp_path: Path,
) -> None:
    files = {p.name: p for p in tiny_llama.iterdir() if p.is_file()}
    cloud.seed_gcs(BUCKET, {f"pod/{name}": path for name, path in files.items()})
    pod = rendered_pod(f"gs://{BUCKET}/pod/")
    (init,) = pod["initContainers"]
    server = next(c for c in pod["containers"] if c["name"] == "server")
    assert init["name"] == "fetch-config"
    assert "--exclude" in init["command"]
    assert "--load-format" in server["command"] and "spotstart" in server["command"]
    probe = server["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz"

    weights = tmp_path / "weights"
    weights.mkdir()
    guard_port, vllm_port = kit.free_port(), kit.free_port()
    sub = {
        "/weights": str(weights),
        "python3": str(engine_python),
        "gce": "none",
        "0.0.0.0:8080": f"127.0.0.1:{guard_port}",
        "8000": str(vllm_port),
        "http://127.0.0.1:8000": f"http://127.0.0.1:{vllm_port}",
    }
    env = kit.engine_env(engine_cache, STORAGE_EMULATOR_HOST=cloud.gcs.endpoint)
    fetched = subprocess.run(
        on_this_node(init["command"], sub, weights), env=env, capture_output=True, text=True
    )
    assert fetched.returncode == 0, fetched.stderr
    assert not list(weights.glob("*.safetensors"))  # config and tokenizer only
    assert (weights / "config.json").read_bytes() == files["config.json"].read_bytes()

    argv = on_this_node(server["command"], sub, weights)
    with kit.Engine(argv, env, tmp_path / "pod.log") as pod_proc:
        pod_proc.wait_ready(f"http://127.0.0.1:{guard_port}/readyz", timeout_s=600)
        status, body = kit.post_json(
            f"http://127.0.0.1:{guard_port}/v1/completions",
            {"model": kit.MODEL_NAME, "prompt": "spot node", "max_tokens": 8, "temperature": 0},
        )
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] == "length"
        # the weights were written through to the pod's weights dir, verified, for a restart
        # of the container (and for the serve-peers sidecar)
        assert (
            files["model.safetensors"].read_bytes() == (weights / "model.safetensors").read_bytes()
        )
        assert pod_proc.proc is not None
        pod_proc.proc.send_signal(signal.SIGTERM)  # the kubelet's notice
        assert pod_proc.wait(60) == 0
        log = pod_proc.log()
    assert "config.json matches the source" in log
    assert "1 accepted" in log and "0 dropped" in log, log[-3000:]
