"""The kit itself against real engines: the tiny model made in the test is served by vLLM
(greedy text repeatable) and by transformers serve (the exact text differs: the two engines
tokenize the prompt's special tokens differently)."""

from __future__ import annotations

from pathlib import Path

from tests.engines import kit


def test_vllm_and_transformers_serve_the_tiny_model(
    engine_python: Path, tiny_llama: Path, engine_cache: dict[str, str], tmp_path: Path
) -> None:
    body = {"prompt": "spot node zone", "max_tokens": 8, "temperature": 0}
    texts = []
    port = kit.free_port()
    argv = kit.vllm_argv(engine_python, tiny_llama, port, "--enforce-eager")
    with kit.Engine(argv, kit.engine_env(engine_cache), tmp_path / "vllm.log") as e:
        e.wait_ready(f"http://127.0.0.1:{port}/health")
        status, answer = kit.post_json(
            f"http://127.0.0.1:{port}/v1/completions", {**body, "model": kit.MODEL_NAME}
        )
        assert status == 200, answer
        texts.append(answer["choices"][0]["text"])
        again = kit.post_json(
            f"http://127.0.0.1:{port}/v1/completions", {**body, "model": kit.MODEL_NAME}
        )[1]
        assert again["choices"][0]["text"] == texts[0]  # greedy: the same tokens again
    port = kit.free_port()
    argv = kit.transformers_argv(engine_python, tiny_llama, port)
    with kit.Engine(argv, kit.engine_env(engine_cache), tmp_path / "ts.log") as e:
        e.wait_ready(f"http://127.0.0.1:{port}/health")
        status, answer = kit.post_json(
            f"http://127.0.0.1:{port}/v1/completions",
            {**body, "model": str(tiny_llama)},
        )
        assert status == 200, answer
        assert answer["usage"]["completion_tokens"] == 8
        texts.append(answer["choices"][0]["text"])
    assert all(texts), texts
