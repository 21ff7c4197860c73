"""`spotstart route` at the command line: usage errors are exit 2 with one line naming the flag."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import error_line, run_cli


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--replicas", "nohost"], "--replicas"),
        (["--replicas", "dns:svc"], "--replicas"),
        (["--replicas", "a:1", "--readyz-path", "readyz"], "--readyz-path"),
        (["--replicas", "a:1", "--max-attempts", "0"], "--max-attempts"),
    ],
)
def test_usage_errors_are_exit_2(args: list[str], names: str) -> None:
    result = run_cli(["route", *args])
    assert result.code == 2
    assert names in error_line(result.stderr)


def test_a_port_in_use_is_exit_2() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        result = run_cli(["route", "--listen", f"127.0.0.1:{port}", "--replicas", "a:1"])
    assert result.code == 2
    assert "--listen" in error_line(result.stderr)


def test_bad_listen_is_an_argparse_error() -> None:
    result = run_cli(["route", "--listen", "nope", "--replicas", "a:1"])
    assert result.code == 2 and "--listen" in result.stderr
