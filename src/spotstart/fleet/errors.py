"""The one error the fleet planner raises on purpose: a config or trace it cannot use."""

from __future__ import annotations

from spotstart.errors import UsageError


class ConfigError(UsageError):
    """A fleet config or spot trace is invalid: unknown key, bad value, missing or empty file.

    The message is one line naming the file or key, the cause and the fix (exit code 2).
    """
