"""Checksum arithmetic for verification: the CRCs stores vouch for (CRC-32C, CRC-32,
CRC-64/NVME) and their combination, so per-chunk CRCs computed as bytes arrive give the
whole-object CRC without rereading. Pure. (The in-order MD5 that S3 ETags need reads through
the target: see scheduler._OrderedMd5.)"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from awscrt import checksums as crt

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected


def crc32c(data: bytes | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data`` continuing from ``crc`` (hardware accelerated). The AWS CRT's takes
    any buffer, a writable mmap or tensor view included (google-crc32c wants read-only bytes),
    and measured 1.7x faster here (256 MiB: 26 ms vs 43 ms)."""
    return int(crt.crc32c(data, crc))


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


@dataclass(frozen=True)
class CrcAlgorithm:
    """One CRC a store can vouch for: ``update(data, crc)`` continues a CRC, ``combine(a, b,
    len_b)`` joins two, ``width_bytes`` is its big-endian size in S3's composite form."""

    name: str
    width_bytes: int
    update: Callable[[bytes | memoryview, int], int]
    combine: Callable[[int, int, int], int]


CRC32C = CrcAlgorithm("crc32c", 4, crc32c, crc32c_combine)
# zlib's CRC-32 (hardware where zlib has it); CRC-64/NVME from the AWS CRT, which botocore
# itself uses for S3's default checksum (the CRT's combine is a C GF(2) power, as ours above).
CRC32 = CrcAlgorithm("crc32", 4, lambda data, crc: zlib.crc32(data, crc), crt.combine_crc32)
CRC64NVME = CrcAlgorithm(
    "crc64nvme", 8, lambda data, crc: crt.crc64nvme(data, crc), crt.combine_crc64nvme
)
ALGORITHMS = {a.name: a for a in (CRC32C, CRC32, CRC64NVME)}


def combine_chunk_crcs(
    crcs_and_lengths: list[tuple[int, int]], algorithm: CrcAlgorithm = CRC32C
) -> int:
    """Whole-object CRC from the (crc, length) of consecutive chunks."""
    total = 0
    for i, (crc, length) in enumerate(crcs_and_lengths):
        total = crc if i == 0 else algorithm.combine(total, crc, length)
    return total
