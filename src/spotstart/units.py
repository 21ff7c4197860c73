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


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_bytes(text: str) -> int:
    """``"1.5GB"``, ``"800MiB"``, ``"1000"`` -> bytes; ValueError otherwise.

    >>> parse_bytes("1.5GB"), parse_bytes("2MiB"), parse_bytes("10")
    (1500000000, 2097152, 10)
    """
    t = text.strip().lower().replace(" ", "")
    digits = len(t) - len(t.lstrip("0123456789."))
    number, unit = t[:digits], t[digits:]
    if not number or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a byte count (e.g. 500MB, 2GiB)")
    value = float(number) * _UNITS[unit]
    if value < 0:
        raise ValueError(f"{text!r} is negative")
    return int(value)
