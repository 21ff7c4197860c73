"""`spotstart manifest URL`: the model's chunk manifest (SHA-256 of every piece), computed
from the origin's bytes as a verified fetch lands them, and uploaded next to the model (or
written with --out) for peers' bytes to be checked against."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from spotstart import safefs, units
from spotstart.errors import IntegrityError, LocalIOError, UsageError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from spotstart.fetch.manifest import DEFAULT_PIECE_BYTES, MANIFEST_NAME, MANIFEST_SUFFIX

    p = sub.add_parser(
        "manifest",
        help="write the model's chunk manifest (SHA-256 per piece) next to it, for peers",
        description="Read every object under URL from the origin (never from peers), verified "
        "by the store's own checksums as fetch verifies them, hash each piece with SHA-256 and "
        f"upload the manifest as {MANIFEST_NAME} in the prefix (KEY{MANIFEST_SUFFIX} for one "
        "object). Fetches with --peers then check every chunk a peer gives against it. Needs "
        "the model's size in free space under --workdir while it runs.",
    )
    p.add_argument("url")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write the manifest to FILE instead of uploading it (the only way for http(s))",
    )
    p.add_argument(
        "--piece-size",
        type=_size,
        default=DEFAULT_PIECE_BYTES,
        help=f"bytes per digest ({DEFAULT_PIECE_BYTES >> 20} MiB)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the objects are read to while hashed, removed after (default: $TMPDIR)",
    )
    p.add_argument("--endpoint", help="store endpoint URL (S3-compatible stores, emulators)")
    p.add_argument("--anonymous", action="store_true", help="send unsigned requests")
    p.add_argument(
        "--verify",
        choices=("auto", "full"),
        default="auto",
        help="how the origin's bytes are checked, as for fetch (auto)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(run=run)


def _size(text: str) -> int:
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from spotstart.fetch import FetchConfig
    from spotstart.fetch.manifest import MAX_PIECE_BYTES, MIN_PIECE_BYTES, build_manifest
    from spotstart.store import ObjectWriter, open_source, parse_url

    if not MIN_PIECE_BYTES <= args.piece_size <= MAX_PIECE_BYTES:
        raise UsageError(
            f"--piece-size must be between {MIN_PIECE_BYTES >> 10} KiB and "
            f"{MAX_PIECE_BYTES >> 20} MiB"
        )
    url = parse_url(args.url)
    if args.out is None and url.scheme in ("http", "https"):
        raise UsageError(f"{args.url}: an http(s) server takes no uploads; use --out FILE")
    config = FetchConfig(verify=args.verify, endpoint=args.endpoint, anonymous=args.anonymous)
    parent = args.workdir or Path(tempfile.gettempdir())
    try:
        work = Path(tempfile.mkdtemp(prefix="spotstart-manifest-", dir=parent))  # 0700
    except OSError as exc:
        raise LocalIOError(f"{parent}: cannot make a work directory: {exc.strerror}") from exc
    t0 = time.monotonic()
    try:
        built = asyncio.run(build_manifest(args.url, work, config, piece_bytes=args.piece_size))
    except ValueError as exc:  # a file changed under the work directory while hashed
        raise IntegrityError(f"{args.url}: {exc}; rerun") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = built.manifest.to_bytes()
    if args.out is not None:
        where = args.out
        _write_local(Path(args.out), body)
    else:
        where = f"{url.scheme}://{url.bucket}/{built.key}" if url.bucket else "/" + built.key

        async def upload() -> None:
            source = open_source(
                url, config.http, endpoint=config.endpoint, anonymous=config.anonymous
            )
            try:
                if not isinstance(source, ObjectWriter):
                    raise UsageError(f"{args.url}: this store takes no uploads; use --out FILE")
                await source.put(built.key, body, "application/json")
            finally:
                await source.close()

        asyncio.run(upload())
    summary = {
        "manifest": where,
        "objects": len(built.manifest.entries),
        "bytes": sum(e.size for e in built.manifest.entries.values()),
        "piece_bytes": args.piece_size,
        "manifest_bytes": len(body),
        "verified": built.report.verified,
        "hash_seconds": built.hash_seconds,
        "seconds": round(time.monotonic() - t0, 3),
    }
    if args.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
    else:
        verified = ", ".join(f"{k} x{v}" for k, v in sorted(built.report.verified.items()))
        Console().print(
            f"[green]{where}: {summary['objects']} objects, "
            f"{summary['bytes'] / 1e6:.1f} MB in {args.piece_size >> 10} KiB pieces[/green] "
            f"(read from the origin, verified: {verified or 'size'})"
        )
    return 0


def _write_local(path: Path, body: bytes) -> None:
    """``body`` to ``path`` atomically, never through a link at its name, through a temporary
    name nobody can guess (:func:`spotstart.safefs.write_output`)."""
    safefs.write_output(path, body)
