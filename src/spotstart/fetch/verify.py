"""Checksum arithmetic for verification: CRC-32C and its combination, so per-chunk CRCs
computed as bytes arrive give the whole-object CRC without rereading. Pure. (The in-order MD5
that S3 ETags need reads through the target: see engine._OrderedMd5.)"""

from __future__ import annotations

import google_crc32c

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of ``data`` continuing from ``crc`` (hardware accelerated)."""
    return int(google_crc32c.extend(crc, data))


def _gf2_times(mat: list[int], vec: int) -> int:
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC of A+B from crc(A), crc(B) and len(B): zlib's crc32_combine for the Castagnoli
    polynomial (GF(2) matrix exponentiation, O(log len2)).

    >>> crc32c_combine(crc32c(b"hello "), crc32c(b"world"), 5) == crc32c(b"hello world")
    True
    """
    if len2 <= 0:
        return crc1
    odd = [_POLY] + [1 << (n - 1) for n in range(1, 32)]  # operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def combine_chunk_crcs(crcs_and_lengths: list[tuple[int, int]]) -> int:
    """Whole-object CRC-32C from the (crc, length) of consecutive chunks."""
    total = 0
    for i, (crc, length) in enumerate(crcs_and_lengths):
        total = crc if i == 0 else crc32c_combine(total, crc, length)
    return total
