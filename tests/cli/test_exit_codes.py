"""The exit codes the CLI documents (the table in spotstart.errors) are the ones it returns."""

from __future__ import annotations

import re

import pytest

from spotstart import errors

TABLE = re.findall(r"^\s*(?:\|\s*)?(?:\+-- )?(\w+)\s+exit (\d+)", errors.__doc__ or "", re.M)


def test_the_documented_table_lists_every_public_error() -> None:
    public = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, errors.SpotstartError)
    }
    internal = {"TransientError", "StallDetected"}  # retried, then wrapped; never reach users
    assert {name for name, _ in TABLE} == public - internal


@pytest.mark.parametrize(("name", "code"), TABLE)
def test_each_error_carries_its_documented_exit_code(name: str, code: str) -> None:
    assert getattr(errors, name).exit_code == int(code)


def test_exit_codes_are_distinct_per_kind_of_failure() -> None:
    codes = list(errors.EXIT_CODES.values())
    assert len(codes) == len(set(codes))
