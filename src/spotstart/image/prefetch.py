"""The prefetch lists lazy-pulling snapshotters take, each in its documented format (pure
writers), and the checks of a list against the image it is for.

- eStargz (`nerdctl image convert --estargz --estargz-record-in FILE`, `ctr-remote`): JSON
  lines, one ``{"path": ...}`` object each; paths as tar entries (no leading ``/``), which
  estargz's converter cleans and matches in order.
- SOCI (`soci create --prefetch-files-json FILE`): one JSON array of absolute paths. SOCI
  loads prefetched files per layer and span, not in the list's order; layers under its zTOC
  minimum (``--min-layer-size``, 10 MiB) get no index and are pulled whole.
- Nydus (`nydus-image create --prefetch-policy fs`, `nydusify convert --prefetch-patterns`):
  absolute paths, one a line, on stdin.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spotstart import safefs
from spotstart.image.tree import MergedTree

SOCI_MIN_LAYER_BYTES = 10 << 20


def estargz_record(paths: Sequence[str]) -> str:
    return "".join(json.dumps({"path": p.lstrip("/")}) + "\n" for p in paths)


def soci_prefetch(paths: Sequence[str]) -> str:
    return json.dumps(list(paths), indent=1) + "\n"


def nydus_prefetch(paths: Sequence[str]) -> str:
    # One path a line: a name from the image holding a line break would add lines of the
    # image's choosing (``/`` prefetches everything), so such a name is left out.
    return "".join(p + "\n" for p in paths if "\n" not in p and "\r" not in p)


def write_all(out_dir: Path, files: Sequence[Any]) -> dict[str, str]:
    """The three lists of the code files (weights excluded) in first-read order."""
    code = [f.path for f in files if f.kind == "code"]
    outputs = {
        "estargz": (out_dir / "estargz-record.jsonl", estargz_record(code)),
        "soci": (out_dir / "soci-prefetch.json", soci_prefetch(code)),
        "nydus": (out_dir / "nydus-prefetch.txt", nydus_prefetch(code)),
    }
    for path, text in outputs.values():
        safefs.write_output(path, text)  # atomic, and never through a link at the name
    return {name: str(path) for name, (path, _) in outputs.items()} | {
        "profile": str(out_dir / "profile.json")
    }


def check_against_image(
    paths: Sequence[str], tree: MergedTree, layer_compressed: Sequence[int]
) -> list[str]:
    """Warnings for one image: listed paths it does not hold, layers SOCI will not index,
    and files SOCI will read in another order than the list."""
    warnings: list[str] = []
    missing = []
    keys: list[tuple[int, int]] = []
    layers_used: set[int] = set()
    for p in paths:
        node = tree.lookup(p)
        if node is None or node.inode is None:
            missing.append(p)
            continue
        keys.append((node.inode.layer, node.inode.seq))
        layers_used.add(node.inode.layer)
    if missing:
        warnings.append(
            f"{len(missing)} listed paths are not files of the image (e.g. {missing[0]}): the "
            "snapshotters skip them; profile the same image you convert"
        )
    small = sorted(i for i in layers_used if layer_compressed[i] < SOCI_MIN_LAYER_BYTES)
    if small:
        warnings.append(
            f"SOCI: layers {', '.join(map(str, small))} are under its 10 MiB zTOC minimum "
            "(--min-layer-size): they get no index and are pulled whole before start"
        )
    out_of_order = sum(1 for a, b in itertools.pairwise(keys) if b < a)
    if out_of_order:
        warnings.append(
            f"SOCI prefetches by layer and offset, not in the list's order: {out_of_order} "
            "files will be read out of first-read order (eStargz and Nydus keep it)"
        )
    return warnings
