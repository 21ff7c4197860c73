"""The safetensors format core without torch: headers written by the real ``safetensors``
library parse to the right specs, every malformed header is rejected naming its cause, shard
indexes are checked against their shards, and fill plans put every data byte in one place."""

from __future__ import annotations

import doctest
import json
import logging
import math
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from spotstart.errors import EXIT_CODES, InvalidCheckpoint, SpotstartError, UsageError
from spotstart.weights import format as fmt
from spotstart.weights.format import (
    DTYPE_BITS,
    DTYPE_BYTES,
    SafetensorsHeader,
    ShardIndex,
    TensorSpec,
    check_shards,
    header_length,
    parse_header,
    parse_index,
    plan_fill,
)

NAME = "gs://models/m.safetensors"


def serialize(header: dict[str, Any], data: bytes, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + data


def serialize_raw(raw: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


def parse_file(blob: bytes, name: str = NAME) -> SafetensorsHeader:
    n = header_length(blob[:8], len(blob), name)
    return parse_header(blob[8 : 8 + n], len(blob), name)


def reference_parse(blob: bytes) -> dict[str, dict[str, Any]]:
    """The reference implementation's view of a file: name -> {dtype, shape, data}."""
    return dict(safetensors.deserialize(blob))  # type: ignore[no-untyped-call]


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def u8_header(sizes: dict[str, int]) -> SafetensorsHeader:
    """A valid header of U8 tensors laid out in the given order."""
    header: dict[str, Any] = {}
    at = 0
    for tensor, size in sizes.items():
        header[tensor] = entry("U8", [size], at, at + size)
        at += size
    return parse_file(serialize(header, bytes(at)))


# --- files written by the reference implementation ---

NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "F16": np.float16,
    "U32": np.uint32,
    "I32": np.int32,
    "F32": np.float32,
    "U64": np.uint64,
    "I64": np.int64,
    "F64": np.float64,
}


def test_file_written_by_safetensors_parses_with_every_numpy_dtype_shape_and_offset() -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for i, (code, np_dtype) in enumerate(NUMPY_DTYPES.items()):
        for shape in [(3, 5), (), (0, 4), (7,)]:
            arrays[f"layer.{i}.{code}.{len(shape)}.{math.prod(shape)}"] = rng.integers(
                0, 100, size=shape
            ).astype(np_dtype)
    blob = safetensors.numpy.save(arrays, metadata={"format": "np", "step": "7"})

    header = parse_file(blob)

    assert header.metadata == {"format": "np", "step": "7"}
    assert header.data_start == 8 + header.header_bytes
    assert header.file_bytes == len(blob)
    assert {s.name for s in header.tensors} == set(arrays)
    with_reference = reference_parse(blob)
    for spec in header.tensors:
        array = arrays[spec.name]
        code = next(c for c, t in NUMPY_DTYPES.items() if np.dtype(t) == array.dtype)
        assert spec.dtype == code == with_reference[spec.name]["dtype"]
        assert spec.shape == array.shape
        assert spec.nbytes == array.nbytes == math.prod(spec.shape) * DTYPE_BYTES[spec.dtype]
        assert blob[spec.file_begin : spec.file_end] == array.tobytes()
        assert blob[spec.file_begin : spec.file_end] == bytes(with_reference[spec.name]["data"])


def test_empty_file_written_by_safetensors_has_no_tensors_and_no_data() -> None:
    header = parse_file(safetensors.numpy.save({}))
    assert header.tensors == ()
    assert header.data_bytes == 0
    assert plan_fill(header, 4) == []


def test_sub_byte_and_extra_dtypes_are_sized_as_the_reference_sizes_them() -> None:
    cases = [
        ("F4", [2, 3], 3),
        ("F6_E2M3", [4], 3),
        ("F6_E3M2", [8], 6),
        ("F8_E8M0", [5], 5),
        ("F8_E4M3FNUZ", [2], 2),
        ("C64", [2], 16),
        ("BF16", [3], 6),
    ]
    for dtype, shape, nbytes in cases:
        blob = serialize({"t": entry(dtype, shape, 0, nbytes)}, bytes(nbytes))
        assert parse_file(blob).tensors[0].nbytes == nbytes
        assert reference_parse(blob)["t"]["dtype"] == dtype
    assert "F4" not in DTYPE_BYTES and DTYPE_BYTES["C64"] == 8 and DTYPE_BYTES["BF16"] == 2


# --- malformed files ---


def _ok(**extra: Any) -> dict[str, Any]:
    return {"a": entry("F32", [2], 0, 8), **extra}


MALFORMED: list[Any] = [
    pytest.param(b"\x01\x00", "shorter than the 8-byte", id="file-shorter-than-8-bytes"),
    pytest.param(
        struct.pack("<Q", 100_000_001) + b"{}",
        "exceeds the 100000000-byte limit",
        id="header-length-absurd",
    ),
    pytest.param(struct.pack("<Q", 50) + b"{}", "does not fit", id="header-beyond-file"),
    pytest.param(serialize_raw(b'{"\xff": 1}'), "not valid UTF-8", id="invalid-utf8"),
    pytest.param(serialize_raw(b'{"a": '), "not valid JSON", id="invalid-json"),
    pytest.param(serialize_raw(b'{"a": NaN}'), "not valid JSON", id="nan-is-not-json"),
    pytest.param(serialize_raw(b"{} {}"), "not valid JSON", id="trailing-json"),
    pytest.param(serialize_raw(b"[]"), "does not start with '{'", id="not-an-object"),
    pytest.param(serialize_raw(b" {}"), "does not start with '{'", id="leading-space"),
    pytest.param(serialize_raw(b""), "does not start with '{'", id="empty-header"),
    pytest.param(
        serialize_raw(
            b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
            b"xy",
        ),
        "duplicate key 'a'",
        id="duplicate-tensor-name",
    ),
    pytest.param(
        serialize_raw(b'{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        "duplicate key 'dtype'",
        id="duplicate-field",
    ),
    pytest.param(
        serialize({"a": [1, 2]}, b""), "'a': entry is list, not an object", id="entry-not-object"
    ),
    pytest.param(
        serialize({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)),
        "'a': entry lacks field data_offsets",
        id="missing-field",
    ),
    pytest.param(
        serialize({"a": entry("F128", [1], 0, 16)}, bytes(16)),
        "'a': unknown dtype 'F128'",
        id="unknown-dtype",
    ),
    pytest.param(
        serialize({"a": entry("F32", [-1], 0, 0)}, b""), "'a': bad shape", id="negative-dim"
    ),
    pytest.param(
        serialize({"a": entry("F32", [1.0], 0, 4)}, bytes(4)), "'a': bad shape", id="float-dim"
    ),
    pytest.param(
        serialize({"a": entry("F32", [True], 0, 4)}, bytes(4)), "'a': bad shape", id="bool-dim"
    ),
    pytest.param(
        serialize({"a": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, bytes(16)),
        "'a': bad shape",
        id="shape-not-list",
    ),
    pytest.param(
        serialize({"a": entry("F32", [1], 0, "4")}, bytes(4)),
        "bad data_offsets",
        id="offset-not-int",
    ),
    pytest.param(
        serialize({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, bytes(4)),
        "bad data_offsets",
        id="one-offset",
    ),
    pytest.param(
        serialize({"a": entry("F32", [0], -4, -4)}, b""), "bad data_offsets", id="negative-offset"
    ),
    pytest.param(
        serialize({"a": entry("F32", [1], 4, 0)}, bytes(4)), "begin 4 > end 0", id="begin-after-end"
    ),
    pytest.param(
        serialize({"a": entry("F32", [3], 0, 8)}, bytes(8)),
        "mismatches the byte span",
        id="shape-dtype-size-mismatch",
    ),
    pytest.param(
        serialize({"a": entry("F4", [3], 0, 2)}, bytes(2)),
        "byte boundary",
        id="sub-byte-not-on-boundary",
    ),
    pytest.param(
        serialize({"a": entry("F32", [2], 4, 12)}, bytes(8)), "truncated", id="out-of-data-range"
    ),
    pytest.param(
        serialize({**_ok(), "b": entry("F32", [1], 4, 8)}, bytes(8)),
        "overlapping",
        id="overlapping",
    ),
    pytest.param(
        serialize({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12)),
        "hole in the data: bytes [4, 8)",
        id="hole",
    ),
    pytest.param(
        serialize({"b": entry("F32", [1], 4, 8)}, bytes(8)),
        "hole in the data: bytes [0, 4)",
        id="hole-at-start",
    ),
    pytest.param(
        serialize(_ok(), bytes(12)), "4 trailing bytes belong to no tensor", id="data-not-covered"
    ),
    pytest.param(serialize(_ok(), bytes(6)), "the file is truncated", id="truncated-file"),
    pytest.param(
        serialize(_ok(__metadata__={"n": 1}), bytes(8)),
        "__metadata__ must be",
        id="metadata-value-not-string",
    ),
    pytest.param(
        serialize(_ok(__metadata__=[1]), bytes(8)), "__metadata__ must be", id="metadata-not-object"
    ),
]


@pytest.mark.parametrize(("blob", "cause"), MALFORMED)
def test_malformed_file_is_rejected_with_one_line_naming_file_and_cause(
    blob: bytes, cause: str
) -> None:
    with pytest.raises(InvalidCheckpoint) as info:
        parse_file(blob)
    message = str(info.value)
    assert cause in message
    assert message.startswith(NAME + ": ")
    assert "\n" not in message


def test_header_length_rejects_a_prefix_cut_short_by_the_read() -> None:
    with pytest.raises(InvalidCheckpoint, match="read was cut short"):
        header_length(b"\x02\x00", 100, NAME)


def test_the_reference_implementation_rejects_every_malformed_file_we_reject() -> None:
    for param in MALFORMED:
        blob, _cause = param.values
        if param.id == "leading-space":
            continue  # safetensors 0.8 skips leading whitespace; the spec requires '{' first
        with pytest.raises(safetensors.SafetensorError):
            reference_parse(blob)


def test_header_padded_with_spaces_and_metadata_null_is_valid() -> None:
    header = parse_file(serialize({"__metadata__": None, **_ok()}, bytes(8), pad=5))
    assert header.metadata == {}
    assert header.header_bytes == len(json.dumps({"__metadata__": None, **_ok()})) + 5
    assert header.tensors == (TensorSpec("a", "F32", (2,), 0, 8, header.data_start),)


def test_unknown_fields_in_an_entry_are_ignored_like_the_reference_does() -> None:
    blob = serialize({"a": {**entry("U8", [1], 0, 1), "quant": "x"}}, b"z")
    assert parse_file(blob).tensor("a").shape == (1,)
    assert reference_parse(blob)


def test_invalid_checkpoint_exits_with_code_10() -> None:
    assert issubclass(InvalidCheckpoint, SpotstartError)
    assert InvalidCheckpoint.exit_code == EXIT_CODES["invalid_checkpoint"] == 10


# --- hand-serialized random files ---

names = st.text(min_size=0, max_size=12).filter(lambda s: s != "__metadata__")


@st.composite
def tensor_files(draw: st.DrawFn) -> tuple[bytes, list[TensorSpec]]:
    """A valid file of random tensors in random byte order and random header key order."""
    tensors = draw(
        st.dictionaries(
            names,
            st.tuples(st.sampled_from(sorted(DTYPE_BITS)), st.lists(st.integers(0, 6), max_size=3)),
            max_size=10,
        )
    )
    layout = draw(st.permutations(sorted(tensors)))
    specs: list[TensorSpec] = []
    at = 0
    for tensor in layout:
        dtype, shape = tensors[tensor]
        if math.prod(shape) * DTYPE_BITS[dtype] % 8:
            shape = [*shape, 8]
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        specs.append(TensorSpec(tensor, dtype, tuple(shape), at, at + nbytes))
        at += nbytes
    order = draw(st.permutations(specs))
    header: dict[str, Any] = {s.name: entry(s.dtype, list(s.shape), s.begin, s.end) for s in order}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(names, st.text(max_size=5), max_size=3))
    blob = serialize(header, draw(st.binary(min_size=at, max_size=at)), pad=draw(st.integers(0, 9)))
    return blob, specs


@settings(max_examples=200, deadline=None)
@given(tensor_files())
def test_random_valid_files_parse_to_exactly_the_specs_written(
    file: tuple[bytes, list[TensorSpec]],
) -> None:
    blob, written = file
    header = parse_file(blob)
    expected = sorted(written, key=lambda s: (s.begin, s.end, s.name))
    assert [(s.name, s.dtype, s.shape, s.begin, s.end) for s in header.tensors] == [
        (s.name, s.dtype, s.shape, s.begin, s.end) for s in expected
    ]
    assert header.data_bytes == sum(s.nbytes for s in written)
    assert all(s.file_begin == header.data_start + s.begin for s in header.tensors)
    reference = reference_parse(blob)
    for spec in header.tensors:
        assert bytes(reference[spec.name]["data"]) == blob[spec.file_begin : spec.file_end]


@settings(max_examples=200, deadline=None)
@given(tensor_files(), st.data())
def test_truncated_or_extended_files_are_rejected(
    file: tuple[bytes, list[TensorSpec]], data: st.DataObject
) -> None:
    blob, _ = file
    n = header_length(blob, len(blob), NAME)
    delta = data.draw(st.integers(-len(blob) + 8 + n, 16).filter(lambda d: d != 0))
    size = len(blob) + delta  # delta >= -data_bytes: the header itself stays whole
    with pytest.raises(InvalidCheckpoint, match=r"truncated|no tensor"):
        parse_header(blob[8 : 8 + n], size, NAME)


# --- fill planning ---


@settings(max_examples=300, deadline=None)
@given(tensor_files(), st.integers(1, 64))
def test_plan_fill_puts_every_data_byte_in_exactly_one_tensor_place(
    file: tuple[bytes, list[TensorSpec]], chunk_bytes: int
) -> None:
    blob, _ = file
    header = parse_file(blob)
    plan = plan_fill(header, chunk_bytes)

    at = header.data_start
    seen: Counter[int] = Counter()
    filled = [bytearray(s.nbytes) for s in header.tensors]
    for read in plan:
        assert read.start == at and 0 < read.length <= chunk_bytes
        got = blob[read.start : read.start + read.length]  # what the network delivers
        offset = 0
        for piece in read.pieces:
            spec = header.tensors[piece.tensor_index]
            assert piece.read_offset == offset and piece.nbytes > 0
            assert spec.begin + piece.tensor_byte_offset == read.start - header.data_start + offset
            assert piece.tensor_byte_offset + piece.nbytes <= spec.nbytes
            lo, hi = piece.read_offset, piece.read_offset + piece.nbytes
            filled[piece.tensor_index][
                piece.tensor_byte_offset : piece.tensor_byte_offset + piece.nbytes
            ] = got[lo:hi]
            seen.update(
                range(
                    spec.file_begin + piece.tensor_byte_offset,
                    spec.file_begin + piece.tensor_byte_offset + piece.nbytes,
                )
            )
            offset += piece.nbytes
        assert offset == read.length
        at += read.length
    assert at == len(blob)
    assert all(read.length == chunk_bytes for read in plan[:-1])
    assert seen == Counter(range(header.data_start, len(blob)))
    for spec, got_bytes in zip(header.tensors, filled, strict=True):
        assert bytes(got_bytes) == blob[spec.file_begin : spec.file_end]


def test_one_read_fills_many_small_tensors_and_many_reads_fill_one_big_tensor() -> None:
    header = u8_header({"a": 2, "b": 1, "empty": 0, "c": 3, "big": 10})
    plan = plan_fill(header, 8)
    start = header.data_start
    assert [(r.start - start, r.length) for r in plan] == [(0, 8), (8, 8)]
    assert [tuple(p) for p in plan[0].pieces] == [
        (0, 0, 0, 2),
        (1, 0, 2, 1),
        (3, 0, 3, 3),
        (4, 0, 6, 2),
    ]
    assert [tuple(p) for p in plan[1].pieces] == [(4, 2, 0, 8)]
    assert header.tensors[2].name == "empty"


def test_plan_fill_refuses_a_non_positive_chunk_size() -> None:
    with pytest.raises(UsageError, match="chunk_bytes must be positive"):
        plan_fill(u8_header({"a": 1}), 0)


# --- sharded checkpoints ---

INDEX = "gs://models/model.safetensors.index.json"


def index_bytes(weight_map: Any, **extra: Any) -> bytes:
    return json.dumps({"metadata": {"total_size": 6}, "weight_map": weight_map, **extra}).encode()


def two_shards() -> tuple[ShardIndex, dict[str, SafetensorsHeader]]:
    index = parse_index(
        index_bytes({"a": "m-1.safetensors", "b": "m-1.safetensors", "c": "sub/m-2.safetensors"}),
        INDEX,
    )
    headers = {
        "m-1.safetensors": u8_header({"a": 1, "b": 2}),
        "sub/m-2.safetensors": u8_header({"c": 3}),
    }
    return index, headers


def test_consistent_index_and_shards_pass_and_keep_index_metadata() -> None:
    index, headers = two_shards()
    check_shards(index, headers)
    assert index.metadata == {"total_size": 6}
    assert index.shards == ("m-1.safetensors", "sub/m-2.safetensors")
    assert index.name == INDEX


@pytest.mark.parametrize(
    ("raw", "cause"),
    [
        pytest.param(b'{"weight_map": ', "not valid JSON", id="invalid-json"),
        pytest.param(
            b'{"weight_map": {"a": "x"}, "weight_map": {}}',
            "duplicate key 'weight_map'",
            id="duplicate-key",
        ),
        pytest.param(b"[]", "not a JSON object", id="not-an-object"),
        pytest.param(b'{"metadata": {}}', "no weight_map", id="missing-weight-map"),
        pytest.param(index_bytes(["a"]), "weight_map is list", id="weight-map-not-object"),
        pytest.param(index_bytes({"a": 3}), "'a' maps to 3, not a string", id="non-string-shard"),
        pytest.param(index_bytes({"a": "../other/m.safetensors"}), "escapes", id="dotdot"),
        pytest.param(index_bytes({"a": "sub/../../m.safetensors"}), "escapes", id="inner-dotdot"),
        pytest.param(
            index_bytes({"a": "sub\\..\\..\\m.safetensors"}), "escapes", id="backslash-dotdot"
        ),
        pytest.param(index_bytes({"a": "/etc/m.safetensors"}), "absolute", id="absolute"),
        pytest.param(index_bytes({"a": "C:\\m.safetensors"}), "absolute", id="drive-letter"),
        pytest.param(index_bytes({"a": ""}), "absolute or empty", id="empty-path"),
        pytest.param(
            index_bytes({"a": "m.safetensors"}, metadata=[1]),
            "metadata is list",
            id="metadata-not-object",
        ),
    ],
)
def test_malformed_index_is_rejected_naming_the_index_and_cause(raw: bytes, cause: str) -> None:
    with pytest.raises(InvalidCheckpoint) as info:
        parse_index(raw, INDEX)
    assert cause in str(info.value)
    assert str(info.value).startswith(INDEX + ": ")


def _drop_shard(h: dict[str, SafetensorsHeader]) -> None:
    del h["sub/m-2.safetensors"]


def _move_c(h: dict[str, SafetensorsHeader]) -> None:
    h["sub/m-2.safetensors"] = u8_header({"d": 3})
    h["m-3.safetensors"] = u8_header({"c": 3})


def _duplicate_b(h: dict[str, SafetensorsHeader]) -> None:
    h["sub/m-2.safetensors"] = u8_header({"c": 3, "b": 1})


def _lose_c(h: dict[str, SafetensorsHeader]) -> None:
    h["sub/m-2.safetensors"] = u8_header({"d": 3})


@pytest.mark.parametrize(
    ("damage", "cause"),
    [
        pytest.param(
            _drop_shard,
            "index names shard sub/m-2.safetensors which is missing",
            id="missing-shard",
        ),
        pytest.param(
            _move_c,
            "'c' to shard sub/m-2.safetensors, but it is in m-3.safetensors",
            id="tensor-in-another-shard",
        ),
        pytest.param(
            _lose_c,
            "'c' to shard sub/m-2.safetensors, but no shard has it",
            id="tensor-in-no-shard",
        ),
        pytest.param(
            _duplicate_b,
            "'b' is a duplicate: it appears in shards m-1.safetensors and sub/m-2.safetensors",
            id="tensor-in-two-shards",
        ),
    ],
)
def test_index_inconsistent_with_shards_is_rejected(
    damage: Callable[[dict[str, SafetensorsHeader]], None], cause: str
) -> None:
    index, headers = two_shards()
    damage(headers)
    with pytest.raises(InvalidCheckpoint) as info:
        check_shards(index, headers)
    assert cause in str(info.value)


def test_shard_tensor_missing_from_index_fails_strict_and_only_warns_otherwise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    index, headers = two_shards()
    headers["m-1.safetensors"] = u8_header({"a": 1, "b": 2, "extra": 4})
    with pytest.raises(InvalidCheckpoint, match=r"not in the index, e\.g\. 'extra'"):
        check_shards(index, headers)
    with caplog.at_level(logging.WARNING, logger=fmt.__name__):
        check_shards(index, headers, strict=False)
    assert "'extra' in m-1.safetensors" in caplog.text


def test_docstring_examples_run() -> None:
    result = doctest.testmod(fmt)
    assert result.attempted >= 3 and result.failed == 0
