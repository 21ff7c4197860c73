"""Red team: `spotstart guard --engine-cache` against what a careless environment or a hostile
neighbour hands it. Findings with a fix are asserted here; see /tmp/team/redteam-guard.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotstart.cli.guard_cmd import default_engine_cache_dir
from spotstart.errors import UsageError

TAIL = Path("spotstart") / "engine-cache"


def test_a_relative_xdg_cache_home_is_ignored_as_the_spec_says(tmp_path: Path) -> None:
    # before: "rel/spotstart/engine-cache", made absolute against the guard's cwd: the cache
    # (and the key that holds its path) landed wherever the guard was started
    got = default_engine_cache_dir({"XDG_CACHE_HOME": "rel", "HOME": str(tmp_path)})
    assert got == tmp_path / ".cache" / TAIL
    got = default_engine_cache_dir({"XDG_CACHE_HOME": str(tmp_path / "x"), "HOME": "/nowhere"})
    assert got == tmp_path / "x" / TAIL


def test_no_usable_home_is_a_usage_error_not_a_directory_named_tilde(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pwd

    # $HOME relative: the passwd entry's home, absolute
    got = default_engine_cache_dir({"HOME": "relative"})
    assert got.is_absolute() and got == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / TAIL

    # no $HOME and no passwd entry (an arbitrary uid in a container): expanduser("~") is "~",
    # which made a directory named "~" in the cwd; now the user is told to name one
    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(UsageError, match="--engine-cache-dir"):
        default_engine_cache_dir({})
