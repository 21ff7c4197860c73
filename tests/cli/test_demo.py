"""`spotstart demo`, reduced (a tiny model, a short load), end to end as README command 1
runs it: the emulated cloud and metadata servers, the example server cold-started behind
guard, closed-loop load, a GCE preemption notice, the replacement taking the weights from
the preempted replica, the timeline files, the plan line. No request may be lost."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from spotstart.cli.demo_engine import ENV, ExampleServer, VllmServer, choose_engine
from spotstart.errors import UsageError
from tests.conftest import error_line, run_cli

no_vllm_here = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="this python has vLLM"
)


@no_vllm_here
def test_auto_without_a_vllm_runs_the_example_server() -> None:
    choice = choose_engine("auto", None, {})
    assert choice.name == "example" and "no vLLM found" in choice.why
    assert choose_engine("example", "/nowhere/python", {ENV: "/nowhere"}).name == "example"


@no_vllm_here
def test_a_named_python_without_vllm_is_an_error_even_under_auto(tmp_path: Path) -> None:
    import sys

    for requested in ("auto", "vllm"):
        with pytest.raises(UsageError, match=r"--engine-python .*: no vllm there"):
            choose_engine(requested, sys.executable, {})
        with pytest.raises(UsageError, match=rf"\${ENV} .*: no vllm there"):
            choose_engine(requested, None, {ENV: sys.executable})
    with pytest.raises(UsageError, match="not an executable file"):
        choose_engine("auto", str(tmp_path / "python"), {})
    with pytest.raises(UsageError, match="--engine vllm: no vLLM in this python"):
        choose_engine("vllm", None, {})


def _fake_python(path: Path, script: str) -> str:
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return str(path)


def test_a_vllm_without_spotstarts_entry_point_is_named_with_the_fix(tmp_path: Path) -> None:
    # what the probe prints for a venv whose spotstart is importable (PYTHONPATH) but not
    # installed: vLLM would never find --load-format spotstart there
    python = _fake_python(tmp_path / "python", "printf spotstart-vllm-plugin")
    with pytest.raises(UsageError, match=r"not installed .*pip install -e '\.\[vllm\]'"):
        choose_engine("vllm", python, {})
    broken = _fake_python(tmp_path / "broken", "echo 'ImportError: libfoo.so' >&2; exit 3")
    with pytest.raises(UsageError, match=r"exited 3 when asked for vLLM: ImportError: libfoo\.so"):
        choose_engine("auto", None, {ENV: broken})


@no_vllm_here
def test_the_cli_refuses_a_missing_engine_before_any_work(tmp_path: Path) -> None:
    res = run_cli(
        [
            "demo",
            "--engine",
            "vllm",
            "--engine-python",
            str(tmp_path / "none"),
            "--workdir",
            str(tmp_path / "w"),
        ],
        timeout_s=60,
    )
    assert res.code == 2
    assert "not an executable file" in error_line(res.stderr)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("status", "raw", "stream", "served"),
    [
        (200, b'{"choices":[{"text":"x","finish_reason":"length"}]}', False, True),
        # vLLM's SIGTERM: a 200 whose generation was cut
        (200, b'{"choices":[{"text":"x","finish_reason":"abort"}]}', False, False),
        (
            200,
            b'data: {"choices":[{"text":"a","finish_reason":null}]}\n\n'
            b'data: {"choices":[{"text":"","finish_reason":"abort"}]}\n\ndata: [DONE]\n\n',
            True,
            False,
        ),
        (
            200,
            b'data: {"choices":[{"text":"a","finish_reason":null}]}\n\n'
            b'data: {"choices":[{"text":"b","finish_reason":"length"}]}\n\ndata: [DONE]\n\n',
            True,
            True,
        ),
        (200, b'data: {"choices":[{"text":"a","finish_reason":null}]}\n\n', True, False),
        (500, b"cannot schedule new futures after shutdown", False, False),
        (200, b"<html>", False, False),
    ],
)
def test_a_vllm_answer_is_served_only_when_its_generation_finished(
    tmp_path: Path, status: int, raw: bytes, stream: bool, served: bool
) -> None:
    assert VllmServer("python", tmp_path).judge(status, raw, stream).served is served


def test_an_example_answer_short_of_its_tokens_is_lost() -> None:
    server = ExampleServer(Path("tiny_llm_server.py"))
    assert server.judge(200, b'{"tokens": [1, 2, 3, 4]}', False).served
    assert not server.judge(200, b'{"tokens": [1, 2]}', False).served
    assert not server.judge(200, b"data: 1\n\n", True).served


def test_the_tokenizer_covers_the_whole_vocabulary() -> None:
    from spotstart.cli.demo_model import SPECIAL, bpe_vocab, byte_alphabet

    assert len(set(byte_alphabet())) == 256
    vocab, merges = bpe_vocab(4096)
    assert sorted(vocab.values()) == list(range(4096))
    assert len(merges) == 4096 - 256 - len(SPECIAL)
    for left, right in merges:  # every merge joins two tokens that exist before it
        assert left in vocab and right in vocab and vocab[left + right] > vocab[left]


def test_the_reduced_demo_serves_through_a_preemption_and_loses_nothing(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    res = run_cli(
        [
            "demo",
            "--shards",
            "1",
            "--shard-mb",
            "8",
            "--no-baseline",
            "--small",
            "--engine",
            "example",
            "--serve-seconds",
            "2",
            "--json",
            "--workdir",
            str(tmp_path),
        ],
        timeout_s=600,
    )
    assert res.code == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    story = doc["story"]
    assert story["requests_lost"] == 0, story["lost"]
    assert story["served_by"]["replica-a"] > 0 and story["served_by"]["replica-b"] > 0
    assert story["requests_streamed"] > 0
    assert story["engine"] == "example"
    assert story["same_answer_after_replacement"] is True
    assert story["replica_a_exit"] == 0 and story["replica_b_exit"] == 0
    phases = {(p["pod"], p["phase"]): p for p in story["phases"]}
    for pod in ("replica-a", "replica-b"):
        for phase in ("load", "warmup", "server-start", "drain"):
            assert (pod, phase) in phases, (pod, phase)
    assert "0 MB from peers" in phases[("replica-a", "load")]["detail"]
    assert "0 MB from peers" not in phases[("replica-b", "load")]["detail"]  # from replica A
    assert "0 dropped" in phases[("replica-a", "drain")]["detail"]
    files = story["timeline"]
    assert Path(files["png"]).read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in Path(files["html"]).read_text()
    trace = json.loads(Path(files["trace"]).read_text())
    assert {e["pid"] for e in trace["traceEvents"]} == {"replica-a", "replica-b"}
    # with nothing beside the checkout: the synthetic trace fitted to the public one
    assert story["plan"].startswith("plan (a synthetic 9-zone trace fitted"), story["plan"]
    assert [r["run"] for r in doc["fetch"]][:2] == ["spotstart fetch", "again (cached)"]
