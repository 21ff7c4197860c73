"""vLLM's ``--load-format spotstart`` (spotstart.integrations.vllm) with a real vLLM: the tiny
Llama put in every emulated store (S3 on seaweedfs, GCS on fake-gcs-server, Azure on Azurite,
http on nginx, file://) and served by a peer; greedy completions and their logprobs equal to
the same vLLM loading the local directory with its own loader.

One vLLM process (offline ``vllm.LLM``, engine in-process) does it all, to stay cheap: a start
with vLLM's default loader (the reference), a start with ``load_format="spotstart"`` from S3
(the plugin entry point, the extra config, the config check), then for each other source a
reload of the weights (vLLM's ``reload_weights``) from a different model first (the outputs
must change: the reload is real) and then from that source through ``iter_tensors``. A second
test runs the documented command line: ``spotstart fetch URL DIR --exclude '*.safetensors'``,
then the OpenAI server with ``--load-format spotstart``."""

from __future__ import annotations

import json
import signal
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spotstart.emulate.azurite import Azurite
from spotstart.emulate.crosscheck import Nginx
from spotstart.emulate.storage import StorageEmulator
from tests.conftest import BUCKET, run_cli, spawn_cli
from tests.engines import kit

PROMPTS = ["Hello, my name is", "The spot node in zone", "weights preemption node"]
MAX_TOKENS = 12

SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, time
    from importlib.metadata import entry_points

    args = json.load(open(sys.argv[1]))
    names = [e.name for e in entry_points(group="vllm.general_plugins")]
    assert "spotstart" in names, f"no spotstart vllm.general_plugins entry point: {names}"
    from vllm import LLM, SamplingParams

    from spotstart.fetch import FetchConfig
    from spotstart.fetch.peers import PeerSpec
    from spotstart.weights.stream import iter_tensors

    sp = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], logprobs=2, seed=0)
    common = dict(max_model_len=512, enforce_eager=True, seed=0, max_num_seqs=4)

    def outs(llm):
        res = llm.generate(args["prompts"], sp, use_tqdm=False)
        return [
            {
                "tokens": list(r.outputs[0].token_ids),
                "logprobs": [
                    {str(k): v.logprob for k, v in step.items()} for step in r.outputs[0].logprobs
                ],
            }
            for r in res
        ]

    result = {}
    t = time.monotonic()
    llm = LLM(model=args["local"], **common)
    result["start_default_s"] = time.monotonic() - t
    result["ref"] = outs(llm)
    del llm
    gc.collect()
    t = time.monotonic()
    llm = LLM(
        model=args["config_dir"],
        load_format="spotstart",
        model_loader_extra_config=args["first_extra"],
        **common,
    )
    result["start_spotstart_s"] = time.monotonic() - t
    result["first"] = outs(llm)
    for name, url, peers in args["reloads"]:
        other_stream = iter_tensors(args["other"])
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": other_stream})
        other = outs(llm)
        peer_spec = PeerSpec(tuple(peers)) if peers else None
        config = FetchConfig(chunk_bytes=1 << 20, peers=peer_spec)
        stream = iter_tensors(url, config=config, window_bytes=args["window_bytes"])
        t = time.monotonic()
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        seconds = time.monotonic() - t
        result[name] = {
            "out": outs(llm),
            "other": other,
            "report": stream.report.to_json(),
            "peak": stream.bytes_held_peak,
            "seconds": seconds,
        }
    # vLLM's own in-place reload, no iterator given: the loader's get_all_weights (from S3)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter_tensors(args["other"])})
    result["reload_by_vllm_other"] = outs(llm)
    llm.collective_rpc("reload_weights")
    result["reload_by_vllm"] = outs(llm)
    json.dump(result, open(args["out"], "w"))
    """
)


@pytest.fixture(scope="module")
def other_llama(engine_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny Llama (another seed): what a reload loads first, so the next one shows."""
    return kit.make_tiny_llama(engine_python, tmp_path_factory.mktemp("other") / "model", seed=1)


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with Azurite(tmp_path_factory.mktemp("azurite")) as az:
        az.create_container(BUCKET)
        yield az


def model_files(model: Path) -> dict[str, Path]:
    return {p.name: p for p in model.iterdir() if p.is_file()}


def engine_env(engine_cache: dict[str, str], stores: dict[str, str]) -> dict[str, str]:
    # VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine in this process, so a reload is a call
    return kit.engine_env(engine_cache, **stores, VLLM_ENABLE_V1_MULTIPROCESSING="0")


def same_outputs(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    """Same greedy tokens; logprobs of the chosen and runner-up tokens equal to 1e-4."""
    for g, w in zip(got, want, strict=True):
        if g["tokens"] != w["tokens"]:
            return False
        for gs, ws in zip(g["logprobs"], w["logprobs"], strict=True):
            if set(gs) != set(ws) or any(abs(gs[k] - ws[k]) > 1e-4 for k in ws):
                return False
    return True


@dataclass
class Seeded:
    """The tiny Llama in every store; the environment that reaches them."""

    env: dict[str, str]
    urls: dict[str, str]
    config_dir: Path  # what `spotstart fetch URL DIR --exclude '*.safetensors'` left
    size: int


@pytest.fixture(scope="module")
def seeded(
    tiny_llama: Path,
    cloud: StorageEmulator,
    nginx: Nginx,
    azurite: Azurite,
    tmp_path_factory: pytest.TempPathFactory,
) -> Seeded:
    files = model_files(tiny_llama)
    cloud.seed_s3(BUCKET, {f"tiny/{n}": p for n, p in files.items()})
    cloud.seed_gcs(BUCKET, {f"tiny/{n}": p for n, p in files.items()})
    for n, p in files.items():
        azurite.put(BUCKET, f"tiny/{n}", p.read_bytes())
    nginx.seed({f"tiny/{n}": p.read_bytes() for n, p in files.items()})
    env = {
        **cloud.env_for_s3(),
        "STORAGE_EMULATOR_HOST": cloud.gcs.endpoint,
        **azurite.env,
    }
    urls = {
        "s3": f"s3://{BUCKET}/tiny/",
        "gcs": f"gs://{BUCKET}/tiny/",
        "azure": f"az://{BUCKET}/tiny/",
        "http": f"{nginx.endpoint}/tiny/model.safetensors",
        "file": f"file://{tiny_llama}/model.safetensors",
    }
    # The documented first step: the config and tokenizer, no weights, in the --model dir.
    config_dir = tmp_path_factory.mktemp("config-only") / "tiny"
    res = run_cli(["fetch", urls["s3"], str(config_dir), "--exclude", "*.safetensors"], env=env)
    assert res.code == 0, res.stderr
    assert (config_dir / "config.json").is_file() and (config_dir / "tokenizer.json").is_file()
    assert not list(config_dir.rglob("*.safetensors"))  # vLLM has no weights to read there
    return Seeded(env, urls, config_dir, files["model.safetensors"].stat().st_size)


@dataclass
class OfflineRun:
    result: dict[str, Any]
    log: str
    reloads: list[str]
    verified_by_fetch: dict[str, dict[str, int]]


@pytest.fixture(scope="module")
def offline(
    engine_python: Path,
    engine_cache: dict[str, str],
    tiny_llama: Path,
    other_llama: Path,
    seeded: Seeded,
    tmp_path_factory: pytest.TempPathFactory,
) -> OfflineRun:
    """The one vLLM process of the offline checks (see the module docstring)."""
    tmp = tmp_path_factory.mktemp("offline")
    # What fetch verifies for each store's weights: the stream must verify the same.
    verified = {}
    for name in ("s3", "gcs", "azure", "http"):
        url = seeded.urls[name]
        url = url if url.endswith(".safetensors") else url + "model.safetensors"
        res = run_cli(["fetch", url, str(tmp / name), "--json"], env=seeded.env)
        assert res.code == 0, res.stderr
        verified[name] = json.loads(res.stdout)["verified"]
    # A peer that holds the model (fetched from GCS), for the peer reload.
    res = run_cli(["fetch", seeded.urls["gcs"], str(tmp / "peer-node")], env=seeded.env)
    assert res.code == 0, res.stderr
    peer = spawn_cli(["serve-peers", str(tmp / "peer-node"), "--listen", "127.0.0.1:0", "--json"])
    try:
        assert peer.stdout is not None
        address = json.loads(peer.stdout.readline())["listen"]
        reloads = [(n, seeded.urls[n], []) for n in ("gcs", "azure", "http", "file")]
        reloads.append(("peer", seeded.urls["gcs"], [address]))
        args = {
            "local": str(tiny_llama),
            "config_dir": str(seeded.config_dir),
            "other": str(other_llama / "model.safetensors"),
            "first_extra": {"source": seeded.urls["s3"]},
            "reloads": reloads,
            "prompts": PROMPTS,
            "max_tokens": MAX_TOKENS,
            "window_bytes": 2 << 20,
            "out": str(tmp / "result.json"),
        }
        (tmp / "args.json").write_text(json.dumps(args))
        (tmp / "script.py").write_text(SCRIPT)
        argv = [str(engine_python), str(tmp / "script.py"), str(tmp / "args.json")]
        with kit.Engine(argv, engine_env(engine_cache, seeded.env), tmp / "vllm.log") as e:
            code = e.wait(480)
            log = e.log()
            assert code == 0, log[-6000:]
    finally:
        peer.send_signal(signal.SIGTERM)
        peer.communicate(timeout=10)
    result = json.loads((tmp / "result.json").read_text())
    return OfflineRun(result, log, [r[0] for r in reloads], verified)


def test_vllm_starts_with_load_format_spotstart_and_answers_as_with_its_own_loader(
    offline: OfflineRun, seeded: Seeded
) -> None:
    result = offline.result
    assert same_outputs(result["first"], result["ref"]), (result["first"], result["ref"])
    assert "config.json matches the source" in offline.log
    line = next(ln for ln in offline.log.splitlines() if "spotstart: 39 tensors" in ln)
    assert f"{seeded.size / 1e6:.1f} MB from {seeded.urls['s3']}" in line
    assert f"verified {offline.verified_by_fetch['s3']}" in line
    # vLLM's reload_weights() with no iterator streams from the source again
    assert not same_outputs(result["reload_by_vllm_other"], result["ref"])
    assert same_outputs(result["reload_by_vllm"], result["ref"])


def test_weights_from_every_store_and_a_peer_give_the_same_answers(
    offline: OfflineRun, seeded: Seeded
) -> None:
    ref = offline.result["ref"]
    for name in offline.reloads:
        got = offline.result[name]
        assert not same_outputs(got["other"], ref), f"{name}: the other model's reload showed"
        assert same_outputs(got["out"], ref), (name, got["out"], ref)
        report = got["report"]
        assert report["bytes_total"] == seeded.size and report["tensors"] == 39
        # a window (2 MiB; chunks of 1 MiB, no tensor above 1 MiB: at most 3 MiB), not the model
        assert 0 < got["peak"] <= 3 << 20 < seeded.size
        if name in offline.verified_by_fetch:
            assert report["verified"] == offline.verified_by_fetch[name], name
    peer = offline.result["peer"]["report"]
    assert peer["bytes_from_peers"] > 0.9 * seeded.size and not peer["peers_dropped"]
    assert peer["verified"].get("md5") == 1  # peer bytes proven by the origin's MD5


def test_the_documented_server_command_line_serves_the_same_tokens(
    engine_python: Path,
    engine_cache: dict[str, str],
    seeded: Seeded,
    offline: OfflineRun,
    tmp_path: Path,
) -> None:
    port = kit.free_port()
    extra = json.dumps({"source": seeded.urls["gcs"]})
    argv = kit.vllm_argv(
        engine_python,
        seeded.config_dir,
        port,
        "--load-format",
        "spotstart",
        "--model-loader-extra-config",
        extra,
        "--enforce-eager",
    )
    env = kit.engine_env(engine_cache, **seeded.env)
    with kit.Engine(argv, env, tmp_path / "server.log") as e:
        e.wait_ready(f"http://127.0.0.1:{port}/health", timeout_s=400)
        for prompt, want in zip(PROMPTS, offline.result["ref"], strict=True):
            status, body = kit.post_json(
                f"http://127.0.0.1:{port}/v1/completions",
                {
                    "model": kit.MODEL_NAME,
                    "prompt": prompt,
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "logprobs": 1,
                    "return_tokens_as_token_ids": True,
                },
            )
            assert status == 200, body
            lp = body["choices"][0]["logprobs"]
            tokens = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
            assert tokens == want["tokens"], (prompt, tokens, want["tokens"])
            for got_lp, ref_step, tok in zip(
                lp["token_logprobs"], want["logprobs"], tokens, strict=True
            ):
                assert abs(got_lp - ref_step[str(tok)]) < 1e-3
        log = e.log()
    assert "spotstart: 39 tensors" in log and "config.json matches the source" in log
