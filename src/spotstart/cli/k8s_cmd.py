"""`spotstart k8s render --config deploy.yaml --cloud gke|eks|aks [-o DIR]`: the manifests of a
served model, one file per object (or all of them on stdout). `spotstart k8s controller`: the
in-cluster controller that keeps ``target`` replicas ready with a fleet policy."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

from spotstart.errors import UsageError

if TYPE_CHECKING:
    from spotstart.k8s.config import DeployConfig
    from spotstart.k8s.controller import ControllerConfig


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "k8s",
        help="Kubernetes manifests for GKE, EKS, AKS",
        description="Render the manifests of a served model: spot and on-demand Deployments "
        "behind one Service, zone spread, weights on local SSD, spotstart guard as the "
        "entrypoint with its probes, the grace period inside the cloud's notice, and the "
        "cloud's node classes (GKE ComputeClass, Karpenter NodePool/EC2NodeClass).",
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    r = verbs.add_parser("render", help="write the manifests")
    r.add_argument("--config", required=True, type=Path, metavar="FILE", help="deploy.yaml")
    r.add_argument("--cloud", required=True, choices=("gke", "eks", "aks"))
    r.add_argument(
        "-o",
        "--out",
        type=Path,
        metavar="DIR",
        help="write one file per object (and a Kustomization) here; default: stdout",
    )
    r.set_defaults(run=run_render)
    _add_controller(verbs)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. num_extra=1")
    parsed: object = value
    for kind in (int, float):
        try:
            parsed = kind(value)
            break
        except ValueError:
            continue
    if value in ("true", "false"):
        parsed = value == "true"
    return key, parsed


def _add_controller(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = verbs.add_parser(
        "controller",
        help="keep TARGET replicas ready: scale NAME-spot / NAME-ondemand by a fleet policy",
        description="Watch the pods of NAME-spot and NAME-ondemand (ready, zone, the guard's "
        "notice annotation, unschedulable) and scale both Deployments with the same fleet "
        "policy `spotstart plan` simulates. Leader-elected through a Lease; only the leader "
        "writes. Exit 0 on SIGTERM/SIGINT (the lease is handed back).",
    )
    c.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="deploy.yaml: name, namespace, "
        "zones, replicas (the target), max_on_demand, notice window",
    )
    c.add_argument("--cloud", choices=("gke", "eks", "aks"), help="with --config")
    c.add_argument("--name", help="the model's name (Deployments NAME-spot, NAME-ondemand)")
    c.add_argument("--namespace", help="default: the config's, else 'default'")
    c.add_argument("--zones", help="comma-separated zones of the spot pool")
    c.add_argument("--target", type=int, help="replicas to keep ready")
    c.add_argument("--max-on-demand", type=int, help="on-demand ceiling (default: target)")
    c.add_argument(
        "--policy",
        default="warm_hedge",
        help="a `spotstart plan` policy: warm_hedge (default), spothedge, spread_fallback, ...",
    )
    c.add_argument(
        "--policy-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy option, e.g. num_extra=1 (repeatable)",
    )
    c.add_argument(
        "--calm-s",
        type=_positive,
        default=300.0,
        help="release on-demand only after wanting to for this long (300)",
    )
    c.add_argument(
        "--spot-cold-start-s",
        type=_positive,
        default=300.0,
        help="what a new spot replica takes to be ready, for the policy (300)",
    )
    c.add_argument(
        "--on-demand-cold-start-s",
        type=_positive,
        default=300.0,
        help="the same for on-demand (300)",
    )
    c.add_argument("--notice-s", type=_positive, help="the cloud's notice (default: config's)")
    c.add_argument(
        "--stockout-after-s",
        type=_positive,
        default=120.0,
        help="an unschedulable pod this old is a failed launch (120)",
    )
    c.add_argument(
        "--resync-s", type=_positive, default=10.0, help="reconcile at least this often (10)"
    )
    c.add_argument("--dry-run", action="store_true", help="decide and log; write nothing")
    c.add_argument("--identity", help="leader-election identity (default: POD_NAME or host)")
    c.add_argument("--lease-duration-s", type=_positive, default=15.0)
    c.add_argument("--renew-deadline-s", type=_positive, default=10.0)
    c.add_argument("--retry-period-s", type=_positive, default=2.0)
    c.add_argument(
        "--kube-api", metavar="URL", help="API server URL (default: in-cluster, then KUBECONFIG)"
    )
    c.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)"
    )
    c.add_argument(
        "--record-trace",
        metavar="DIR",
        help="record what the controller sees per zone (spot replicas alive, preemption "
        "notices, unschedulable time) as spot traces in DIR, with the fleet.yaml that "
        "`spotstart plan run --config DIR/fleet.yaml` replays; resumes a recording in DIR",
    )
    c.add_argument(
        "--record-gap",
        type=_positive,
        default=60.0,
        metavar="SECONDS",
        help="the recorded trace's tick (60; 1 to 86400)",
    )
    c.add_argument(
        "--record-assume",
        type=int,
        metavar="N",
        help="spot nodes a zone is taken to have had when it never refused one in a tick "
        "(default: --target)",
    )
    c.set_defaults(run=run_controller)


def run_render(args: argparse.Namespace) -> int:
    try:
        import yaml  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError as exc:
        raise UsageError("spotstart k8s needs PyYAML: pip install 'spotstart[k8s]'") from exc
    from spotstart.k8s import load_config, render, to_yaml, write_manifests
    from spotstart.k8s.config import Cloud

    cloud = cast(Cloud, args.cloud)
    cfg = load_config(args.config, cloud)
    manifests = render(cfg, cloud)
    if args.out is None:
        sys.stdout.write("---\n".join(to_yaml(m) for m in manifests))
    else:
        for path in write_manifests(manifests, args.out):
            print(path)
    _peer_token_note(cfg)
    return 0


def _peer_token_note(cfg: DeployConfig) -> None:
    """On stderr (stdout may be the YAML stream): the one command that creates the peers'
    Secret, or a warning that the weights are served without a token."""
    from spotstart.k8s.render import peer_token_command

    if cfg.peers is None:
        return
    command = peer_token_command(cfg)
    if command is None:
        print(
            "spotstart: warning: peers.token is false: serve-peers runs with --no-token; any "
            "pod that reaches the peer port can download the model",
            file=sys.stderr,
        )
        return
    print(
        f"spotstart: the pods wait for Secret {cfg.namespace}/{cfg.peers.token_secret} "
        "(the peers' token); create it once with:",
        file=sys.stderr,
    )
    print(command, file=sys.stderr)


def controller_config(args: argparse.Namespace) -> ControllerConfig:
    """The controller's settings from the flags, filled from --config where given."""
    from spotstart.k8s.config import Cloud, load_config
    from spotstart.k8s.controller import ControllerConfig
    from spotstart.k8s.lease import LeaseTiming

    name, namespace, zones, target, max_od, notice = None, None, None, None, None, None
    if args.config is not None:
        if args.cloud is None:
            raise UsageError("--config needs --cloud (the notice window depends on it)")
        cfg = load_config(args.config, cast(Cloud, args.cloud))
        name, namespace, zones = cfg.name, cfg.namespace, cfg.zones
        target, max_od, notice = cfg.replicas, cfg.max_on_demand, float(cfg.notice_window_s)
    name = args.name or name
    if not name:
        raise UsageError("--name (or --config) is required")
    zones = tuple(z for z in (args.zones or "").split(",") if z) or zones
    if not zones:
        raise UsageError("--zones (or --config) is required: the spot pool's zones")
    target = args.target if args.target is not None else target
    if target is None or target < 0:
        raise UsageError("--target (or --config) is required: replicas to keep ready")
    max_od = args.max_on_demand if args.max_on_demand is not None else max_od
    try:
        timing = LeaseTiming(args.lease_duration_s, args.renew_deadline_s, args.retry_period_s)
    except ValueError as exc:
        raise UsageError(f"lease timing: {exc}") from exc
    return ControllerConfig(
        name=name,
        namespace=args.namespace or namespace or "default",
        zones=zones,
        target=target,
        max_on_demand=target if max_od is None else max_od,
        policy=args.policy,
        policy_options=dict(args.policy_option),
        calm_s=args.calm_s,
        spot_cold_start_s=args.spot_cold_start_s,
        on_demand_cold_start_s=args.on_demand_cold_start_s,
        notice_s=args.notice_s if args.notice_s is not None else (notice or 30.0),
        stockout_after_s=args.stockout_after_s,
        resync_s=max(args.resync_s, 0.05),
        dry_run=args.dry_run,
        identity=args.identity
        or os.environ.get("POD_NAME")
        or f"{os.uname().nodename}-{os.getpid()}",
        lease=timing,
        record_dir=args.record_trace,
        record_gap_s=args.record_gap,
        record_assumed_nodes=args.record_assume,
    )


def run_controller(args: argparse.Namespace) -> int:
    try:
        import lightkube  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            "spotstart k8s controller needs lightkube: pip install 'spotstart[k8s]'"
        ) from exc
    from spotstart.fleet.errors import ConfigError
    from spotstart.k8s.api import make_client
    from spotstart.k8s.controller import Controller

    cfg = controller_config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        controller = Controller(cfg, make_client(args.kube_api))
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, registry=controller.metrics.registry)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log = logging.getLogger("spotstart.k8s")
        log.info(
            "controller %s: %s/%s target %d, policy %s%s",
            cfg.identity,
            cfg.namespace,
            cfg.name,
            cfg.target,
            cfg.policy,
            " (dry run)" if cfg.dry_run else "",
        )
        try:
            await controller.run(stop)
        finally:
            await controller.client.close()

    asyncio.run(main())
    return 0
