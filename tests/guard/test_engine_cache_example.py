"""`spotstart guard --engine-cache URL -- tiny_llm_server.py --compile` (the example server
with its forward pass through torch.compile: inductor C++ kernels on the CPU) and the emulated
cloud's GCS bucket: the same three starts as tests/engines/test_engine_cache_vllm.py.

1. cold: a miss; the server compiles; the guard publishes what it wrote.
2. a node whose cache directory is empty (the same path): the guard restores start 1's cache
   (``hit``, the same key); the server loads the restored kernels (none written after the
   restore) and answers the same greedy tokens; nothing is published again.
3. another key (``--engine-cache-key-extra``): a miss; it compiles cold and never restores.

The greedy tokens are also those of the server without ``--compile``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotstart.emulate.storage import StorageEmulator
from tests.conftest import BUCKET, isolated_environ
from tests.engines.guard_load import server_group_killed

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from spotstart.examples import tiny_llm_server  # noqa: E402  (needs torch)

SERVER = Path(tiny_llm_server.__file__)
PROMPT = [5, 17, 3, 99, 42]
TOKENS = 6


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ok(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 600) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready:\n{log.read_text()[-4000:]}")


def generate(port: int) -> list[int]:
    import urllib.request

    body = json.dumps({"tokens": PROMPT, "max_tokens": TOKENS}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/generate", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        tokens: list[int] = json.loads(resp.read())["tokens"]
    assert len(tokens) == TOKENS
    return tokens


class Proc:
    """A process in its own session, its output in ``log``, killed (group) at exit."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self.proc

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait(30)


def events_of(path: Path, phase: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in lines if e.get("phase") == phase]


def wait_event(path: Path, phase: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not events_of(path, phase):
        if proc.poll() is not None:
            raise AssertionError(f"guard exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)
    assert events_of(path, phase), log.read_text()[-4000:]


def kernels(root: Path) -> dict[str, os.stat_result]:
    """Inductor's compiled kernels (``*.so``) beneath the cache root, by relative path."""
    return {str(p.relative_to(root)): p.stat() for p in root.rglob("*.so") if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    out = tmp_path_factory.mktemp("tiny-ckpt")
    tiny_llm_server.make_checkpoint(out, hidden=128, intermediate=256, layers=2, vocab=1000)
    yield out.as_uri() + "/"


def server_argv(model: str, port: int, cache: Path, *flags: str) -> list[str]:
    argv = [sys.executable, "-P", str(SERVER), "--model", model, "--port", str(port)]
    return [*argv, "--cache-dir", str(cache), *flags]


def start(
    model: str,
    cloud: StorageEmulator,
    url: str,
    cache_dir: Path,
    work: Path,
    name: str,
    *extra: str,
) -> tuple[list[int], Path]:
    port, listen = free_port(), free_port()
    weights = work / "weights"
    shutil.rmtree(weights, ignore_errors=True)
    events = work / f"{name}.events.jsonl"
    log = work / f"{name}.log"
    argv = [
        sys.executable,
        "-m",
        "spotstart",
        "guard",
        "--upstream",
        f"http://127.0.0.1:{port}",
        "--listen",
        f"127.0.0.1:{listen}",
        "--health-interval",
        "0.2",
        "--cloud",
        "none",
        "--events",
        str(events),
        "--engine-cache",
        url,
        "--engine-cache-dir",
        str(cache_dir),
        *extra,
        "--",
        # the same weights path on every node (the argv is in the key): emptied, a fresh disk
        *server_argv(model, port, weights, "--compile"),
    ]
    env = isolated_environ() | cloud.env_for_gcs() | {"PYTHONSAFEPATH": "1"}
    with server_group_killed(log), Proc(argv, env, log) as guard:
        wait_ok(f"http://127.0.0.1:{listen}/health", guard, log)
        tokens = generate(listen)
        wait_event(events, "engine-cache-restore", guard, log)
        if events_of(events, "engine-cache-restore")[0]["outcome"] != "hit":
            wait_event(events, "engine-cache-publish", guard, log)
    return tokens, events


@pytest.mark.timeout(900)
def test_the_example_servers_compile_cache_travels_to_a_fresh_node_and_another_key_misses(
    checkpoint: str, cloud: StorageEmulator, tmp_path: Path
) -> None:
    # the answer without torch.compile (no guard, no compile: seconds)
    port = free_port()
    plain_log = tmp_path / "plain.log"
    with Proc(
        server_argv(checkpoint, port, tmp_path / "plain-weights"), isolated_environ(), plain_log
    ) as plain:
        wait_ok(f"http://127.0.0.1:{port}/health", plain, plain_log)
        eager = generate(port)

    url = f"gs://{BUCKET}/engine-cache-{tmp_path.name}/"
    node = tmp_path / "node" / "engine-cache"
    tokens1, events1 = start(checkpoint, cloud, url, node, tmp_path, "cold")
    assert tokens1 == eager
    restore1 = events_of(events1, "engine-cache-restore")
    assert [e["outcome"] for e in restore1] == ["miss"], restore1
    key = restore1[0]["key"]
    published = events_of(events1, "engine-cache-publish")
    assert [(e["outcome"], e["key"]) for e in published] == [("published", key)], published
    compiled = kernels(node)
    assert compiled, "torch.compile wrote no kernel beneath the cache root"

    shutil.rmtree(node)  # another node: the same path, nothing on its disk
    tokens2, events2 = start(checkpoint, cloud, url, node, tmp_path, "warm")
    restore2 = events_of(events2, "engine-cache-restore")
    assert [(e["outcome"], e["key"]) for e in restore2] == [("hit", key)], restore2
    assert tokens2 == eager
    after = kernels(node)
    assert set(after) >= set(compiled), sorted(set(compiled) - set(after))
    rewritten = [p for p in compiled if after[p].st_ctime > restore2[0]["end"] + 1.0]
    assert not rewritten, rewritten
    assert not [
        e for e in events_of(events2, "engine-cache-publish") if e["outcome"] == "published"
    ]

    other = tmp_path / "node3" / "engine-cache"
    tokens3, events3 = start(
        checkpoint, cloud, url, other, tmp_path, "other-key", "--engine-cache-key-extra", "v2"
    )
    restore3 = events_of(events3, "engine-cache-restore")
    assert [e["outcome"] for e in restore3] == ["miss"], restore3
    assert restore3[0]["key"] != key
    assert tokens3 == eager
    assert kernels(other)
    assert all(s.st_ctime >= restore3[0]["end"] - 1.0 for s in kernels(other).values())
