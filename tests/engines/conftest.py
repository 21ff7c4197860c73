"""Fixtures for the tests that run real engines (vLLM, transformers serve). Every test under
tests/engines/ is marked ``engines``: ``pytest -m "not engines"`` leaves them out locally.
Without the engines venv they skip on a developer's machine and FAIL in CI ($CI set), so a
CI run can never pass without them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engines import kit

ENGINES_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if ENGINES_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.engines)
            if item.get_closest_marker("timeout") is None:  # an engine start is 30-90 s
                item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session")
def engine_python() -> Path:
    python, why = kit.engine_python_or_reason()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the engine tests: {why}")
        pytest.skip(why)
    return python


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Cache env vars shared by every engine of this run (see kit.cache_env)."""
    return kit.cache_env(tmp_path_factory.mktemp("engine-cache"))


@pytest.fixture(scope="session")
def tiny_llama(engine_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny Llama (hidden 256, 4 layers, 2,048-token BPE tokenizer with a chat template,
    bf16 random weights in one model.safetensors) made for this run."""
    yield kit.make_tiny_llama(engine_python, tmp_path_factory.mktemp("tiny-llama") / "model")
