"""A failure pytest cannot describe must still be a failure, not the end of the run.

pytest 9.2 formats a failing test's traceback with each frame's ``tb_lineno - 1``. On Python
3.11 ``tb_lineno`` is None when an exception lands on an instruction that has no line (the
cleanup code of a ``with`` or ``async with``): pytest-timeout's signal raises exactly there
when a hung test runs out of time. The report then raises TypeError inside pytest, which
stops the whole session as an INTERNALERROR (seen in CI: a hung test ended a run at 80%).
``make_report`` makes the report as pytest does, and when that fails, makes one with the
traceback written here, frame by frame, without assuming a line number."""

from __future__ import annotations

import linecache
import traceback
from types import TracebackType

import pytest


def plain_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` (and of the exceptions it was raised from or during), with
    a frame's first line standing in where an instruction has no line."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        lines = ["Traceback (most recent call last):"]
        tb: TracebackType | None = current.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            line = tb.tb_lineno
            where = f"line {line}" if line is not None else f"near line {code.co_firstlineno}"
            lines.append(f'  File "{code.co_filename}", {where}, in {code.co_name}')
            source = linecache.getline(code.co_filename, line or code.co_firstlineno).strip()
            if source:
                lines.append(f"    {source}")
            tb = tb.tb_next
        lines.extend(s.rstrip("\n") for s in traceback.format_exception_only(current))
        parts.append("\n".join(lines))
        if current.__cause__ is not None:
            parts.append("The above exception was the direct cause of the following exception:")
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            parts.append("During handling of the above exception, another exception occurred:")
            current = current.__context__
        else:
            current = None
    return "\n\n".join(reversed(parts))


def make_report(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    try:
        return pytest.TestReport.from_item_and_call(item, call)
    except Exception as failure:
        if call.excinfo is None:
            raise
        longrepr = (
            f"{plain_traceback(call.excinfo.value)}\n\n(pytest could not format this "
            f"traceback: {type(failure).__name__}: {failure}; written by tests/safe_report.py)"
        )
        sections = [
            (f"Captured {key} {when}", content) for when, key, content in item._report_sections
        ]
        return pytest.TestReport(
            item.nodeid,
            item.location,
            {k: 1 for k in item.keywords},
            "failed",
            longrepr,
            call.when,  # type: ignore[arg-type]
            sections,
            call.duration,
            call.start,
            call.stop,
            item.user_properties,
        )
