"""The engine cache dir's length: the engine's unix sockets go beneath it (TMPDIR)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotstart.enginecache import EngineCacheConfig, engine_env
from spotstart.enginecache.dirs import MAX_ROOT_BYTES
from spotstart.errors import UsageError

VLLM = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]


def test_a_root_too_long_for_the_engines_unix_sockets_is_a_usage_error(tmp_path: Path) -> None:
    # vLLM's ZMQ IPC sockets are $TMPDIR/<uuid4>: 107 bytes at most (sockaddr_un)
    base = tmp_path.resolve()
    long_root = base / ("d" * max(1, MAX_ROOT_BYTES - len(str(base))))
    assert len(str(long_root)) > MAX_ROOT_BYTES
    with pytest.raises(UsageError, match="107 bytes"):
        engine_env(EngineCacheConfig(url="file:///nowhere/", root=long_root), VLLM)
    assert not long_root.exists()


def test_another_engine_is_warned_not_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long_root = tmp_path.resolve() / ("d" * MAX_ROOT_BYTES)
    env = engine_env(EngineCacheConfig(url="file:///nowhere/", root=long_root), ["python", "s.py"])
    assert env["TMPDIR"].startswith(str(long_root))
    assert "107 bytes" in caplog.text


def test_a_root_that_fits_leaves_room_for_a_socket_name(tmp_path: Path) -> None:
    root = Path("/tmp") / f"ec-{tmp_path.name[-8:]}"
    env = engine_env(EngineCacheConfig(url="file:///nowhere/", root=root), ["python"])
    socket_path = Path(env["TMPDIR"]) / "2cc81d09-7d1b-4a53-9c1e-0aee2c4ff1d8"
    assert len(str(socket_path).encode()) <= 107
