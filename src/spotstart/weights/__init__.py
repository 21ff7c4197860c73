"""Safetensors checkpoints: the format's pure core (``format``: header and shard-index
validation, fill planning) and the loader that fills torch tensors as the bytes arrive."""

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

__all__ = [
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
