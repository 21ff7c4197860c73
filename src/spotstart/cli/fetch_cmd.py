"""`spotstart fetch SRC DEST`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from spotstart import events, units
from spotstart.cli.peers_cmd import (
    add_serve_rate_flag,
    add_token_flags,
    configure_log,
    serve_max_rate,
    serving_token,
    token_from_args,
)
from spotstart.errors import SpotstartError, UsageError
from spotstart.fetch import (
    Concurrency,
    Disk,
    FetchConfig,
    FetchReport,
    NullProgress,
    ProgressListener,
    Retry,
    fetch,
    metrics,
)
from spotstart.fetch.peers import ENV as PEERS_ENV
from spotstart.fetch.peers import PeerSpec
from spotstart.store import HttpOptions

if TYPE_CHECKING:  # rich draws for people: imported when output is for a person, not for --json
    from rich.console import Console


def parse_size(text: str) -> int:
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fetch",
        help="copy an object or prefix to a local directory at the link's limit",
        description="Copy SRC (gs://B/P, s3://B/P, http(s)://..., file://, a path) into "
        "directory DEST with many parallel ranged reads, verified, resumable and cached.",
    )
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only keys matching GLOB (repeatable), e.g. '*.safetensors'",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip keys matching GLOB (repeatable)",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="another fetch into DEST is writing one of these files: exit 17 at once instead "
        "of waiting for it to finish",
    )
    add_transfer_flags(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    out.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(run=run)


def add_transfer_flags(p: argparse.ArgumentParser) -> None:
    """The flags every transferring command shares (fetch, load)."""
    p.add_argument("--endpoint", help="store endpoint URL (S3-compatible stores, emulators)")
    p.add_argument(
        "--anonymous",
        "--no-sign-request",
        action="store_true",
        help="send unsigned requests (public buckets); skip credential lookup",
    )
    p.add_argument("--concurrency", type=int, help="fixed number of streams (default: auto)")
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=Concurrency.max,
        help=f"ceiling for auto ({Concurrency.max})",
    )
    p.add_argument("--chunk-size", type=parse_size, help="bytes per ranged read (default: auto)")
    p.add_argument(
        "--no-direct-reads",
        action="store_true",
        help="receive bodies through the async HTTP client instead of the direct reader "
        "(recv_into a reused buffer on threads; an escape hatch: it costs ~2x the CPU)",
    )
    p.add_argument(
        "--events",
        metavar="FILE",
        help="append phase events (JSON lines) for `spotstart timeline`; - for stderr "
        "(default: $SPOTSTART_EVENTS)",
    )
    p.add_argument(
        "--metrics-textfile",
        metavar="FILE.prom",
        help="write this run's metrics for node-exporter's textfile collector (atomically)",
    )
    p.add_argument(
        "--verify",
        choices=("auto", "size", "full"),
        default="auto",
        help="auto: size and the store's strongest checksum (CRC as bytes arrive, else MD5); "
        "size: size only; full: a checksum is required and recomputed from disk",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=Retry.max_attempts,
        help=f"attempts per chunk ({Retry.max_attempts})",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=HttpOptions.stall_timeout_s,
        help="seconds without a byte before a stream is replaced "
        f"({HttpOptions.stall_timeout_s:g})",
    )
    p.add_argument(
        "--fsync",
        action="store_true",
        help="make every chunk durable against power loss before journaling it",
    )
    p.add_argument(
        "--peers",
        metavar="LIST",
        help="other nodes serving what they hold (`serve-peers` or `--serve-peers`): "
        "HOST:PORT or dns:NAME:PORT (a headless Service), comma separated "
        f"(default: ${PEERS_ENV})",
    )
    p.add_argument(
        "--peer-sample",
        type=int,
        default=PeerSpec.sample,
        metavar="N",
        help="peers whose inventories are polled at once, however many the fleet has (the "
        "least useful swapped for another now and then): bounds the control traffic "
        f"({PeerSpec.sample})",
    )
    p.add_argument(
        "--peer-self",
        metavar="HOST:PORT",
        help="this node's address as its peers reach it (where its serve-peers listens): its "
        "place on the single-flight ring, and left out of the peers asked. Default: "
        "$POD_IP at the --serve-peers port, or at the port of the first --peers entry (a "
        "serve-peers sidecar on that port, as `k8s render` makes); else the --serve-peers "
        "address; else none (a node no other "
        "node knows: it reads a share of its own from the origin)",
    )
    p.add_argument(
        "--peer-wait",
        type=float,
        default=PeerSpec.single_flight_wait_s,
        metavar="SECONDS",
        help="single-flight: each chunk is read from the origin by one node of the fleet "
        "(a hash ring over the peers' addresses); the others wait for it from a peer at most "
        "this long, then read it from the origin; a node that lets a wait run out has its "
        f"share read from the origin from then on; 0: no waiting "
        f"({PeerSpec.single_flight_wait_s:g})",
    )
    p.add_argument(
        "--serve-peers",
        metavar="HOST:PORT",
        help="serve DEST to peers while this runs, chunks included as they arrive (on an "
        "address other hosts can reach: with a token, or --no-token)",
    )
    add_token_flags(p, serving=True)
    add_serve_rate_flag(p)
    p.add_argument(
        "--page-cache",
        action="store_true",
        help="write through the page cache (default: whole blocks with O_DIRECT where the "
        "filesystem takes it; the page cache keeps the files in RAM for a reader right after)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="fetch even when DEST already holds the same object version",
    )


def config_from_args(args: argparse.Namespace) -> FetchConfig:
    if args.events is not None:
        events.configure(args.events)
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    if args.retries < 1:
        raise UsageError("--retries must be >= 1")
    return FetchConfig(
        chunk_bytes=args.chunk_size,
        verify=args.verify,
        concurrency=Concurrency(streams=args.concurrency, max=args.max_concurrency),
        retry=Retry(max_attempts=args.retries),
        http=HttpOptions(stall_timeout_s=args.stall_timeout, direct_reads=not args.no_direct_reads),
        disk=Disk(fsync=args.fsync, direct_io=not args.page_cache),
        use_cache=not args.no_cache,
        endpoint=args.endpoint,
        anonymous=args.anonymous,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        peers=peers_from_args(args),
        serve_peers=args.serve_peers,
        serve_max_rate=serve_max_rate(args, args.serve_peers),
        wait=not getattr(args, "no_wait", False),  # fetch's flag; load waits
    )


def peers_from_args(args: argparse.Namespace) -> PeerSpec | None:
    """--peers (or $SPOTSTART_PEERS) and the token; ourselves excluded: the --serve-peers
    address, and $POD_IP at that port (a headless Service lists this pod too). With
    --serve-peers on an address other hosts can reach, a token or --no-token is required."""
    text = args.peers if args.peers is not None else os.environ.get(PEERS_ENV)
    sample, wait_s = args.peer_sample, args.peer_wait
    if sample < 1:
        raise UsageError("--peer-sample must be >= 1")
    if not 0 <= wait_s < float("inf"):  # NaN fails too
        raise UsageError("--peer-wait must be a number of seconds >= 0")
    swarm = {"sample": sample, "single_flight_wait_s": wait_s}
    if not args.serve_peers:
        if not text:
            return None
        me = _peer_self(args.peer_self)
        mine = {"me": me, "exclude": (me,)} if me else {}  # else $POD_IP (PeerSpec.parse)
        return PeerSpec.parse(text, token_from_args(args), **swarm, **mine)
    from spotstart.fetch.peer_server import split_listen  # aiohttp.web: only when serving

    host, port = split_listen(args.serve_peers)
    token = serving_token(args, "--serve-peers", host, port)
    configure_log("spotstart.peers", "spotstart fetch")
    exclude = [f"{host}:{port}"]
    me = None  # our place on the ring: the address peers reach us at (default exclude[0])
    if me := _peer_self(args.peer_self):
        exclude.append(me)
    elif os.environ.get("POD_IP"):
        me = f"{os.environ['POD_IP']}:{port}"
        exclude.append(me)
    return PeerSpec.parse(text or "", token, exclude=tuple(exclude), me=me, **swarm)


def _peer_self(flag: str | None) -> str | None:
    """--peer-self as ``host:port``, checked as a peer entry is (a name or an address)."""
    if not flag:
        return None
    if flag.startswith("dns:"):
        raise UsageError(f"--peer-self {flag!r}: expected HOST:PORT (the address peers reach)")
    try:
        return PeerSpec.parse([flag]).entries[0]
    except UsageError:
        raise UsageError(
            f"--peer-self {flag!r}: expected HOST:PORT (the address peers reach)"
        ) from None


class _Reported(Protocol):
    def metrics(self) -> metrics.TransferMetrics: ...


R = TypeVar("R", bound=_Reported)


def recording_metrics(args: argparse.Namespace, part: str, work: Callable[[], R]) -> R:
    """Run ``work``; with --metrics-textfile, write its metrics (or its exit code) after."""
    path = metrics.check_textfile_path(args.metrics_textfile) if args.metrics_textfile else None
    try:
        result = work()
    except SpotstartError as exc:
        if path is not None:
            metrics.write_textfile(
                path, metrics.TransferMetrics(part, args.src, exit_code=exc.exit_code)
            )
        raise
    if path is not None:
        metrics.write_textfile(path, result.metrics())
    return result


def run(args: argparse.Namespace) -> int:
    report = recording_metrics(args, "fetch", lambda: _fetch(args))
    if args.json:
        json.dump(report.to_json(), sys.stdout)
        sys.stdout.write("\n")
    elif not args.quiet:
        from rich.console import Console

        print_summary(Console(), report)
    return 0


def _fetch(args: argparse.Namespace) -> FetchReport:
    config = config_from_args(args)
    progress: ProgressListener
    if args.json or args.quiet:
        progress = NullProgress()
        return fetch(args.src, args.dest, config, progress=progress)
    from rich.console import Console

    from spotstart.cli.progress import LineProgress, RichProgress

    err = Console(stderr=True, soft_wrap=True)
    if err.is_terminal:
        with RichProgress(err, "fetch") as bar:
            report = fetch(args.src, args.dest, config, progress=bar)
    else:
        report = fetch(args.src, args.dest, config, progress=LineProgress(err))
    return report


def print_summary(console: Console, r: FetchReport) -> None:
    if r.files_fetched == 0:
        console.print(
            f"[green]{r.dest}: all {r.files_total} files already current "
            f"({r.bytes_cached / 1e6:.1f} MB), nothing copied[/green]"
        )
        return
    verified = ", ".join(f"{k} x{v}" for k, v in sorted(r.verified.items())) or "size"
    resumed = f", {r.bytes_resumed / 1e6:.1f} MB resumed" if r.bytes_resumed else ""
    cached = f", {r.files_cached} files already current" if r.files_cached else ""
    console.print(
        f"[green]fetched {r.files_fetched} files, {r.bytes_transferred / 1e6:.1f} MB in "
        f"{r.seconds:.2f}s = {r.mb_per_s:.1f} MB/s[/green]{resumed}{cached}; "
        f"{r.retries} retries, verified: {verified}; streams {r.concurrency_final}, "
        f"chunks {r.chunk_bytes >> 20} MiB"
    )
