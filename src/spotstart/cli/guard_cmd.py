"""`spotstart guard --upstream URL --listen HOST:PORT [-- CMD ...]`: drain an inference server
before its spot VM or pod goes away."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from spotstart.cli.peers_cmd import (
    add_serve_rate_flag,
    add_token_flags,
    listen_limits,
    serve_max_rate,
    serving_token,
    token_from_args,
)
from spotstart.errors import UsageError
from spotstart.fetch.peer_server import PeerServer, PeerServerThread, split_listen
from spotstart.listen import raise_open_files_limit
from spotstart.units import parse_host_port

if TYPE_CHECKING:  # the proxy pulls in aiohttp.web and prometheus: only when guard runs
    from spotstart.enginecache import EngineCacheConfig
    from spotstart.guard.notice import NoticeWatcher
    from spotstart.guard.run import GuardConfig

log = logging.getLogger("spotstart.guard")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6); port 0 picks a free one (logged)."""
    try:
        host, port = parse_host_port(text)
    except ValueError:
        host = ""
    if not host:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 0.0.0.0:8080")
    return host, port


def parse_signal(text: str) -> signal.Signals:
    """``TERM``, ``SIGTERM`` or ``15``."""
    name = text.upper()
    try:
        if name.isdigit():
            return signal.Signals(int(name))
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise UsageError(
            f"--stop-signal {text!r}: not a signal (examples: TERM, INT, 15)"
        ) from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "guard",
        help="proxy an inference server and drain it before a preemption",
        description="Reverse-proxy an HTTP inference server (vLLM, TGI, Triton...). On a "
        "preemption notice (cloud metadata, or SIGTERM as Kubernetes sends it) turn unready at "
        "once, answer new requests 503 + Retry-After, let in-flight requests and streams finish "
        "until deadline - safety margin, stop the server and exit before the deadline. With "
        "'-- CMD ...', start and supervise the server too (in a session of its own; one that "
        "never became healthy gets SIGKILL 1 s after the stop signal). A completion the server "
        "aborts (finish_reason abort, as vLLM's SIGTERM does) is counted lost, and a "
        "non-streaming one answered 503 + Retry-After; a server that refuses requests because "
        "it is shutting down turns the guard unready and gets no more.",
    )
    p.add_argument(
        "--upstream", required=True, metavar="URL", help="the server, e.g. http://127.0.0.1:8000"
    )
    p.add_argument(
        "--listen",
        required=True,
        type=parse_listen,
        metavar="HOST:PORT",
        help="where clients and probes connect, e.g. 0.0.0.0:8080 in a pod (port 0: any free)",
    )
    p.add_argument(
        "--events",
        metavar="FILE",
        help="append phase events (server start, drain) for `spotstart timeline`; - for "
        "stderr (default: $SPOTSTART_EVENTS)",
    )
    p.add_argument(
        "--serve-peers",
        metavar="DIR:HOST:PORT",
        help="also serve what DIR holds to other nodes' fetches (as `spotstart serve-peers`, "
        "on a thread and within limits of its own: a flood on it leaves the guard's port "
        "answering), until the guard exits; on an address other hosts can reach: with a "
        "token ($SPOTSTART_PEER_TOKEN or --peer-token-file), or --no-token",
    )
    add_token_flags(p, serving=True)
    add_serve_rate_flag(p)
    p.add_argument(
        "--cloud",
        choices=("auto", "gce", "aws", "azure", "none"),
        default="auto",
        help="which metadata server to watch for notices (auto)",
    )
    p.add_argument("--metadata-url", metavar="URL", help="metadata endpoint (emulators, tests)")
    p.add_argument(
        "--safety-margin",
        type=float,
        default=5.0,
        metavar="S",
        help="be done this long before the deadline (5)",
    )
    p.add_argument(
        "--early-signals",
        choices=("drain", "warn"),
        default="warn",
        help="what notices that keep the VM running do: AWS rebalance, GCE live migration, "
        "Azure Freeze (warn; preemptions, terminations and Azure Reboot/Redeploy always drain)",
    )
    p.add_argument(
        "--min-grace",
        type=float,
        default=5.0,
        metavar="S",
        help="in-flight requests get at least this long, even when a notice's deadline is "
        "already past by our clock (5)",
    )
    p.add_argument(
        "--azure-vm-name",
        metavar="NAME",
        help="this VM's name as Azure Scheduled Events list it (default: IMDS compute/name)",
    )
    p.add_argument(
        "--stop-signal",
        type=parse_signal,
        default=signal.SIGTERM,
        metavar="SIG",
        help="signal that stops the server (TERM)",
    )
    p.add_argument(
        "--stop-grace",
        type=float,
        default=10.0,
        metavar="S",
        help="time the server gets to exit before SIGKILL (10)",
    )
    p.add_argument(
        "--termination-window",
        type=float,
        default=30.0,
        metavar="S",
        help="deadline after SIGTERM: the pod's terminationGracePeriodSeconds (30)",
    )
    p.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="S",
        help="keep answering 503 at least this long after a notice (0)",
    )
    p.add_argument(
        "--retry-after",
        type=int,
        default=1,
        metavar="S",
        help="Retry-After on 503s during a drain (1)",
    )
    p.add_argument(
        "--health-path",
        default="/health",
        metavar="PATH",
        help="upstream health path polled for /readyz ('' = none) (/health)",
    )
    p.add_argument(
        "--health-interval", type=float, default=1.0, metavar="S", help="upstream poll period (1)"
    )
    p.add_argument("--readyz-path", default="/readyz", metavar="PATH")
    p.add_argument("--livez-path", default="/livez", metavar="PATH")
    p.add_argument(
        "--metrics-path",
        default="/spotstart/metrics",
        metavar="PATH",
        help="the guard's own Prometheus metrics; /metrics is left to the server (vLLM, TGI "
        "serve theirs there) (/spotstart/metrics)",
    )
    p.add_argument(
        "--continue-grace",
        type=float,
        default=None,
        metavar="S",
        help="with `spotstart route` in front: streams of requests it sent "
        "(X-Spotstart-Continue: 1) are cut S seconds after a notice instead of at the drain "
        "deadline, so the router continues them on another replica in time; other requests "
        "keep the full drain (off)",
    )
    p.add_argument(
        "--replica-id",
        default=None,
        metavar="ID",
        help="this replica's name in the X-Spotstart-Replica header on answers to the router's "
        "requests (the host name: the pod's name in Kubernetes)",
    )
    p.add_argument(
        "--on-notice",
        metavar="CMD",
        help="shell command run on a notice (SPOTSTART_NOTICE_* in its env)",
    )
    p.add_argument("--webhook", metavar="URL", help="POST the notice as JSON to URL")
    p.add_argument("--hook-timeout", type=float, default=5.0, metavar="S")
    p.add_argument(
        "--mark-pod",
        choices=("auto", "on", "off"),
        default="auto",
        help="annotate this pod (spotstart.dev/notice, spotstart.dev/notice-deadline) on a "
        "notice, so a controller can start the replacement at once; auto: when running in a "
        "pod with POD_NAME and a service-account token (auto)",
    )
    add_engine_cache_flags(p)
    p.add_argument(
        "server",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ...",
        help="start and supervise this server",
    )
    p.set_defaults(run=run)


SECRET_ENV = "SPOTSTART_ENGINE_CACHE_SECRET"
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096
MAKE_SECRET = "(umask 077; openssl rand -hex 32 > cache.secret)"


def add_engine_cache_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "engine cache",
        "Restore the engine's compile caches (vLLM, torch inductor, Triton, FlashInfer) for "
        "this server's key before starting it, and publish them after its first ready when the "
        "key had none (once: create-only; the manifest goes last). Needs '-- CMD'.",
    )
    g.add_argument(
        "--engine-cache",
        metavar="URL",
        help="where caches live: any source `spotstart fetch` takes (gs://, s3://, az://, "
        "file://; http(s):// restores only)",
    )
    g.add_argument(
        "--engine-cache-dir",
        type=Path,
        metavar="DIR",
        help="the local cache root the server's cache env points into, created 0700; the "
        "same path on every replica (the key holds it) (default: $XDG_CACHE_HOME or ~/.cache, "
        "/spotstart/engine-cache)",
    )
    g.add_argument(
        "--engine-cache-peers",
        metavar="LIST",
        help="replicas serving their caches (--engine-cache-serve): HOST:PORT or "
        "dns:NAME:PORT, comma separated; the peer token as for --serve-peers",
    )
    g.add_argument(
        "--engine-cache-serve",
        metavar="HOST:PORT",
        help="serve the caches this node holds to other replicas (on an address other hosts "
        "can reach: with a token, or --no-token)",
    )
    g.add_argument(
        "--engine-cache-secret-file",
        type=Path,
        metavar="FILE",
        help="HMAC key (at least 16 bytes, readable by its owner only) manifests are signed "
        f"and checked with; a manifest without a valid signature is refused (default: "
        f"${SECRET_ENV}, which the server does not inherit); make one with: {MAKE_SECRET}",
    )
    g.add_argument(
        "--engine-cache-no-publish",
        action="store_true",
        help="restore only; never write to URL",
    )
    g.add_argument(
        "--engine-cache-restore-timeout",
        type=float,
        metavar="SECONDS",
        help="the most the restore may delay the server's start; then it starts cold (default 600)",
    )
    g.add_argument(
        "--engine-cache-key-extra",
        action="append",
        default=[],
        metavar="S",
        help="one more string in the cache key (repeatable): anything the key cannot see "
        "that changes what the engine compiles",
    )


def read_secret_file(path: Path, where: str) -> bytes:
    """The HMAC key in ``path``: a regular file only its owner may read, at most
    MAX_SECRET_BYTES, at least MIN_SECRET_BYTES once surrounding whitespace is stripped."""
    from spotstart import safefs

    raw = safefs.read_owner_only(
        path,
        where,
        MAX_SECRET_BYTES,
        MAKE_SECRET,
        "read the key (anyone who has it can sign a cache this server would run): chmod 600 it",
    )
    if len(raw) > MAX_SECRET_BYTES:
        raise UsageError(f"{where}: longer than {MAX_SECRET_BYTES} bytes; not a key file")
    return _secret(raw.strip(), where)


def _secret(raw: bytes, where: str) -> bytes:
    if len(raw) < MIN_SECRET_BYTES:
        what = "empty" if not raw else f"{len(raw)} bytes"
        raise UsageError(
            f"{where}: {what}; the key needs at least {MIN_SECRET_BYTES} (make one with: "
            f"{MAKE_SECRET})"
        )
    return raw


def default_engine_cache_dir(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """$XDG_CACHE_HOME/spotstart/engine-cache, else ~/.cache/spotstart/engine-cache. Only
    absolute bases (the XDG spec ignores a relative $XDG_CACHE_HOME): a relative one would put
    the cache, and the key that holds its path, wherever the guard happened to start; $HOME
    unset or relative: the passwd entry's home; none: UsageError (give --engine-cache-dir)."""
    xdg = environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "spotstart" / "engine-cache"
    home = environ.get("HOME", "")
    if not os.path.isabs(home):
        import pwd

        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = ""
    if not os.path.isabs(home):
        raise UsageError(
            "--engine-cache: no absolute $XDG_CACHE_HOME or home directory to keep the cache "
            "in; give --engine-cache-dir DIR (the same path on every replica)"
        )
    return Path(home) / ".cache" / "spotstart" / "engine-cache"


def engine_cache_from_args(
    args: argparse.Namespace, has_server: bool, server: Sequence[str] = ()
) -> EngineCacheConfig | None:
    """EngineCacheConfig of the --engine-cache flags; UsageError for a flag without
    --engine-cache, or --engine-cache without a server command."""
    given = [
        flag
        for flag, value in (
            ("--engine-cache-dir", args.engine_cache_dir),
            ("--engine-cache-peers", args.engine_cache_peers),
            ("--engine-cache-serve", args.engine_cache_serve),
            ("--engine-cache-secret-file", args.engine_cache_secret_file),
            ("--engine-cache-no-publish", args.engine_cache_no_publish),
            ("--engine-cache-key-extra", args.engine_cache_key_extra),
            ("--engine-cache-restore-timeout", args.engine_cache_restore_timeout is not None),
        )
        if value
    ]
    if args.engine_cache is None:
        if given:
            raise UsageError(f"{given[0]} needs --engine-cache URL")
        return None
    if not has_server:
        raise UsageError(
            "--engine-cache needs the server command after '--': the guard starts the server "
            "with its cache directories pointed into the cache"
        )
    if "://" not in args.engine_cache:
        raise UsageError(
            f"--engine-cache {args.engine_cache!r}: a URL (gs://, s3://, az://, file://, https://)"
        )
    from spotstart import safefs
    from spotstart.enginecache import EngineCacheConfig
    from spotstart.fetch.peers import PeerSpec

    root = args.engine_cache_dir or default_engine_cache_dir()
    from spotstart.enginecache.dirs import check_root_length

    check_root_length(root, server)  # vLLM's unix sockets go beneath it: before anything is made
    # The engine runs what it finds here: ours alone (0700, not writable by others)
    root = safefs.private_dir(root)
    token = token_from_args(args)
    peers: tuple[str, ...] = ()
    if args.engine_cache_peers:
        peers = PeerSpec.parse(args.engine_cache_peers, token).entries
        if not peers:
            raise UsageError(f"--engine-cache-peers {args.engine_cache_peers!r}: no peer in it")
    secret = None
    if args.engine_cache_secret_file is not None:
        where = f"--engine-cache-secret-file {args.engine_cache_secret_file}"
        secret = read_secret_file(args.engine_cache_secret_file, where)
    elif os.environ.get(SECRET_ENV):
        secret = _secret(os.environ[SECRET_ENV].strip().encode(), f"${SECRET_ENV}")
    for extra in args.engine_cache_key_extra:
        if not extra or len(extra) > 1024 or not extra.isprintable():
            raise UsageError(
                f"--engine-cache-key-extra {extra[:40]!r}: printable text, 1 to 1024 characters"
            )
    return EngineCacheConfig(
        url=args.engine_cache,
        root=root,
        publish=not args.engine_cache_no_publish,
        key_extra=tuple(args.engine_cache_key_extra),
        peers=peers,
        peer_token=token,
        secret=secret,
    )


def restore_timeout(args: argparse.Namespace) -> float:
    """--engine-cache-restore-timeout: seconds, > 0 (default 600)."""
    value = args.engine_cache_restore_timeout
    if value is None:
        return 600.0
    if not 0 < value <= 86400:
        raise UsageError(f"--engine-cache-restore-timeout {value:g}: seconds, over 0")
    return float(value)


_REPLICA_ID = re.compile(r"[A-Za-z0-9._-]{1,253}")


def config_from_args(args: argparse.Namespace) -> GuardConfig:
    from spotstart.guard.drain import DrainConfig
    from spotstart.guard.proxy import ProxyConfig
    from spotstart.guard.run import GuardConfig

    server = list(args.server)
    if server and server[0] == "--":
        server = server[1:]
    elif server:
        raise UsageError(f"unexpected arguments {server!r}: put the server command after '--'")
    upstream = urlsplit(args.upstream)
    if upstream.scheme not in ("http", "https") or not upstream.netloc:
        raise UsageError(f"--upstream {args.upstream!r}: expected http://HOST:PORT")
    for flag, value in (
        ("--safety-margin", args.safety_margin),
        ("--stop-grace", args.stop_grace),
        ("--linger", args.linger),
        ("--termination-window", args.termination_window),
        ("--min-grace", args.min_grace),
    ):
        if value < 0:
            raise UsageError(f"{flag} must be >= 0")
    if args.continue_grace is not None and not 0 <= args.continue_grace < 86400:
        raise UsageError(f"--continue-grace {args.continue_grace}: expected 0 <= S < 86400")
    if args.replica_id is not None and not _REPLICA_ID.fullmatch(args.replica_id):
        raise UsageError(
            f"--replica-id {args.replica_id[:80]!r}: expected 1-253 of A-Z a-z 0-9 . _ - "
            "(it goes into a response header)"
        )
    host, port = args.listen
    pod = None
    if args.mark_pod != "off":
        import os

        from spotstart.guard.kube import pod_from_env

        pod = pod_from_env(os.environ)
        if pod is None and args.mark_pod == "on":
            raise UsageError(
                "--mark-pod on: not in a pod with POD_NAME, POD_NAMESPACE (downward API), "
                "KUBERNETES_SERVICE_HOST and a service-account token"
            )
    return GuardConfig(
        proxy=ProxyConfig(
            upstream=args.upstream,
            listen_host=host,
            listen_port=port,
            readyz_path=args.readyz_path,
            livez_path=args.livez_path,
            metrics_path=args.metrics_path,
            health_path=args.health_path or None,
            health_interval_s=args.health_interval,
            replica_id=args.replica_id,
            continue_grace_s=args.continue_grace,
        ),
        drain=DrainConfig(
            safety_margin_s=args.safety_margin,
            stop_grace_s=args.stop_grace,
            supervising=bool(server),
            early_signals=args.early_signals,
            linger_s=args.linger,
            retry_after_s=args.retry_after,
            min_grace_s=args.min_grace,
        ),
        server_argv=tuple(server),
        stop_signal=args.stop_signal,
        termination_window_s=args.termination_window,
        on_notice_cmd=args.on_notice,
        webhook_url=args.webhook,
        hook_timeout_s=args.hook_timeout,
        mark_pod=pod,
        engine_cache=engine_cache_from_args(args, bool(server), server),
        engine_cache_restore_timeout_s=restore_timeout(args),
    )


async def build_watchers(args: argparse.Namespace) -> list[NoticeWatcher]:
    """The cloud's metadata watcher (``--cloud auto`` probes GCE, AWS and Azure at once). SIGTERM
    is left to the guard itself: it forwards signals and treats a second one as "stop now"."""
    from spotstart.guard.watchers.detect import CLOUDS, detect_cloud, make_watchers

    cloud: str | None = args.cloud
    if cloud == "none":
        return []
    if cloud == "auto":
        endpoints = dict.fromkeys(CLOUDS, args.metadata_url) if args.metadata_url else None
        cloud = await detect_cloud(endpoints=endpoints)
        log.info("cloud: %s", cloud or "none detected; watching SIGTERM only")
    watchers = make_watchers(
        cloud,
        args.metadata_url,
        time.monotonic,
        grace_s=args.termination_window,
        azure_vm_name=args.azure_vm_name,
    )
    return [w for w in watchers if w.name != "signal"]


async def _main(args: argparse.Namespace, config: GuardConfig) -> int:
    from spotstart.guard.run import run_guard

    servers = [
        await asyncio.to_thread(
            _peer_server,
            *serving,
            flag=flag,
            max_rate=args.serve_max_rate if flag == "--serve-peers" else None,
        )
        for flag, serving in (
            ("--serve-peers", args.peer_serving),
            ("--engine-cache-serve", args.cache_serving),
        )
        if serving
    ]
    try:
        return await run_guard(config, await build_watchers(args), time.monotonic)
    finally:
        for server in servers:
            await asyncio.to_thread(server.close)


def parse_serve_peers(spec: str) -> tuple[Path, str, int]:
    """``DIR:HOST:PORT`` of --serve-peers."""
    root, sep, listen = spec.partition(":")
    if not sep or not Path(root).is_dir():
        raise UsageError(f"--serve-peers {spec!r}: expected DIR:HOST:PORT with DIR a directory")
    host, port = split_listen(listen)
    return Path(root), host, port


def _peer_server(
    root: Path,
    host: str,
    port: int,
    token: str | None,
    *,
    flag: str,
    max_rate: float | None = None,
) -> PeerServerThread:
    """The peer server on its own thread and event loop, with at most a quarter of the open
    files: a flood or a slowloris on the peer port cannot take the guard's proxy, probes or
    descriptors with it."""
    limits = listen_limits(None, share=4)
    server = PeerServer(root, token=token, limits=limits, log=log, max_rate=max_rate)
    thread = PeerServerThread(server)
    try:
        bound = thread.start(host, port)
    except OSError as exc:
        raise UsageError(f"{flag} {host}:{port}: {exc.strerror or exc}") from None
    log.info("serving %s to peers on %s:%d", root, host, bound)
    return thread


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    # the key signs what the server will run: neither the server nor a hook inherits it
    os.environ.pop(SECRET_ENV, None)
    if args.events is not None:
        from spotstart import events

        events.configure(args.events)
    # Soft open-files limit up to the hard one: a proxy holding many streams needs more than
    # the 1024 of many systems (asyncio uses epoll; the soft limit is for select's sake).
    raise_open_files_limit()
    args.peer_serving = None
    args.serve_max_rate = serve_max_rate(args, args.serve_peers)
    if args.serve_peers:
        root, host, port = parse_serve_peers(args.serve_peers)
        token = serving_token(args, "--serve-peers", host, port)
        args.peer_serving = (root, host, port, token)
    args.cache_serving = None
    if args.engine_cache_serve:
        if config.engine_cache is None:
            raise UsageError("--engine-cache-serve needs --engine-cache URL")
        from spotstart.enginecache import archives_dir

        host, port = split_listen(args.engine_cache_serve)
        token = serving_token(args, "--engine-cache-serve", host, port)
        served = archives_dir(config.engine_cache)
        served.mkdir(mode=0o700, parents=True, exist_ok=True)
        args.cache_serving = (served, host, port, token)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("spotstart guard: %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if config.engine_cache is None:
        return asyncio.run(_main(args, config))
    return _run_leaving_busy_threads(_main(args, config))


T = TypeVar("T")


class _LeavingExecutor(ThreadPoolExecutor):
    """The loop's default executor: counts the calls still running, and its shutdown at the
    end of asyncio.run does not wait for them."""

    def __init__(self) -> None:
        super().__init__(thread_name_prefix="spotstart-guard")
        self.busy = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            self.busy += 1
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: object) -> None:
        with self._lock:
            self.busy -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)


def _run_leaving_busy_threads(main: Any) -> int:
    """asyncio.run(main), except that a worker thread still busy at the end does not hold
    the exit: an engine cache pack or extraction a notice cut short (the coroutine waiting
    for it is cancelled at once, the thread cannot be) would keep the guard's process alive,
    its drain done, until it finished or the kubelet's SIGKILL. What it leaves is staging
    beneath the cache root, never a visible manifest."""
    executor = _LeavingExecutor()

    async def with_executor() -> int:
        asyncio.get_running_loop().set_default_executor(executor)
        return int(await main)

    code = asyncio.run(with_executor())
    if executor.busy:
        log.warning(
            "engine cache: %d pack/extract call(s) still running; exiting without them "
            "(their staging is left beneath the cache root, nothing was made visible)",
            executor.busy,
        )
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    return code
