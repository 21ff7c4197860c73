"""tests/safe_report.py: a test whose traceback has a frame without a line number (as a
pytest-timeout signal landing in a ``with`` block's cleanup makes on Python 3.11) is reported
as failed and the run goes on, instead of an INTERNALERROR that ends the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.safe_report import plain_traceback

REPO = Path(__file__).resolve().parents[1]

HUNG = """
import sys, types

def _frame_in_cleanup():
    with open(__file__):
        pass
    return sys._getframe()

def _no_line_traceback():
    frame = _frame_in_cleanup()
    lasti = next(start for start, _end, line in frame.f_code.co_lines() if line is None)
    return types.TracebackType(None, frame, lasti, -1)

def test_timed_out_in_a_cleanup():
    tb = _no_line_traceback()
    assert tb.tb_lineno is None
    raise RuntimeError("Timeout (>300.0s) from pytest-timeout.").with_traceback(tb)

def test_the_next_one_still_runs():
    pass
"""

CONFTEST = """
import pytest
from tests.safe_report import make_report

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    return make_report(item, call)
"""


def test_a_traceback_pytest_cannot_format_is_a_failure_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_hung.py").write_text(HUNG)
    (tmp_path / "conftest.py").write_text(CONFTEST)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout + run.stderr
    assert "INTERNALERROR" not in out, out
    assert run.returncode == 1, out  # tests failed, not an internal error (3)
    assert "1 failed, 1 passed" in out, out
    assert "Timeout (>300.0s) from pytest-timeout." in out
    assert "near line" in out and "_frame_in_cleanup" in out


def test_plain_traceback_names_each_frame_and_the_chain() -> None:
    def inner() -> None:
        raise ValueError("inner")

    try:
        try:
            inner()
        except ValueError as exc:
            raise KeyError("outer") from exc
    except KeyError as exc:
        text = plain_traceback(exc)
    first, second = text.index("ValueError: inner"), text.index("KeyError: 'outer'")
    assert first < second
    assert "direct cause" in text
    assert 'raise ValueError("inner")' in text
    assert f'File "{__file__}", line' in text
