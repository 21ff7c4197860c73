"""Tensor-parallel slices of an unmodified checkpoint (pure): which dimension of each tensor
a rank holds a part of, the byte ranges of that part in the file, and those ranges coalesced
into reads.

Megatron's terms, in PyTorch's ``[out, in]`` weight layout: a column-parallel linear (q/k/v,
gate/up) splits its output features, dim 0: each rank's part is one contiguous range. A
row-parallel linear (o_proj, down_proj) splits its input features, dim 1: one short range per
row. Embeddings and the LM head split the vocabulary (dim 0); norms are replicated. The rules
are vLLM's for Llama-family checkpoints (``default_split``); pass ``split`` for others.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spotstart.errors import UsageError
from spotstart.weights.format import DTYPE_BYTES, TensorSpec

SplitRule = Callable[[str, tuple[int, ...]], int | None]

_DIM0 = re.compile(
    r"(?:^|\.)(?:q_proj|k_proj|v_proj|gate_proj|up_proj|embed_tokens|lm_head)\.(?:weight|bias)$"
)
_DIM1 = re.compile(r"(?:^|\.)(?:o_proj|down_proj)\.weight$")
MAX_GAP_BYTES = 1 << 20  # a gap this small is read through: one request beats two
# 4 MiB reads: measured beside 16 MiB (bench/load/tp.py, 8 ranks): 10% faster and 100 MB less
# peak memory (fewer bytes in flight), the link still full at 16 streams.
MAX_READ_BYTES = 4 << 20


def default_split(name: str, shape: tuple[int, ...]) -> int | None:
    """vLLM's layout for Llama, Mistral, Qwen2 and kin: the dimension split, or None for a
    tensor every rank holds whole."""
    if _DIM0.search(name) and len(shape) >= 1:
        return 0
    if _DIM1.search(name) and len(shape) == 2:
        return 1
    return None


@dataclass(frozen=True)
class Piece:
    """``length`` bytes at file offset ``src`` land at byte ``dst`` of tensor ``tensor``."""

    tensor: int
    src: int
    length: int
    dst: int


@dataclass(frozen=True)
class TensorSlice:
    name: str
    dtype: str
    shape: tuple[int, ...]  # this rank's shape
    dim: int | None
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)


@dataclass(frozen=True)
class Read:
    """One ranged read ``[start, start + length)`` of the file and the pieces it carries."""

    start: int
    length: int
    pieces: tuple[Piece, ...]


def slice_tensor(
    index: int, spec: TensorSpec, rank: int, world: int, dim: int | None
) -> TensorSlice:
    if dim is None or world == 1:
        piece = Piece(index, spec.file_begin, spec.nbytes, 0)
        return TensorSlice(spec.name, spec.dtype, spec.shape, None, (piece,) if spec.nbytes else ())
    if not 0 <= dim < len(spec.shape):
        raise UsageError(f"{spec.name}: cannot split dim {dim} of a {len(spec.shape)}-D tensor")
    size = spec.shape[dim]
    if size % world:
        raise UsageError(
            f"{spec.name}: dim {dim} of shape {list(spec.shape)} ({size}) does not divide into "
            f"{world} ranks; give a split rule that keeps it whole"
        )
    item = DTYPE_BYTES.get(spec.dtype)
    if item is None:
        raise UsageError(f"{spec.name}: {spec.dtype} has no whole-byte elements to split")
    outer = math.prod(spec.shape[:dim])
    inner = math.prod(spec.shape[dim + 1 :]) * item
    part = size // world
    block, stride = part * inner, size * inner
    base = spec.file_begin + rank * block
    pieces = tuple(Piece(index, base + o * stride, block, o * block) for o in range(outer))
    shape = (*spec.shape[:dim], part, *spec.shape[dim + 1 :])
    return TensorSlice(spec.name, spec.dtype, shape, dim, pieces)


def plan(
    tensors: Sequence[TensorSpec], rank: int, world: int, split: SplitRule = default_split
) -> list[TensorSlice]:
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"tp=({rank}, {world}): rank must be in [0, world)")
    return [slice_tensor(i, t, rank, world, split(t.name, t.shape)) for i, t in enumerate(tensors)]


def coalesce(
    slices: Sequence[TensorSlice],
    max_gap: int = MAX_GAP_BYTES,
    max_read: int = MAX_READ_BYTES,
) -> list[Read]:
    """Pieces in file order merged into reads: across gaps up to ``max_gap`` (bytes read and
    dropped) and up to ``max_read`` bytes a read; a piece longer than that is cut."""
    pieces: list[Piece] = []
    for s in slices:
        for p in s.pieces:
            for off in range(0, p.length, max_read):
                n = min(max_read, p.length - off)
                pieces.append(Piece(p.tensor, p.src + off, n, p.dst + off))
    pieces.sort(key=lambda p: p.src)
    reads: list[Read] = []
    start = end = 0
    group: list[Piece] = []
    for p in pieces:
        if group and p.src - end <= max_gap and p.src + p.length - start <= max_read:
            group.append(p)
            end = max(end, p.src + p.length)
            continue
        if group:
            reads.append(Read(start, end - start, tuple(group)))
        group, start, end = [p], p.src, p.src + p.length
    if group:
        reads.append(Read(start, end - start, tuple(group)))
    return reads
