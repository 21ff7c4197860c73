"""The safetensors format as data: header and shard-index validation, and the plan of which
ranged reads fill which tensor bytes. Pure: no I/O, no torch; the loader wraps it.

Format (huggingface/safetensors README): an 8-byte little-endian u64 N, N bytes of UTF-8 JSON
header (maybe padded with spaces), then the data buffer the header's offsets point into.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from spotstart.errors import InvalidCheckpoint, UsageError

# The reference implementation refuses larger headers (a guard against absurd allocations).
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"

# Bits per element of every dtype the reference implementation (safetensors 0.8) accepts.
# Sub-byte dtypes (F4, F6_*) are packed: a tensor of them must end on a byte boundary.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
# Bytes per element of the whole-byte dtypes (every dtype above except F4 and F6_*).
DTYPE_BYTES: dict[str, int] = {d: b // 8 for d, b in DTYPE_BITS.items() if b % 8 == 0}

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a safetensors file. ``begin``/``end`` are relative to the data buffer
    (as in the header); ``file_begin``/``file_end`` are the same bytes within the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    data_start: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def file_begin(self) -> int:
        return self.data_start + self.begin

    @property
    def file_end(self) -> int:
        return self.data_start + self.end


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header. ``tensors`` are in the order of their bytes (by ``begin``), so they
    tile ``[0, data_bytes)`` exactly; ``data_start`` = 8 + ``header_bytes``."""

    tensors: tuple[TensorSpec, ...]
    metadata: dict[str, str] = field(hash=False)
    header_bytes: int
    data_start: int
    data_bytes: int

    @property
    def file_bytes(self) -> int:
        return self.data_start + self.data_bytes

    def tensor(self, name: str) -> TensorSpec:
        """The spec of tensor ``name``; KeyError if the file has none."""
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(name)


@dataclass(frozen=True)
class ShardIndex:
    """A ``model.safetensors.index.json``: which shard file (relative path) holds each tensor."""

    name: str
    weight_map: dict[str, str] = field(hash=False)
    metadata: dict[str, Any] = field(hash=False, default_factory=dict)

    @property
    def shards(self) -> tuple[str, ...]:
        """The shard files the index names, sorted, each once."""
        return tuple(sorted(set(self.weight_map.values())))


class FillPiece(NamedTuple):
    """Bytes ``[read_offset, read_offset + nbytes)`` of a read are bytes
    ``[tensor_byte_offset, tensor_byte_offset + nbytes)`` of ``header.tensors[tensor_index]``."""

    tensor_index: int
    tensor_byte_offset: int
    read_offset: int
    nbytes: int


@dataclass(frozen=True)
class FillRange:
    """One ranged read of ``length`` bytes at file offset ``start``, and the tensor bytes it
    fills, in order; the pieces tile the read exactly."""

    start: int
    length: int
    pieces: tuple[FillPiece, ...]


def header_length(prefix: bytes, file_size: int, name: str) -> int:
    """N, the header's length, from the first 8 bytes of file ``name`` (``file_size`` bytes).

    >>> header_length(b"\\x02\\0\\0\\0\\0\\0\\0\\0{}", 10, "m.safetensors")
    2
    """
    if file_size < 8:
        raise InvalidCheckpoint(
            f"{name}: only {file_size} bytes, shorter than the 8-byte header length of a "
            "safetensors file; the file is truncated or not safetensors"
        )
    if len(prefix) < 8:
        raise InvalidCheckpoint(
            f"{name}: got {len(prefix)} bytes of the 8-byte header length although the file "
            f"has {file_size}; the read was cut short"
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise InvalidCheckpoint(
            f"{name}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit; the file "
            "is not safetensors or is corrupt"
        )
    if 8 + n > file_size:
        raise InvalidCheckpoint(
            f"{name}: header of {n} bytes does not fit in the file's {file_size} bytes; the "
            "file is truncated or not safetensors"
        )
    return int(n)


def _no_duplicates(name: str, what: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise InvalidCheckpoint(
                    f"{name}: duplicate key {key!r} in the {what}; JSON keys must be unique"
                )
            out[key] = value
        return out

    return hook


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _load_json(raw: bytes, name: str, what: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCheckpoint(
            f"{name}: {what} is not valid UTF-8 (byte {exc.start}); the file is corrupt"
        ) from exc
    try:
        return json.loads(
            text, object_pairs_hook=_no_duplicates(name, what), parse_constant=_reject_constant
        )
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, InvalidCheckpoint):
            raise
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidCheckpoint(f"{name}: {what} is not valid JSON ({detail})") from exc


INT64_MAX = (1 << 63) - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(name: str, tensor: str, entry: object, data_start: int) -> TensorSpec:
    where = f"{name}: tensor {tensor!r}"
    if not isinstance(entry, dict):
        raise InvalidCheckpoint(
            f"{where}: entry is {type(entry).__name__}, not an object with dtype, shape and "
            "data_offsets"
        )
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise InvalidCheckpoint(f"{where}: entry lacks field {', '.join(missing)}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InvalidCheckpoint(f"{where}: unknown dtype {dtype!r}; known: {', '.join(DTYPE_BITS)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidCheckpoint(
            f"{where}: bad shape {shape!r}; a shape is a list of non-negative integers"
        )
    # safetensors' reference checks the element count with overflow-checked u64 arithmetic;
    # torch needs every dimension (and the strides built from them) to fit an int64. A zero
    # dimension does not excuse a huge one beside it.
    if any(d > INT64_MAX for d in shape) or math.prod(d for d in shape if d) > INT64_MAX:
        raise InvalidCheckpoint(
            f"{where}: shape {shape!r} overflows 64-bit sizes; no tensor has such a shape"
        )
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise InvalidCheckpoint(
            f"{where}: bad data_offsets {offsets!r}; expected [begin, end], non-negative integers"
        )
    begin, end = offsets
    if begin > end:
        raise InvalidCheckpoint(f"{where}: data_offsets begin {begin} > end {end}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise InvalidCheckpoint(
            f"{where}: {math.prod(shape)} elements of {dtype} do not end on a byte boundary"
        )
    if bits // 8 != end - begin:
        raise InvalidCheckpoint(
            f"{where}: shape {shape} of {dtype} needs {bits // 8} bytes but data_offsets "
            f"[{begin}, {end}] span {end - begin}; the size mismatches the byte span"
        )
    return TensorSpec(tensor, dtype, tuple(shape), begin, end, data_start)


def parse_header(raw: bytes, file_size: int, name: str) -> SafetensorsHeader:
    """Validate the ``N`` header bytes (after the length word) of file ``name`` of
    ``file_size`` bytes, as strictly as the reference implementation: every byte of the data
    buffer belongs to exactly one tensor. Raises :class:`InvalidCheckpoint` naming the cause.

    Example::

        n = header_length(prefix, size, "m.safetensors")
        header = parse_header(prefix[8 : 8 + n], size, "m.safetensors")
        header.tensor("lm_head.weight").file_begin
    """
    n = len(raw)
    data_start = 8 + n
    data_bytes = file_size - data_start
    if data_bytes < 0:
        raise InvalidCheckpoint(
            f"{name}: header of {n} bytes does not fit in the file's {file_size} bytes; the "
            "file is truncated"
        )
    if not raw.startswith(b"{"):
        raise InvalidCheckpoint(
            f"{name}: header does not start with '{{' (starts with {raw[:8]!r}); the file is "
            "not safetensors or is corrupt"
        )
    doc = _load_json(raw, name, "header")
    if not isinstance(doc, dict):  # pragma: no cover - '{' start guarantees an object
        raise InvalidCheckpoint(f"{name}: header is not a JSON object")
    metadata = doc.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidCheckpoint(
            f"{name}: {METADATA_KEY} must be an object of string to string, got {metadata!r:.80}"
        )
    specs = [_tensor_entry(name, t, e, data_start) for t, e in doc.items()]
    for spec in specs:
        if spec.end > data_bytes:
            raise InvalidCheckpoint(
                f"{name}: tensor {spec.name!r} ends at data byte {spec.end}, beyond the "
                f"{data_bytes} data bytes the file holds: the file is truncated (or the "
                "offsets are out of range)"
            )
    specs.sort(key=lambda s: (s.begin, s.end, s.name))
    previous: TensorSpec | None = None
    for spec in specs:
        at = previous.end if previous else 0
        if spec.begin < at:
            assert previous is not None
            raise InvalidCheckpoint(
                f"{name}: tensors {previous.name!r} [{previous.begin}, {previous.end}] and "
                f"{spec.name!r} [{spec.begin}, {spec.end}] are overlapping"
            )
        if spec.begin > at:
            raise InvalidCheckpoint(
                f"{name}: hole in the data: bytes [{at}, {spec.begin}) belong to no tensor "
                f"(before {spec.name!r})"
            )
        previous = spec
    covered = previous.end if previous else 0
    if covered != data_bytes:
        raise InvalidCheckpoint(
            f"{name}: tensors cover {covered} of the {data_bytes} data bytes; "
            f"{data_bytes - covered} trailing bytes belong to no tensor (not covering the data)"
        )
    return SafetensorsHeader(tuple(specs), dict(metadata), n, data_start, data_bytes)


def _check_shard_path(name: str, tensor: str, path: str) -> None:
    parts = path.replace("\\", "/").split("/")
    if not path or path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        raise InvalidCheckpoint(
            f"{name}: tensor {tensor!r} maps to {path!r}, an absolute or empty path; shard "
            "paths must be relative to the index's directory"
        )
    if ".." in parts:
        raise InvalidCheckpoint(
            f"{name}: tensor {tensor!r} maps to {path!r}, which escapes the index's directory "
            "('..'); shard paths must stay inside it"
        )


def parse_index(raw: bytes, name: str) -> ShardIndex:
    """Validate a sharded checkpoint's ``model.safetensors.index.json`` (file ``name``).

    >>> parse_index(b'{"weight_map": {"w": "a.safetensors"}}', "i.json").shards
    ('a.safetensors',)
    """
    doc = _load_json(raw, name, "index")
    if not isinstance(doc, dict):
        raise InvalidCheckpoint(f"{name}: index is {type(doc).__name__}, not a JSON object")
    if "weight_map" not in doc:
        raise InvalidCheckpoint(
            f"{name}: index has no weight_map; it is not a safetensors shard index"
        )
    weight_map = doc["weight_map"]
    if not isinstance(weight_map, dict):
        raise InvalidCheckpoint(
            f"{name}: weight_map is {type(weight_map).__name__}, not an object of tensor to "
            "shard file"
        )
    for tensor, path in weight_map.items():
        if not isinstance(path, str):
            raise InvalidCheckpoint(
                f"{name}: tensor {tensor!r} maps to {path!r}, not a string shard file name"
            )
        _check_shard_path(name, tensor, path)
    metadata = doc.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise InvalidCheckpoint(f"{name}: metadata is {type(metadata).__name__}, not a JSON object")
    return ShardIndex(name, dict(weight_map), dict(metadata))


def check_shards(
    index: ShardIndex, headers: Mapping[str, SafetensorsHeader], strict: bool = True
) -> None:
    """Check the index against the shards' headers (keyed by the index's shard paths): every
    shard named exists, every indexed tensor is in its shard, no tensor is in two shards, and
    (only when ``strict``; else logged as a warning) every shard tensor is in the index."""
    name = index.name
    for shard in index.shards:
        if shard not in headers:
            raise InvalidCheckpoint(f"{name}: index names shard {shard} which is missing")
    home: dict[str, str] = {}
    for shard in sorted(headers):
        for spec in headers[shard].tensors:
            other = home.setdefault(spec.name, shard)
            if other != shard:
                raise InvalidCheckpoint(
                    f"{name}: tensor {spec.name!r} is a duplicate: it appears in shards "
                    f"{other} and {shard}"
                )
    for tensor, shard in sorted(index.weight_map.items()):
        actual = home.get(tensor)
        if actual != shard:
            where = f"it is in {actual}" if actual else "no shard has it"
            raise InvalidCheckpoint(
                f"{name}: index maps tensor {tensor!r} to shard {shard}, but {where}"
            )
    unindexed = sorted(t for t in home if t not in index.weight_map)
    if unindexed:
        message = (
            f"{name}: {len(unindexed)} shard tensors are not in the index, e.g. "
            f"{unindexed[0]!r} in {home[unindexed[0]]}"
        )
        if strict:
            raise InvalidCheckpoint(message + "; the index is stale or incomplete")
        _log.warning("%s", message)


def plan_fill(header: SafetensorsHeader, chunk_bytes: int) -> list[FillRange]:
    """Split the data region into reads of ``chunk_bytes`` (the last one shorter) and say which
    tensor bytes each read fills. A read may fill many small tensors and a large tensor may
    be filled by many reads; every data byte lands in exactly one piece. Zero-size tensors
    need no bytes and appear in no piece.

    >>> raw = b'{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}'
    >>> h = parse_header(raw, 8 + len(raw) + 3, "m")
    >>> [(r.start - h.data_start, r.length, r.pieces) for r in plan_fill(h, 2)][1]
    (2, 1, (FillPiece(tensor_index=0, tensor_byte_offset=2, read_offset=0, nbytes=1),))
    """
    if chunk_bytes <= 0:
        raise UsageError(f"chunk_bytes must be positive, got {chunk_bytes}")
    tensors = header.tensors
    ranges: list[FillRange] = []
    t = 0
    for lo in range(0, header.data_bytes, chunk_bytes):
        hi = min(lo + chunk_bytes, header.data_bytes)
        pieces: list[FillPiece] = []
        pos = lo
        while pos < hi:
            while tensors[t].end <= pos:  # skips finished and zero-size tensors
                t += 1
            spec = tensors[t]
            n = min(spec.end, hi) - pos
            pieces.append(FillPiece(t, pos - spec.begin, pos - lo, n))
            pos += n
        ranges.append(FillRange(header.data_start + lo, hi - lo, tuple(pieces)))
    return ranges


__all__ = [
    "DTYPE_BITS",
    "DTYPE_BYTES",
    "MAX_HEADER_BYTES",
    "FillPiece",
    "FillRange",
    "SafetensorsHeader",
    "ShardIndex",
    "TensorSpec",
    "check_shards",
    "header_length",
    "parse_header",
    "parse_index",
    "plan_fill",
]
