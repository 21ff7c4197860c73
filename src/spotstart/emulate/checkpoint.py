"""Model-shaped test data: sharded safetensors checkpoints written per the format spec
(8-byte little-endian header length, JSON header, packed data) plus the small JSON files a
model directory holds. For tests, the demo and benchmarks; nothing is downloaded."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1}


def _fill(f: object, nbytes: int, seed: int) -> None:
    # Unique content per MiB (index stamped into a random block) so a chunk written at the
    # wrong offset cannot go unnoticed; cheaper than os.urandom for gigabytes.
    block = bytearray(os.urandom(1 << 20))
    done = 0
    i = 0
    write = f.write  # type: ignore[attr-defined]
    while done < nbytes:
        block[:16] = struct.pack("<QQ", seed, i)
        n = min(len(block), nbytes - done)
        write(block[:n])
        done += n
        i += 1


def write_safetensors(path: Path, tensors: list[tuple[str, str, list[int]]], seed: int = 0) -> int:
    """Write a safetensors file with random contents; returns its size in bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        n = _DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the spec allows padding the header with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        _fill(f, offset, seed)
    return 8 + len(raw) + offset


def write_checkpoint(
    root: Path, shards: int, shard_bytes: int, *, hidden: int = 1024
) -> dict[str, int]:
    """A sharded checkpoint like a Hugging Face model directory. Each shard holds layers of
    ``hidden x hidden`` BF16 matrices up to about ``shard_bytes``. Returns {name: size}."""
    root.mkdir(parents=True, exist_ok=True)
    per_matrix = hidden * hidden * 2
    per_shard = max(1, shard_bytes // per_matrix)
    sizes: dict[str, int] = {}
    weight_map: dict[str, str] = {}
    layer = 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = []
        for _ in range(per_shard):
            tname = f"model.layers.{layer}.weight"
            tensors.append((tname, "BF16", [hidden, hidden]))
            weight_map[tname] = name
            layer += 1
        sizes[name] = write_safetensors(root / name, tensors, seed=s)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    for fname, body in (
        ("model.safetensors.index.json", index),
        (
            "config.json",
            {
                "architectures": ["DemoForCausalLM"],
                "hidden_size": hidden,
                "num_hidden_layers": layer,
                "torch_dtype": "bfloat16",
            },
        ),
        ("tokenizer_config.json", {"model_max_length": 8192}),
    ):
        (root / fname).write_text(json.dumps(body, indent=1))
        sizes[fname] = (root / fname).stat().st_size
    return sizes
