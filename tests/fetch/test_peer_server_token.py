"""The peer token end to end, as a Kubernetes pod passes it (``$SPOTSTART_PEER_TOKEN`` from a
Secret) or a user does (``--peer-token-file``): `fetch --peers` with the right token takes the
bytes from the peer; with a wrong one the peer refuses it (401), is dropped and the origin
serves every byte; `fetch --serve-peers` on a reachable address serves with the token from
the environment."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from spotstart import Concurrency, FetchConfig, fetch
from spotstart.emulate.storage import StorageEmulator
from tests.conftest import BUCKET, run_cli, spawn_cli
from tests.fetch.peer_dirs import make_token_file

MiB = 1 << 20
URL = f"gs://{BUCKET}/peer-token/"
TOKEN = "5ec7e7" * 8


@pytest.fixture
def model(clean_cloud: StorageEmulator, gcs_env: dict[str, str]) -> dict[str, bytes]:
    files = {"peer-token/a.bin": os.urandom(3 * MiB + 5)}
    clean_cloud.seed_gcs(BUCKET, files)
    return files


def _serve(root: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[object, str]:
    proc = spawn_cli(["serve-peers", str(root), "--listen", "0.0.0.0:0", "--json", *extra], env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    return proc, "127.0.0.1:" + json.loads(line)["listen"].rsplit(":", 1)[1]


def _fetch(dest: Path, peer: str, *extra: str, env: dict[str, str]) -> dict[str, object]:
    argv = ["fetch", URL, str(dest), "--chunk-size", "1MiB", "--peers", peer, "--json", *extra]
    res = run_cli(argv, env=env)
    assert res.code == 0, res.stderr
    return dict(json.loads(res.stdout))


@pytest.mark.parametrize("how", ["file", "env"])
def test_the_right_token_takes_bytes_from_the_peer_a_wrong_one_none(
    how: str, model: dict[str, bytes], gcs_env: dict[str, str], tmp_path: Path
) -> None:
    fetch(URL, tmp_path / "a", FetchConfig(chunk_bytes=MiB, concurrency=Concurrency(streams=2)))
    good = make_token_file(tmp_path / "good.token", TOKEN)
    bad = make_token_file(tmp_path / "bad.token", TOKEN[::-1])
    proc, peer = _serve(tmp_path / "a", "--peer-token-file", str(good))
    try:
        if how == "file":
            right = _fetch(tmp_path / "b", peer, "--peer-token-file", str(good), env=gcs_env)
            wrong = _fetch(tmp_path / "c", peer, "--peer-token-file", str(bad), env=gcs_env)
        else:
            right = _fetch(tmp_path / "b", peer, env={**gcs_env, "SPOTSTART_PEER_TOKEN": TOKEN})
            wrong = _fetch(
                tmp_path / "c", peer, env={**gcs_env, "SPOTSTART_PEER_TOKEN": TOKEN[::-1]}
            )
    finally:
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        _, err = proc.communicate(timeout=10)  # type: ignore[attr-defined]
    data = model["peer-token/a.bin"]
    assert (tmp_path / "b" / "a.bin").read_bytes() == data
    assert (tmp_path / "c" / "a.bin").read_bytes() == data
    assert right["bytes_from_peers"] == len(data)
    assert wrong["bytes_from_peers"] == 0 and "401" in str(wrong["peers_dropped"])
    assert TOKEN not in err and TOKEN[::-1] not in err


def test_fetch_serving_peers_on_a_reachable_address_takes_the_token_from_the_environment(
    model: dict[str, bytes], gcs_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**gcs_env, "SPOTSTART_PEER_TOKEN": TOKEN}
    res = run_cli(
        ["fetch", URL, str(tmp_path / "a"), "--serve-peers", "0.0.0.0:0", "--json"], env=env
    )
    assert res.code == 0, res.stderr
    assert (tmp_path / "a" / "a.bin").read_bytes() == model["peer-token/a.bin"]
