"""`spotstart plan run|sweep`: replay fleet policies on spot traces; thin shell over
`spotstart.fleet`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from spotstart.errors import UsageError

if TYPE_CHECKING:
    from spotstart.fleet import PlanConfig

DEFAULT_COLD_STARTS = "30,120,300,1080"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan",
        help="cost and availability of spot fleet policies, replayed on real traces",
        description="Replay fleet policies (on-demand, spot, SpotHedge, warm_hedge...) on spot "
        "capacity traces and report availability and cost relative to all-on-demand.",
    )
    psub = p.add_subparsers(dest="plan_command", required=True)
    run_p = psub.add_parser("run", help="every policy of the config on its trace")
    _common(run_p)
    run_p.add_argument("--plot", metavar="PNG", help="write ready replicas and cost over time")
    run_p.add_argument("--html", metavar="HTML", help="write a self-contained HTML report")
    run_p.add_argument(
        "--out-of-sample",
        type=float,
        metavar="SHARE",
        help="tune warm_hedge (committed base, spare calm, packing by zone rank) on the first "
        "SHARE of the trace and report every policy on the rest (e.g. 0.5)",
    )
    run_p.set_defaults(run=run)
    sweep_p = psub.add_parser("sweep", help="availability and cost vs cold start and zones")
    _common(sweep_p)
    sweep_p.add_argument(
        "--cold-starts",
        default=DEFAULT_COLD_STARTS,
        metavar="S,S,...",
        help=f"cold-start seconds to try ({DEFAULT_COLD_STARTS})",
    )
    sweep_p.add_argument(
        "--zones", metavar="K,K,...", help="zone counts to try (first K zones; default 1..all)"
    )
    sweep_p.add_argument("--plot", metavar="PNG", help="write the sweep figure")
    sweep_p.set_defaults(run=sweep)
    from spotstart.cli import plan_record  # `plan record`: imported only when plan is chosen

    plan_record.add_parser(psub)


EXIT_CODES = """exit codes:
  0  done
  2  the config or a trace is unusable: bad key or value, a trace path that leaves
     traces_dir, a trace over 64 MiB or not a JSON trace, a local trace not found
  3  a trace is not at its URL         4  the store refused the credentials
  5  the URL cannot be reached (and was never fetched before)
  6  a trace differs from its sha256 in the config, or from the store's checksum
  7  the store kept failing            8  the cache cannot be written (9: its disk is full)"""


def _common(p: argparse.ArgumentParser) -> None:
    p.epilog = EXIT_CODES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--config",
        required=True,
        help="fleet YAML (see examples/fleet.yaml; examples/fleet-fitted.yaml needs no data)",
    )
    p.add_argument(
        "--traces-dir",
        metavar="DIR|URL",
        help="where the config's traces are, overriding its traces_dir: a folder, or any URL "
        "`spotstart fetch` reads (gs://, s3://, az://, http(s)://, file://), fetched into "
        "$SPOTSTART_CACHE_DIR (else ~/.cache/spotstart)",
    )
    p.add_argument(
        "--policy", action="append", default=[], metavar="NAME", help="only these policies"
    )
    p.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    p.add_argument(
        "--no-optimal",
        dest="optimal",
        action="store_false",
        help="skip the offline optimum (a MILP; up to --optimal-time-limit per trace)",
    )
    p.add_argument(
        "--optimal-time-limit",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds HiGHS may search for the optimum; then its proven bound is shown (60)",
    )


def _fleet() -> None:
    """numpy, matplotlib and pyyaml come with the ``plan`` extra: import them only when used,
    so that `spotstart` itself starts without them."""
    try:
        import matplotlib  # noqa: F401
        import numpy  # noqa: F401
        import yaml  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"spotstart plan needs {exc.name}: pip install 'spotstart[plan]'"
        ) from None


def _load(args: argparse.Namespace) -> PlanConfig:
    _fleet()
    from spotstart.fleet import ConfigError, PlanConfig, load_config

    plan = load_config(args.config, args.traces_dir)
    if args.policy:
        known = dict(plan.policies)
        from spotstart.fleet.policies import POLICIES

        for name in args.policy:
            if name not in POLICIES:
                raise ConfigError(
                    f"--policy {name!r}: unknown; choose one of {', '.join(POLICIES)}"
                )
        plan = PlanConfig(
            plan.spec,
            plan.capacity,
            plan.target,
            tuple((n, known.get(n, {})) for n in args.policy),
            plan.source,
            plan.zone_traces,
        )
    return plan


def _numbers(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(
            f"{flag} {text!r}: expected comma-separated numbers, e.g. 30,120"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{flag} {text!r}: expected positive numbers")
    return values


def run(args: argparse.Namespace) -> int:
    plan = _load(args)
    from spotstart.fleet import render, run_plan

    title = f"{plan.source}: {len(plan.spec.zones)} zones, {plan.capacity.shape[1]} ticks"
    bound = None
    tuned = None
    if args.out_of_sample is not None:
        if not args.optimal:
            raise UsageError("--out-of-sample tunes against the optimum: drop --no-optimal")
        if not 0 < args.out_of_sample < 1:
            raise UsageError(f"--out-of-sample {args.out_of_sample}: a share between 0 and 1")
        from dataclasses import replace

        from spotstart.fleet.errors import OptimumNotFound
        from spotstart.fleet.tuning import tune_out_of_sample

        try:
            with _solving(args.json):
                tuned, bound = tune_out_of_sample(
                    plan, train_share=args.out_of_sample, time_limit_s=_limit(args)
                )
        except OptimumNotFound as exc:
            raise UsageError(f"--out-of-sample tunes against the optimum: {exc}") from None
        a, b = tuned.test_ticks
        runs = [*run_plan(plan.window(a, b)), replace(tuned.test, policy="warm_hedge tuned")]
        title += f"; reported on ticks {a}-{b}, warm_hedge tuned on ticks 0-{a}"
    else:
        runs = run_plan(plan)
        if args.optimal:
            from spotstart.fleet.errors import OptimumNotFound
            from spotstart.fleet.sweep import plan_optimum

            try:
                with _solving(args.json):
                    bound = plan_optimum(plan, time_limit_s=_limit(args))
            except OptimumNotFound as exc:  # the policies' results stand without it
                Console(stderr=True).print(f"offline optimum left out: {exc}")

    if args.plot:
        render.write_bytes(args.plot, render.runs_figure_png(runs, title, bound))
    if args.html:
        render.write_bytes(args.html, render.html_report(runs, title, bound))
    if args.json:
        from spotstart.fleet.sweep import versus_optimum

        doc: dict[str, Any] = {
            "config": plan.source,
            "runs": [
                {**r.summary(), **(versus_optimum(r, bound) if bound is not None else {})}
                for r in runs
            ],
        }
        if bound is not None:
            doc["optimal"] = bound.summary()
        if tuned is not None:
            doc["out_of_sample"] = tuned.summary()
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
    )
    rows = render.run_rows(runs, bound)
    for key in rows[0]:
        table.add_column(
            key,
            justify="left" if key == "policy" else "right",
            no_wrap=True,
            min_width=max(len(row[key]) for row in rows),  # numbers are never cut
        )
    for row in rows:
        table.add_row(*row.values())
    console = Console()
    console.print(table)
    console.print(
        "cost: share of all-on-demand; h: replica-hours of spot, on-demand, committed; "
        "below h: hours under the target"
    )
    if bound is not None:
        console.print(
            "x opt: cost over the optimum's; vs best: availability minus the best possible "
            "(percentage points)"
        )
        console.print(render.bound_line(bound))
    if tuned is not None:
        console.print(f"warm_hedge tuned: {tuned.describe()}; every row is out of sample")
    return 0


def _limit(args: argparse.Namespace) -> float:
    if not args.optimal_time_limit > 0:
        raise UsageError(f"--optimal-time-limit {args.optimal_time_limit}: must be positive")
    return float(args.optimal_time_limit)


def _solving(quiet: bool) -> Any:
    """A spinner on stderr while HiGHS works (nothing with --json or off a terminal)."""
    import contextlib

    err = Console(stderr=True)
    if quiet or not err.is_terminal:
        return contextlib.nullcontext()
    return err.status("solving the offline optimum (MILP, HiGHS)...")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def sweep(args: argparse.Namespace) -> int:
    plan = _load(args)
    cold = _numbers(args.cold_starts, "--cold-starts")
    zones = (
        [int(v) for v in _numbers(args.zones, "--zones")]
        if args.zones
        else list(range(1, len(plan.spec.zones) + 1))
    )
    if any(k > len(plan.spec.zones) for k in zones):
        raise UsageError(f"--zones {args.zones}: the config has {len(plan.spec.zones)} zones")
    from spotstart.fleet.sweep import sweep_cold_start, sweep_zones

    kw: dict[str, Any] = {"optimal": args.optimal}
    if args.optimal:
        kw["time_limit_s"] = _limit(args)
    with _solving(args.json or not args.optimal):
        points = sweep_cold_start(plan, cold, **kw) + sweep_zones(plan, zones, **kw)
    if args.plot:
        from spotstart.fleet import render

        render.write_bytes(args.plot, render.sweep_figure_png(points, plan.source))
    if args.json:
        out: list[dict[str, Any]] = [vars(p) for p in points]
        json.dump({"config": plan.source, "points": out}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    console = Console()
    for axis, label in (("cold_start_s", "cold start (s)"), ("zones", "zones")):
        pts = [p for p in points if p.axis == axis]
        values = list(dict.fromkeys(p.value for p in pts))
        policies = list(dict.fromkeys(p.policy for p in pts))
        cells = {(p.policy, p.value): p for p in pts}
        tables: list[tuple[str, Callable[[Any], str]]] = [
            (
                f"availability/cost vs {label} (cost: share of all-on-demand)",
                lambda p: f"{p.availability * 100:.2f}%/{p.cost_relative:.2f}",
            )
        ]
        if args.optimal:
            best = {p.value: p for p in pts}
            tables.append(
                (
                    f"x optimal cost vs {label} (the optimum's availability: "
                    + ", ".join(
                        "-"
                        if best[v].best_availability is None
                        else f"{best[v].best_availability:.2%}"
                        for v in values
                    )
                    + ")",
                    lambda p: "-" if p.x_optimal_cost is None else f"{p.x_optimal_cost:.3f}",
                )
            )
        for title, fmt in tables:
            table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
            table.add_column("policy", no_wrap=True)
            for v in values:
                width = max(len(fmt(cells[(n, v)])) for n in policies)
                table.add_column(f"{v:g}", justify="right", no_wrap=True, min_width=width)
            for n in policies:
                table.add_row(n, *(fmt(cells[(n, v)]) for v in values))
            console.print(table)
    return 0
