"""The model-shaped data set the fetch benchmark copies, and the check that a copy is exact.

Random content (incompressible, so no tool gains from compression), safetensors-style shard names
plus the small JSON files a Hugging Face checkpoint carries. Not a valid checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True)
class DataFile:
    key: str  # relative to the prefix, e.g. "model-00001-of-00004.safetensors"
    path: Path
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class DataSet:
    root: Path
    files: tuple[DataFile, ...]

    @property
    def bytes_total(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def shard_names(self) -> list[str]:
        return [f.key for f in self.files if f.key.endswith(".safetensors")]


def _write_random(path: Path, size_bytes: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size_bytes
        while left > 0:
            block = os.urandom(min(_BLOCK, left))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def make_dataset(root: Path, shards: int, shard_bytes: int) -> DataSet:
    """Write ``shards`` random shards of ``shard_bytes`` plus config/tokenizer/index JSON."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    files: list[DataFile] = []
    for name in names:
        path = root / name
        files.append(DataFile(name, path, shard_bytes, _write_random(path, shard_bytes)))
    small = {
        "config.json": {"architectures": ["BenchForCausalLM"], "hidden_size": 4096},
        "tokenizer.json": {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}},
        "model.safetensors.index.json": {
            "metadata": {"total_size": shards * shard_bytes},
            "weight_map": {f"layers.{i}.weight": name for i, name in enumerate(names)},
        },
    }
    for name, payload in small.items():
        path = root / name
        path.write_text(json.dumps(payload, indent=2))
        files.append(DataFile(name, path, path.stat().st_size, _sha256_file(path)))
    return DataSet(root, tuple(files))


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str  # "" when ok; otherwise what is missing, wrong or extra
    root: Path | None  # where the tool put the files (DEST or DEST/model)


def verify_copy(dest: Path, dataset: DataSet, prefix_dir: str = "model") -> Verdict:
    """Every source file present under DEST (or DEST/<prefix_dir>, as ``cp -r`` lays it out)
    with the same sha256. Extra files (tool temp files) are reported but do not fail the run."""
    first = dataset.files[0].key
    candidates = [dest, dest / prefix_dir]
    root = next((c for c in candidates if (c / first).is_file()), None)
    if root is None:
        found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())[:8]
        return Verdict(False, f"no {first} under {dest} (found: {found or 'nothing'})", None)
    problems: list[str] = []
    for f in dataset.files:
        out = root / f.key
        if not out.is_file():
            problems.append(f"missing {f.key}")
        elif out.stat().st_size != f.size_bytes:
            problems.append(f"{f.key}: {out.stat().st_size} bytes, want {f.size_bytes}")
        elif _sha256_file(out) != f.sha256:
            problems.append(f"{f.key}: sha256 mismatch")
    if problems:
        return Verdict(False, "; ".join(problems), root)
    expected = {f.key for f in dataset.files}
    extra = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file()
        and str(p.relative_to(root)) not in expected
        # spotstart's own resume journal/index, documented in bench/README.md
        and not str(p.relative_to(root)).startswith(".spotstart/")
    )
    return Verdict(True, f"extra files: {extra[:5]}" if extra else "", root)
