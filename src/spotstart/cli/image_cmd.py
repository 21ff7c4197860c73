"""`spotstart image audit IMAGE`: what an image's pull moves that serving does not need, per
layer and per rule, with a CI gate. `spotstart image profile`: the files a server reads until
it is ready, and the prefetch lists lazy-pulling snapshotters take."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spotstart.errors import BudgetExceeded, UsageError
from spotstart.units import format_bytes, parse_size

if TYPE_CHECKING:  # the image package is imported when a verb runs, not at CLI start
    from spotstart.image import AuditOptions, AuditReport, Comparison


def _bytes(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a ratio between 0 and 1")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "image",
        help="what slows a serving image's pull; startup profiles for lazy pulling",
        description="Audit a container image (docker save tar, OCI layout dir or tar, or a "
        "registry) and profile a server's start for lazy-pulling prefetch lists.",
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    a = verbs.add_parser(
        "audit",
        help="per-layer sizes, wasted bytes and ML-serving rules, with a CI gate",
        description="IMAGE: docker-archive:FILE, oci:DIR[:NAME], oci-archive:FILE[:NAME], "
        "docker://HOST/REPO:TAG, a path (kind found from its contents) or a registry "
        "reference. Reads every layer once, streaming; writes nothing.",
    )
    a.add_argument("image", metavar="IMAGE")
    a.add_argument("--against", metavar="IMAGE2", help="compare with a second image, per rule")
    a.add_argument("--platform", default="linux/amd64", help="os/arch[/variant] in an index")
    a.add_argument("--json", action="store_true", help="the whole report as JSON on stdout")
    a.add_argument(
        "--max-waste-bytes",
        type=_bytes,
        metavar="N",
        help="gate: exit 14 above (e.g. 2G: units of 1024, as --chunk-size)",
    )
    a.add_argument("--max-waste-ratio", type=_ratio, metavar="R", help="gate: exit 14 above")
    a.add_argument(
        "--target", choices=("gpu", "cpu"), default="gpu", help="what the image serves on"
    )
    a.add_argument("--triton-backends", metavar="A,B", help="the Triton backends the models use")
    a.add_argument(
        "--profile", metavar="FILE", help="a startup profile (`image profile`): lazy-pull time"
    )
    a.add_argument("--bandwidth", type=_rate, default=1000.0, metavar="MB/S", help="node NIC")
    a.add_argument("--stream-mb-s", type=_rate, default=100.0, help="one registry stream")
    a.add_argument("--unpack-mb-s", type=_rate, default=200.0, help="unpack, uncompressed")
    a.add_argument("--streams", type=int, default=3, help="concurrent layer downloads")
    a.add_argument("--insecure-registry", action="store_true", help="plain http registry")
    a.set_defaults(run=run_audit)
    _add_profile(verbs)


def _options(args: argparse.Namespace) -> AuditOptions:
    from spotstart.image import AuditOptions, Platform, PullModel, RuleOptions, read_profile_paths

    backends = None
    if args.triton_backends is not None:
        backends = frozenset(b.strip() for b in args.triton_backends.split(",") if b.strip())
    return AuditOptions(
        platform=Platform.parse(args.platform),
        rules=RuleOptions(target=args.target, triton_backends=backends),
        pull=PullModel(
            bandwidth_mb_s=args.bandwidth,
            streams=max(1, args.streams),
            stream_mb_s=args.stream_mb_s,
            unpack_mb_s=args.unpack_mb_s,
        ),
        startup_paths=read_profile_paths(args.profile) if args.profile else (),
        insecure_registry=args.insecure_registry,
    )


def run_audit(args: argparse.Namespace) -> int:
    from spotstart.image import audit, compare

    options = _options(args)
    err = Console(stderr=True, highlight=False)
    progress = None
    if err.is_terminal and not args.json:
        status = err.status("reading layers")
        status.start()

        def progress(i: int, n: int, read: int) -> None:
            status.update(f"layer {i + 1}/{n} read, {format_bytes(read)}")

    try:
        report = audit(args.image, options, progress)
        other = audit(args.against, options, progress) if args.against else None
    finally:
        if progress is not None:
            status.stop()
    out = Console(highlight=False, soft_wrap=True)
    if args.json:
        doc = compare(report, other).to_json() if other else report.to_json()
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        _print_report(out, report)
        if other is not None:
            _print_report(out, other)
            _print_comparison(out, compare(report, other))
    gated = other if other is not None else report
    _gate(gated, args.max_waste_bytes, args.max_waste_ratio)
    return 0


def _gate(report: AuditReport, max_bytes: int | None, max_ratio: float | None) -> None:
    over = []
    if max_bytes is not None and report.bytes_waste > max_bytes:
        over.append(
            f"{format_bytes(report.bytes_waste)} > --max-waste-bytes {format_bytes(max_bytes)}"
        )
    if max_ratio is not None and report.waste_ratio > max_ratio:
        over.append(f"{report.waste_ratio:.1%} > --max-waste-ratio {max_ratio:.1%}")
    if over:
        raise BudgetExceeded(f"{report.image}: waste over budget: {'; '.join(over)}")


def _size(n: int | None) -> str:
    return "?" if n is None else format_bytes(n)


def _shown(text: str) -> str:
    """Text from the image (layer commands, member names) for the terminal: no rich markup,
    no control characters (an ESC sequence in a layer's history would drive the terminal)."""
    return escape("".join(c if c.isprintable() else "?" for c in text))


def _print_report(out: Console, r: AuditReport) -> None:
    out.print(f"[bold]{_shown(r.image)}[/bold]  {r.kind}  {r.platform}  {r.manifest_digest[:19]}")
    t = Table(title="layers", title_justify="left")
    for col in ("#", "compressed", "uncompressed", "wasted", "files", "created by"):
        t.add_column(col, justify="right" if col not in ("created by",) else "left")
    for layer in r.layers:
        t.add_row(
            str(layer.index),
            _size(layer.bytes_compressed)
            + ("" if layer.compression in ("", "none") else f" {layer.compression}"),
            format_bytes(layer.bytes_uncompressed),
            format_bytes(layer.bytes_wasted) if layer.bytes_wasted else "",
            str(layer.files),
            _shown(layer.command[:90]),
        )
    out.print(t)
    if r.findings:
        f = Table(title="findings", title_justify="left")
        for col in ("rule", "bytes", "files", "fix"):
            f.add_column(col, justify="right" if col in ("bytes", "files") else "left")
        for x in r.findings:
            fix = x.fix + (f"\n[dim]{_shown(x.note)}[/dim]" if x.note else "")
            if x.examples:
                fix += f"\n[dim]e.g. {_shown(x.examples[0])}[/dim]"
            f.add_row(
                x.rule + ("" if x.counted else " (check)"), format_bytes(x.bytes), str(x.files), fix
            )
        out.print(f)
    out.print(
        f"total {format_bytes(r.bytes_compressed)} compressed, "
        f"{format_bytes(r.bytes_uncompressed)} "
        f"uncompressed; waste {format_bytes(r.bytes_waste)} ({r.waste_ratio:.1%}), of which "
        f"{format_bytes(r.bytes_hidden)} hidden by later layers"
    )
    m = r.model
    out.print(
        f"pull at {m.bandwidth_mb_s:g} MB/s ({m.streams} streams of <= {m.stream_mb_s:g} MB/s, "
        f"unpack {m.unpack_mb_s:g} MB/s): ~{r.pull_seconds:.1f} s; without the waste "
        f"~{r.pull_seconds_without_waste:.1f} s"
    )
    if r.startup is not None:
        s = r.startup
        out.print(
            f"startup reads {s.files} files, {format_bytes(s.bytes_read)} "
            f"({s.share_of_image:.1%} of "
            f"the image): lazy pull ~{s.lazy_pull_seconds:.1f} s before the process runs"
            + (
                f"; {s.files_missing} profiled paths are not in this image"
                if s.files_missing
                else ""
            )
        )
    for note in r.notes:
        out.print(f"[dim]note: {_shown(note)}[/dim]")


def _print_comparison(out: Console, c: Comparison) -> None:
    t = Table(title=f"{c.before.image} -> {c.after.image}", title_justify="left")
    for col in ("rule", "before", "after", "change"):
        t.add_column(col, justify="left" if col == "rule" else "right")
    for d in c.rules:
        sign = "+" if d.bytes_delta > 0 else "-" if d.bytes_delta < 0 else ""
        t.add_row(
            d.rule,
            format_bytes(d.bytes_before),
            format_bytes(d.bytes_after),
            f"{sign}{format_bytes(abs(d.bytes_delta))}",
        )
    out.print(t)
    dc = c.after.bytes_compressed - c.before.bytes_compressed
    out.print(
        f"compressed {'+' if dc >= 0 else '-'}{format_bytes(abs(dc))}; pull "
        f"{c.before.pull_seconds:.1f} s -> {c.after.pull_seconds:.1f} s; {c.layers_shared} "
        "layers shared"
    )


def _add_profile(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser(
        "profile",
        help="record the files a server reads until ready; write prefetch lists",
        description="Run CMD inside an unpacked image root, in a bubblewrap sandbox (as nobody "
        "when run as root: a user namespace, pivot_root into the read-only root, its own PID "
        "namespace and a loopback-only network, no capabilities, no host environment), under "
        "strace -f (or a Python audit hook where strace is missing), until it is ready, and "
        "write the files it read in first-read order, split into code and weights, as "
        "eStargz, SOCI and Nydus prefetch lists. Every process CMD started is killed after.",
    )
    p.add_argument("--rootfs", type=Path, metavar="DIR", help="an unpacked image root")
    p.add_argument(
        "--image",
        metavar="IMAGE",
        help="the image: unpacked first when no --rootfs is given; checked against the lists",
    )
    p.add_argument("--ready-url", metavar="URL", help="ready once this answers 2xx")
    p.add_argument("--ready-log", metavar="REGEX", help="ready once a line of output matches")
    p.add_argument("--timeout", type=_rate, default=300.0, metavar="S", help="give up after")
    p.add_argument("-o", "--out", type=Path, default=Path("profile"), metavar="DIR")
    p.add_argument(
        "--tracer",
        choices=("auto", "strace", "audit-hook"),
        default="auto",
        help="auto: strace where present, else the Python audit hook",
    )
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set in CMD's environment (repeatable); nothing else of yours is passed on",
    )
    p.add_argument(
        "--share-host-network",
        action="store_true",
        help="CMD shares this host's network (it can reach anything this host can, cloud "
        "metadata and its credentials included); by default it has only a loopback of its "
        "own and --ready-url is probed inside it",
    )
    p.add_argument(
        "--unsafe-no-sandbox",
        action="store_true",
        help="run CMD on this host as you, with paths under DIR, nothing isolated and its "
        "daemons left running: only for an image you trust, where bubblewrap cannot run",
    )
    p.add_argument("--platform", default="linux/amd64")
    p.add_argument("--json", action="store_true", help="the profile summary as JSON")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    p.set_defaults(run=run_profile)


def _env_pairs(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or "\0" in item:
            raise UsageError(f"--env {item!r}: give KEY=VALUE")
        pairs.append((key, value))
    return pairs


def run_profile(args: argparse.Namespace) -> int:
    from spotstart.image.profile import ProfileOptions
    from spotstart.image.profile import run_profile as profile

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("image profile: give the server's command after --")
    if args.rootfs is None and args.image is None:
        raise UsageError("image profile: give --rootfs DIR or --image IMAGE")
    if not args.ready_url and not args.ready_log:
        raise UsageError("image profile: say when the server is ready: --ready-url or --ready-log")
    result = profile(
        ProfileOptions(
            rootfs=args.rootfs,
            image=args.image,
            command=tuple(command),
            ready_url=args.ready_url,
            ready_log=args.ready_log,
            timeout_s=args.timeout,
            out_dir=args.out,
            tracer=args.tracer,
            isolation="none" if args.unsafe_no_sandbox else "sandbox",
            share_network=args.share_host_network,
            env=tuple(_env_pairs(args.env)),
            platform=args.platform,
        )
    )
    if args.json:
        sys.stdout.write(json.dumps(result.summary(), indent=2) + "\n")
    else:
        out = Console(highlight=False, soft_wrap=True)
        s: dict[str, Any] = result.summary()
        out.print(
            f"ready after {s['seconds_to_ready']:.1f} s ({s['tracer']}); read {s['files']} files "
            f"({format_bytes(int(s['bytes_code']))} code and libraries, "
            f"{format_bytes(int(s['bytes_weights']))} "
            f"in {s['weight_files']} weight files)"
        )
        for name, path in s["outputs"].items():
            out.print(f"  {name}: {path}")
        for w in s["warnings"]:
            out.print(f"[yellow]warning:[/yellow] {escape(w)}")
    return 0
