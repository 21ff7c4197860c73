"""Directories a peer server serves, written by hand the way a fetch leaves them (cache index,
part files and journals), and a raw HTTP/1.1 client that sends a request byte for byte: the
peer-server tests need neither a cloud emulator nor a fetch to set up what is served."""

from __future__ import annotations

import json
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path

from spotstart.fetch.journal import JournalHeader
from spotstart.fetch.layout import work_paths
from spotstart.fetch.peers import object_id

SOURCE = "gs://bucket/model/"


@dataclass(frozen=True)
class Served:
    """One object a directory holds: its id and its bytes."""

    oid: str
    data: bytes


def add_complete(root: Path, rel: str, data: bytes, *, at: Path | None = None) -> Served:
    """``rel`` as a finished file listed in ``root``'s cache index. ``at``: write the bytes
    there instead (a file some link under ``root`` points to); the index records its mtime."""
    path = at if at is not None else root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    index_path = root / ".spotstart" / "index.json"
    index_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        index = {"version": 1, "files": {}}
    source = SOURCE + rel
    index["files"][rel] = {
        "source": source,
        "version": "1",
        "size": len(data),
        "mtime_ns": path.stat().st_mtime_ns,
    }
    index_path.write_text(json.dumps(index))
    return Served(object_id(source, "1", len(data)), data)


def add_arriving(root: Path, rel: str, data: bytes, chunk_bytes: int) -> tuple[Served, Path]:
    """``rel`` still arriving: its part file holds every byte, its journal lists every chunk.
    Returns the object and its part file."""
    part, journal = work_paths(root, rel)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    source = SOURCE + rel
    header = JournalHeader(source=source, size=len(data), version="1", chunk_bytes=chunk_bytes)
    lines = [header.to_json()]
    for i, at in enumerate(range(0, len(data), chunk_bytes)):
        lines.append(f"{i} {zlib.crc32(data[at : at + chunk_bytes]):08x}")
    journal.write_text("\n".join(lines) + "\n")
    return Served(object_id(source, "1", len(data)), data), part


def http_get(
    address: str, target: str, headers: dict[str, str] | None = None, timeout_s: float = 10
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection: (status, body)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        head = [f"GET {target} HTTP/1.1", f"Host: {address}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        raw = b""
        while chunk := s.recv(1 << 16):
            raw += chunk
    top, _, body = raw.partition(b"\r\n\r\n")
    return int(top.split(b" ", 2)[1]), body


def range_of(served: Served, start: int, end: int, token: str | None = None) -> dict[str, str]:
    """Headers for bytes [start, end) of ``served``."""
    headers = {"Range": f"bytes={start}-{end - 1}"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def make_token_file(path: Path, token: str = "0123456789abcdef" * 4, mode: int = 0o600) -> Path:
    path.write_text(token + "\n")
    os.chmod(path, mode)
    return path
