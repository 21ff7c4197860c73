"""Byte counts as people read them. Pure; imported by every layer."""

from __future__ import annotations


def format_bytes(n: int) -> str:
    """Three significant digits in the largest unit that keeps the number >= 1, so two sizes
    that differ show different numbers unless they differ by less than 0.5 %.

    >>> format_bytes(21_474_836), format_bytes(20_971_520), format_bytes(999)
    ('21.5 MB', '21.0 MB', '999 B')
    """
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 999.5 or unit == "PB":
            digits = 2 if value < 9.995 else 1 if value < 99.95 else 0
            return f"{value:.{digits}f} {unit}"
    raise AssertionError("unreachable")
