"""CRC-32C combination must equal the CRC of the concatenation, for any split."""

from __future__ import annotations

import google_crc32c
from hypothesis import given
from hypothesis import strategies as st

from spotstart.fetch.verify import combine_chunk_crcs, crc32c, crc32c_combine


@given(a=st.binary(max_size=3000), b=st.binary(max_size=3000))
def test_combining_two_crcs_equals_the_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert crc32c_combine(crc32c(a), crc32c(b), len(b)) == google_crc32c.value(a + b)


@given(data=st.binary(min_size=1, max_size=20000), cuts=st.lists(st.integers(1, 5000)))
def test_chunk_crcs_combine_to_the_whole_object_crc(data: bytes, cuts: list[int]) -> None:
    parts, pos = [], 0
    for n in cuts:
        if pos >= len(data):
            break
        parts.append(data[pos : pos + n])
        pos += n
    if pos < len(data):
        parts.append(data[pos:])
    assert combine_chunk_crcs([(crc32c(p), len(p)) for p in parts]) == google_crc32c.value(data)


def test_known_vector() -> None:
    # RFC 3720 B.4: CRC-32C of 32 bytes of zeros
    assert crc32c(bytes(32)) == 0x8A9136AA


@given(a=st.binary(max_size=5000), b=st.binary(max_size=5000))
def test_every_crc_combines_as_if_computed_over_the_concatenation(a: bytes, b: bytes) -> None:
    from spotstart.fetch.verify import ALGORITHMS

    for algo in ALGORITHMS.values():
        whole = algo.update(a + b, 0)
        assert (
            combine_chunk_crcs([(algo.update(a, 0), len(a)), (algo.update(b, 0), len(b))], algo)
            == whole
        )


def test_crc_reference_values() -> None:
    from spotstart.fetch.verify import CRC32, CRC64NVME

    # the check values of the CRC catalogue (reveng): the CRC of b"123456789"
    assert CRC32.update(b"123456789", 0) == 0xCBF43926
    assert CRC64NVME.update(b"123456789", 0) == 0xAE8B14860A799888
