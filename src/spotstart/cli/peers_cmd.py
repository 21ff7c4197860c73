"""`spotstart serve-peers DIR --listen HOST:PORT`: serve what DIR holds to other nodes'
fetches (see spotstart.fetch.peer_server), until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from spotstart.errors import UsageError
from spotstart.fetch.peer_server import PeerServer, split_listen
from spotstart.fetch.peers import TOKEN_ENV

DEFAULT_PORT = 8471


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve-peers",
        help="serve the objects a directory holds to other nodes' fetches (read-only)",
        description="Serve byte ranges of the objects DIR holds (complete files of its cache "
        "index, and the finished chunks of files still arriving) to `spotstart fetch --peers`. "
        f"Read-only; objects named by identity, never by path. Token: ${TOKEN_ENV} or "
        "--token-file.",
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument(
        "--listen", default=f"0.0.0.0:{DEFAULT_PORT}", help=f"HOST:PORT (0.0.0.0:{DEFAULT_PORT})"
    )
    add_token_flag(p)
    p.add_argument(
        "--max-active", type=int, default=64, help="requests served at once; more get 503 (64)"
    )
    p.add_argument("--json", action="store_true", help="print the bound address as JSON")
    p.set_defaults(run=run)


def add_token_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--peer-token-file",
        type=Path,
        help=f"file holding the token peers share (default: ${TOKEN_ENV}; none: no token)",
    )


def token_from_args(args: argparse.Namespace) -> str | None:
    path: Path | None = args.peer_token_file
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--peer-token-file {path}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"--peer-token-file {path}: empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def run(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        raise UsageError(f"{args.dir}: no such directory")
    if args.max_active < 1:
        raise UsageError("--max-active must be >= 1")
    host, port = split_listen(args.listen)
    return asyncio.run(_serve(args.dir, host, port, token_from_args(args), args))


async def _serve(
    root: Path, host: str, port: int, token: str | None, args: argparse.Namespace
) -> int:
    server = PeerServer(root, token=token, max_active=args.max_active)
    try:
        bound = await server.start(host, port)
    except OSError as exc:
        raise UsageError(f"--listen {args.listen}: {exc.strerror or exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    line = {"listen": f"{host}:{bound}", "dir": str(root), "token": token is not None}
    print(json.dumps(line) if args.json else f"serving {root} to peers on {host}:{bound}")
    sys.stdout.flush()
    await stop.wait()
    await server.close()
    return 0
