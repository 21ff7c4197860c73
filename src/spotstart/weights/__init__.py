"""Safetensors checkpoints: the format's pure core (``format``: header and shard-index
validation, fill planning), the loader that fills torch tensors as the bytes arrive
(``loader``), and the stream that hands them over one by one within a memory window
(``stream``: ``iter_tensors``, ``aiter_tensors``; imported on first use)."""

import typing as _typing

from spotstart.weights.format import (
    FillPiece,
    FillRange,
    SafetensorsHeader,
    ShardIndex,
    TensorSpec,
    check_shards,
    header_length,
    parse_header,
    parse_index,
    plan_fill,
)

if _typing.TYPE_CHECKING:
    from spotstart.weights.stream import (
        AsyncTensorStream,
        TensorStream,
        aiter_tensors,
        iter_tensors,
    )

_LAZY = {"AsyncTensorStream", "TensorStream", "aiter_tensors", "iter_tensors"}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        from spotstart.weights import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'spotstart.weights' has no attribute {name!r}")


__all__ = [
    "AsyncTensorStream",
    "FillPiece",
    "FillRange",
    "SafetensorsHeader",
    "ShardIndex",
    "TensorSpec",
    "TensorStream",
    "aiter_tensors",
    "check_shards",
    "header_length",
    "iter_tensors",
    "parse_header",
    "parse_index",
    "plan_fill",
]
