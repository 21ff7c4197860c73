"""The errors the fleet planner raises on purpose: a config or trace it cannot use, and an
optimum the solver could not bound in the time it was given."""

from __future__ import annotations

from spotstart.errors import UsageError


class ConfigError(UsageError):
    """A fleet config or spot trace is invalid: unknown key, bad value, missing or empty file.

    The message is one line naming the file or key, the cause and the fix (exit code 2).
    """


class OptimumNotFound(Exception):
    """HiGHS found neither the optimum nor a proven bound within its time limit. Not a
    failure of the plan: its policies' results stand; the optimum is left out of them."""
