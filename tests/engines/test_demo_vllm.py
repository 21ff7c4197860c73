"""`spotstart demo --engine vllm`, reduced (a 2-layer model, a short load, no single-stream
baseline), end to end as a user runs it: two vLLM replicas with ``--load-format spotstart``
behind ``spotstart guard``, OpenAI clients (plain and streaming), a GCE preemption notice, the
replacement taking the weights from the preempted node, vLLM's own phases in the timeline. No
request may be lost, and an aborted generation would count as lost (the clients' rule, tested
without an engine in tests/cli/test_demo.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_cli


# two vLLM starts (the first cold), 219 s here: more than the suite's default 300 s allows
# on a slower runner
@pytest.mark.timeout(660)
def test_the_reduced_vllm_demo_serves_through_a_preemption_and_loses_nothing(
    tmp_path: Path, engine_python: Path, engine_cache: dict[str, str]
) -> None:
    # the run's shared compile caches (kit.cache_env lays them out as the demo does)
    cache_root = Path(engine_cache["VLLM_CACHE_ROOT"]).parent
    res = run_cli(
        [
            "demo",
            "--engine",
            "vllm",
            "--engine-python",
            str(engine_python),
            "--engine-cache",
            str(cache_root),
            "--shards",
            "1",
            "--shard-mb",
            "8",
            "--no-baseline",
            "--small",
            "--serve-seconds",
            "4",
            "--json",
            "--workdir",
            str(tmp_path),
        ],
        timeout_s=600,
    )
    assert res.code == 0, res.stderr[-4000:]
    story = json.loads(res.stdout)["story"]
    assert story["engine"] == "vllm"
    assert story["requests_lost"] == 0, story["lost"]
    assert story["served_by"]["replica-a"] > 0 and story["served_by"]["replica-b"] > 0
    assert story["requests_streamed"] > 0
    assert story["same_answer_after_replacement"] is True
    assert story["replica_a_exit"] == 0 and story["replica_b_exit"] == 0
    phases = {(p["pod"], p["phase"]): p for p in story["phases"]}
    for pod in ("replica-a", "replica-b"):
        for phase in ("load", "server-start", "drain"):
            assert (pod, phase) in phases, (pod, phase, sorted(phases))
        # vLLM's own timing lines, read from its log
        assert any(p == pod and name.startswith("server:") for p, name in phases), pod
    assert "0 dropped" in phases[("replica-a", "drain")]["detail"]
    # A from the bucket; B's weights from A's peer server (its init fetch), then its vLLM
    # read them from its cache
    peers = story["weights_from_peers_mb"]
    assert peers.get("replica-a", 0) == 0 and peers["replica-b"] > 0, peers
    # the loader's own line in each vLLM's log: A read the bucket, B its cache
    cached = {
        pod: float(re.search(r"([\d.]+) MB from the cache", line)[1])  # type: ignore[index]
        for pod, line in story["loader_log"].items()
    }
    assert cached["replica-a"] == 0 and cached["replica-b"] > 0, story["loader_log"]
    assert Path(story["timeline"]["png"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(story["engine_cache"]) == cache_root
