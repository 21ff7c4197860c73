"""`spotstart serve-peers DIR --listen HOST:PORT`: serve what DIR holds to other nodes'
fetches (see spotstart.fetch.peer_server), until SIGTERM or SIGINT. Also the peer token's
flags (its rules: spotstart.fetch.peers.read_token_file), the one "no token on a reachable
address" check and --serve-max-rate, for serve-peers, fetch and guard."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from spotstart.errors import UsageError
from spotstart.fetch.peers import (
    MAKE_TOKEN,
    MIN_TOKEN_BYTES,
    TOKEN_ENV,
    read_token_file,
    visible_token,
)
from spotstart.listen import ListenLimits, is_loopback
from spotstart.units import parse_size

DEFAULT_PORT = 8471
DEFAULT_MAX_CONNECTIONS = ListenLimits.max_connections


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve-peers",
        help="serve the objects a directory holds to other nodes' fetches (read-only)",
        description="Serve byte ranges of the objects DIR holds (complete files of its cache "
        "index, and the finished chunks of files still arriving) to `spotstart fetch --peers`. "
        "Read-only; objects named by identity, never by path. On an address other hosts can "
        f"reach, a token is required (--peer-token-file or ${TOKEN_ENV}) unless --no-token.",
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument(
        "--listen", default=f"0.0.0.0:{DEFAULT_PORT}", help=f"HOST:PORT (0.0.0.0:{DEFAULT_PORT})"
    )
    add_token_flags(p, serving=True)
    p.add_argument(
        "--max-active", type=int, default=64, help="requests served at once; more get 503 (64)"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        help="connections held at once; beyond it the longest idle is closed, or the new one "
        f"gets 503 (default: {DEFAULT_MAX_CONNECTIONS}, less on a low `ulimit -n`)",
    )
    p.add_argument(
        "--head-timeout",
        type=float,
        default=ListenLimits.head_timeout_s,
        metavar="S",
        help="a request head not complete this long after the connection (or its first byte) "
        f"closes the connection: slowloris ({ListenLimits.head_timeout_s:g})",
    )
    add_serve_rate_flag(p)
    p.add_argument("--json", action="store_true", help="print the bound address as JSON")
    p.set_defaults(run=run)


def _rate(text: str) -> int:
    try:
        rate = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a rate must be more than 0 bytes a second")
    return rate


def add_serve_rate_flag(p: argparse.ArgumentParser) -> None:
    """--serve-max-rate SIZE (bytes a second), for the commands that serve peers."""
    p.add_argument(
        "--serve-max-rate",
        type=_rate,
        metavar="SIZE",
        help="serve peers at most SIZE bytes a second, every peer together (units of 1024: "
        "100M is 100 MiB/s): the uplink is shared with this node's own traffic and every "
        "peer asking it; leave room for the rest (default: no limit)",
    )


def serve_max_rate(args: argparse.Namespace, serving: object) -> float | None:
    """--serve-max-rate, which needs something to serve (``serving``: the serve flag's value)."""
    rate: int | None = getattr(args, "serve_max_rate", None)
    if rate is not None and not serving:
        raise UsageError("--serve-max-rate needs --serve-peers")
    return None if rate is None else float(rate)


def add_token_flags(p: argparse.ArgumentParser, *, serving: bool) -> None:
    """--peer-token-file; with ``serving``, also --no-token (the explicit opt-out)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--peer-token-file",
        type=Path,
        metavar="FILE",
        help=f"file holding the token peers share, at least {MIN_TOKEN_BYTES} bytes, readable "
        f"by its owner only (default: ${TOKEN_ENV}); make one with: {MAKE_TOKEN}",
    )
    if serving:
        group.add_argument(
            "--no-token",
            action="store_true",
            help="serve peers with no token on an address other hosts can reach: anyone who "
            "reaches the port can read every object served",
        )


def token_from_args(args: argparse.Namespace) -> str | None:
    """The peer token from --peer-token-file, else ``$SPOTSTART_PEER_TOKEN``, else None;
    UsageError for one that is empty, short, or in a file others may read."""
    path: Path | None = args.peer_token_file
    if path is not None:
        return _read_token_file(path)
    value = os.environ.get(TOKEN_ENV)
    if value is None or value == "":
        return None
    token = value.strip()
    if len(token.encode()) < MIN_TOKEN_BYTES:
        raise UsageError(
            f"${TOKEN_ENV}: {len(token.encode())} bytes; a peer token needs at least "
            f"{MIN_TOKEN_BYTES} (make one with: openssl rand -hex 32)"
        )
    return visible_token(token, f"${TOKEN_ENV}")


def _read_token_file(path: Path) -> str:
    return read_token_file(path, f"--peer-token-file {path}")


def serving_token(args: argparse.Namespace, flag: str, host: str, port: int) -> str | None:
    """The token a peer server on ``host`` uses: required on an address other hosts can reach
    unless --no-token (then a warning on stderr). ``flag`` names the option in messages."""
    token = token_from_args(args)
    if getattr(args, "no_token", False):
        if token is not None:
            raise UsageError(f"--no-token, yet ${TOKEN_ENV} holds a token: drop one of them")
        if not is_loopback(host):
            print(
                f"spotstart: warning: {flag} {host}:{port} with --no-token: anyone who can "
                "reach this port can read every object served",
                file=sys.stderr,
                flush=True,
            )
        return None
    if token is None and not is_loopback(host):
        raise UsageError(
            f"{flag} {host}:{port} is reachable from other hosts and needs a peer token: "
            f"{MAKE_TOKEN}, then --peer-token-file peer.token (or ${TOKEN_ENV}); or listen "
            "on 127.0.0.1; or --no-token to serve anyone"
        )
    return token


def listen_limits(max_connections: int | None, share: int = 2) -> ListenLimits:
    """The peer listener's bounds (see :meth:`ListenLimits.for_process`)."""
    if max_connections is not None and max_connections < 1:
        raise UsageError("--max-connections must be >= 1")
    return ListenLimits.for_process(max_connections, share)


def configure_log(name: str, prefix: str) -> logging.Logger:
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{prefix}: %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def run(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        raise UsageError(f"{args.dir}: no such directory")
    if args.max_active < 1:
        raise UsageError("--max-active must be >= 1")
    # the peer server is aiohttp.web: imported when serve-peers runs, not by fetch and guard,
    # which take this module's token flags
    from spotstart.fetch.peer_server import split_listen

    host, port = split_listen(args.listen)
    if not args.head_timeout > 0:
        raise UsageError("--head-timeout must be > 0")
    token = serving_token(args, "--listen", host, port)
    limits = replace(listen_limits(args.max_connections), head_timeout_s=args.head_timeout)
    return asyncio.run(_serve(args.dir, host, port, token, limits, args))


async def _serve(
    root: Path,
    host: str,
    port: int,
    token: str | None,
    limits: ListenLimits,
    args: argparse.Namespace,
) -> int:
    from spotstart.fetch.peer_server import PeerServer

    log = configure_log("spotstart.peers", "spotstart serve-peers")
    server = PeerServer(
        root,
        token=token,
        max_active=args.max_active,
        limits=limits,
        log=log,
        max_rate=serve_max_rate(args, True),
    )
    try:
        bound = await server.start(host, port)
    except OSError as exc:
        raise UsageError(f"--listen {args.listen}: {exc.strerror or exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    line = {
        "listen": f"{host}:{bound}",
        "dir": str(root),
        "token": token is not None,
        "max_rate": server.max_rate,
    }
    print(json.dumps(line) if args.json else f"serving {root} to peers on {host}:{bound}")
    sys.stdout.flush()
    await stop.wait()
    await server.close()
    return 0
