"""Nothing served to strangers by default: `serve-peers`, `fetch --serve-peers` and `guard
--serve-peers` on an address other hosts can reach refuse to start without a token (exit 2,
one line saying how to make one) unless told --no-token (then they serve, and say so on
stderr). Token files others may read, short or empty tokens are refused; a wrong or missing
token gets 401 and no byte."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import error_line, run_cli, spawn_cli
from tests.fetch.peer_dirs import add_complete, http_get, make_token_file, range_of

TOKEN = "0123456789abcdef" * 4
GUARD = ["guard", "--upstream", "http://127.0.0.1:9", "--listen", "127.0.0.1:0", "--cloud", "none"]


def _commands(d: Path) -> dict[str, list[str]]:
    return {
        "serve-peers": ["serve-peers", str(d), "--listen", "0.0.0.0:0"],
        "fetch": ["fetch", "gs://b/m/", str(d / "dest"), "--serve-peers", "0.0.0.0:0"],
        "guard": [*GUARD, "--serve-peers", f"{d}:0.0.0.0:0"],
    }


@pytest.mark.parametrize("command", ["serve-peers", "fetch", "guard"])
def test_serving_peers_on_a_reachable_address_without_a_token_is_exit_2(
    command: str, tmp_path: Path
) -> None:
    res = run_cli(_commands(tmp_path)[command])
    assert res.code == 2, (res.code, res.stderr)
    line = error_line(res.stderr)
    assert "needs a peer token" in line and "openssl rand" in line and "--no-token" in line


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("mode-644", "lets other users read the token"),
        ("mode-640", "lets other users read the token"),
        ("empty", "empty; a peer token needs at least 16"),
        ("short", "8 bytes; a peer token needs at least 16"),
        ("missing", "No such file"),
        ("env-short", "$SPOTSTART_PEER_TOKEN: 5 bytes"),
        ("no-token-and-env", "--no-token, yet $SPOTSTART_PEER_TOKEN holds a token"),
    ],
)
@pytest.mark.parametrize("command", ["serve-peers", "fetch", "guard"])
def test_a_token_others_can_read_or_too_short_is_refused(
    command: str, setup: str, needle: str, tmp_path: Path
) -> None:
    argv = _commands(tmp_path)[command]
    token_file = tmp_path / "peer.token"
    env: dict[str, str] = {}
    if setup.startswith("mode-"):
        make_token_file(token_file, mode=int(setup[5:], 8))
    elif setup == "empty":
        make_token_file(token_file, "")
    elif setup == "short":
        make_token_file(token_file, "12345678")
    if setup.startswith("env-"):
        env["SPOTSTART_PEER_TOKEN"] = "short"
    elif setup == "no-token-and-env":
        env["SPOTSTART_PEER_TOKEN"] = TOKEN
        argv = [*argv, "--no-token"]
    else:
        argv = [*argv, "--peer-token-file", str(token_file)]
    res = run_cli(argv, env=env)
    assert res.code == 2, (res.code, res.stderr)
    line = error_line(res.stderr)
    assert needle in line, line
    assert TOKEN not in res.stderr


def test_the_client_refuses_a_token_file_others_can_read(tmp_path: Path) -> None:
    token = make_token_file(tmp_path / "t", mode=0o644)
    argv = ["fetch", "gs://b/m/", str(tmp_path), "--peers", "127.0.0.1:9"]
    res = run_cli([*argv, "--peer-token-file", str(token)])
    assert res.code == 2 and "chmod 600" in error_line(res.stderr)


def _spawn_server(argv: list[str], env: dict[str, str] | None = None) -> tuple[object, str]:
    proc = spawn_cli([*argv, "--json"], env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    return proc, json.loads(line)["listen"]


def _stop(proc: object) -> str:
    proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    _, err = proc.communicate(timeout=10)  # type: ignore[attr-defined]
    assert proc.returncode == 0, err  # type: ignore[attr-defined]
    return str(err)


def test_no_token_serves_anyone_and_says_so_on_stderr(tmp_path: Path) -> None:
    served = add_complete(tmp_path, "m.bin", b"weights" * 100)
    proc, address = _spawn_server(
        ["serve-peers", str(tmp_path), "--listen", "0.0.0.0:0", "--no-token"]
    )
    try:
        port = address.rsplit(":", 1)[1]
        status, body = http_get(
            f"127.0.0.1:{port}", f"/v1/objects/{served.oid}", range_of(served, 0, 7)
        )
        assert (status, body) == (206, b"weights")
    finally:
        err = _stop(proc)
    warnings = [ln for ln in err.splitlines() if "--no-token" in ln]
    assert len(warnings) == 1 and "warning" in warnings[0] and "anyone" in warnings[0]


@pytest.mark.parametrize("how", ["file", "env"])
def test_a_wrong_or_missing_token_gets_401_and_not_a_byte(how: str, tmp_path: Path) -> None:
    served = add_complete(tmp_path / "d", "m.bin", b"private weights " * 1000)
    argv = ["serve-peers", str(tmp_path / "d"), "--listen", "0.0.0.0:0"]
    env = {}
    if how == "file":
        argv += ["--peer-token-file", str(make_token_file(tmp_path / "t", TOKEN))]
    else:
        env["SPOTSTART_PEER_TOKEN"] = TOKEN
    proc, address = _spawn_server(argv, env)
    try:
        peer = f"127.0.0.1:{address.rsplit(':', 1)[1]}"
        target = f"/v1/objects/{served.oid}"
        for token in (None, TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "é" * 20, ""):
            headers = range_of(served, 0, 100)
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            for path in (target, "/v1/inventory"):
                status, body = http_get(peer, path, headers)
                assert status == 401, (token, path)
                assert b"private" not in body and served.oid.encode() not in body
        status, body = http_get(peer, target, range_of(served, 0, 16, TOKEN))
        assert (status, body) == (206, b"private weights ")
    finally:
        err = _stop(proc)
    assert TOKEN not in err
