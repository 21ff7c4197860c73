"""`spotstart route --listen HOST:PORT --replicas HOST:PORT,...|dns:NAME:PORT`: an HTTP router in
front of the replicas' guards that continues a stream a draining replica cuts."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING

from spotstart.errors import UsageError

if TYPE_CHECKING:
    from spotstart.route.server import RouterConfig

log = logging.getLogger("spotstart.route")


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:8090")
    return host, int(port)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a positive number")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "route",
        help="route requests to ready replicas; continue streams a preemption cuts",
        description="An HTTP router for OpenAI-compatible servers behind `spotstart guard`: each "
        "request goes to a ready replica (the guards' /readyz; least outstanding requests; the "
        "replica that served the same prompt prefix while not much busier); a request no "
        "replica started is sent to another; a stream of /v1/completions or "
        "/v1/chat/completions that a draining replica cuts is continued on another replica and "
        "spliced into the client's stream (token ids with vLLM: the text equals an "
        "uninterrupted greedy run's). Run it off spot (2 replicas, a PodDisruptionBudget). "
        "The router's own paths: /readyz, /livez and --metrics-path. SIGTERM: /readyz 503, "
        "then no new connections, then the streams in flight finish.",
    )
    p.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 8090),
        metavar="HOST:PORT",
        help="where clients connect (default 127.0.0.1:8090; 0.0.0.0:8090 in a pod: the serving "
        "endpoint, reachable by whoever reaches the guards; the replicas' own auth applies, "
        "Authorization is passed through)",
    )
    p.add_argument(
        "--replicas",
        required=True,
        metavar="HOST:PORT,...|dns:NAME:PORT",
        help="the replicas' guards: a list, or a DNS name re-resolved every --dns-interval "
        "(a headless Service: one address per pod)",
    )
    p.add_argument("--readyz-path", default="/readyz", help="polled on each replica")
    p.add_argument("--metrics-path", default="/metrics", help="the router's own metrics")
    p.add_argument(
        "--poll-interval", type=_positive, default=1.0, metavar="S", help="readiness polls"
    )
    p.add_argument("--dns-interval", type=_positive, default=5.0, metavar="S")
    p.add_argument(
        "--continue-timeout",
        type=_positive,
        default=30.0,
        metavar="S",
        help="how long a cut request waits for a ready replica before it is reported lost "
        "(an SSE error event, or 502)",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=_positive,
        default=60.0,
        metavar="S",
        help="a stream that sent nothing for this long after its first byte is cut and "
        "continued elsewhere (a stalled or silently stopped engine)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=5,
        metavar="N",
        help="attempts per request that no replica started (refused, 503, 5xx)",
    )
    p.add_argument(
        "--engine",
        choices=("vllm", "openai"),
        default="vllm",
        help="vllm: ask for token ids (return_token_ids) and continue completions exactly; "
        "openai: any OpenAI-compatible server, continued as text",
    )
    p.add_argument("--max-body-bytes", type=int, default=16 << 20, metavar="N")
    p.add_argument(
        "--shutdown-delay",
        type=float,
        default=5.0,
        metavar="S",
        help="after SIGTERM: /readyz 503 but still accepting, while the Service stops sending",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=_positive,
        default=600.0,
        metavar="S",
        help="then: how long the requests in flight may take to finish",
    )
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    from spotstart.route.replicas import parse_replicas
    from spotstart.route.server import RouterConfig

    try:
        source = parse_replicas(args.replicas)
    except ValueError as exc:
        raise UsageError(f"--replicas {exc}") from None
    for flag, path in (("--readyz-path", args.readyz_path), ("--metrics-path", args.metrics_path)):
        if not path.startswith("/"):
            raise UsageError(f"{flag} {path!r}: a path starting with /")
    if args.max_attempts < 1 or args.max_body_bytes < 1:
        raise UsageError("--max-attempts and --max-body-bytes must be at least 1")
    if args.shutdown_delay < 0:
        raise UsageError("--shutdown-delay must be 0 or more")
    host, port = args.listen
    return RouterConfig(
        source=source,
        listen_host=host,
        listen_port=port,
        readyz_path=args.readyz_path,
        metrics_path=args.metrics_path,
        poll_interval_s=args.poll_interval,
        dns_interval_s=args.dns_interval,
        continue_timeout_s=args.continue_timeout,
        stream_idle_timeout_s=args.stream_idle_timeout,
        max_attempts=args.max_attempts,
        token_ids=args.engine == "vllm",
        max_body_bytes=args.max_body_bytes,
        shutdown_delay_s=args.shutdown_delay,
        shutdown_timeout_s=args.shutdown_timeout,
    )


async def _main(config: RouterConfig) -> int:
    from spotstart.listen import is_loopback
    from spotstart.route.server import Router

    router = Router(config)
    await router.start()
    where = f"{config.listen_host}:{router.bound_port}"
    if not is_loopback(config.listen_host):
        log.info("listening on %s: reachable beyond this host (--listen)", where)
    log.info("routing on %s", where)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("signal: draining (readyz 503, then no new connections, streams finish)")
        drain = asyncio.create_task(router.drain())
        stop.clear()
        done, _ = await asyncio.wait(
            {drain, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED
        )
        if drain not in done:
            log.info("second signal: stopping now")
            drain.cancel()
    finally:
        await router.close()
    return 0


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(_main(config))
