"""The public API is exactly what ``__all__`` says (like httpx's tests/test_exported_members)."""

from __future__ import annotations

import inspect

import spotstart


def test_all_exports_exist_and_nothing_public_is_missing() -> None:
    for name in spotstart.__all__:
        assert hasattr(spotstart, name), name
    public = {
        n
        for n in dir(spotstart)
        if not n.startswith("_") and not inspect.ismodule(getattr(spotstart, n))
    }
    assert public - {"annotations"} == set(spotstart.__all__)


def test_every_export_is_documented_and_comes_from_spotstart() -> None:
    for name in spotstart.__all__:
        member = getattr(spotstart, name)
        assert inspect.getdoc(member), f"{name} has no docstring"
        assert member.__module__.startswith("spotstart."), name


def test_all_is_sorted_without_duplicates() -> None:
    assert list(spotstart.__all__) == sorted(set(spotstart.__all__))
