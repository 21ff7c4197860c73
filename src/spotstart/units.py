"""Byte counts as people read them. Pure; imported by every layer."""

from __future__ import annotations

import re


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


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?")


def parse_size(text: str) -> int:
    """The one parser of sizes on the command line (``--chunk-size``, ``--max-waste-bytes``):
    units of 1024, with or without ``i``/``B``; plain numbers are bytes.

    >>> parse_size("16M"), parse_size("16MiB"), parse_size("500k"), parse_size("4194304")
    (16777216, 16777216, 512000, 4194304)
    """
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r}: not a size (examples: 8M, 16MiB, 1G, 4194304)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) as ``(host, port)``; the host may be empty (``:8080``),
    the caller decides what that means. Raises ``ValueError`` for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)
