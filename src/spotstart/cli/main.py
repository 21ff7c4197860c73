"""The `spotstart` command: subcommands and the mapping of errors to exit codes."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from spotstart import __version__
from spotstart.errors import EXIT_CODES, SpotstartError

EPILOG = "exit codes: " + ", ".join(f"{v} {k}" for k, v in EXIT_CODES.items())

# Subcommand -> (its module under spotstart.cli, its one-line help). The module is imported only
# when its subcommand runs (or asks for its own --help): `spotstart --version` and `--help` import
# no subcommand, so none of aiohttp, rich, torch... (tests/cli/test_startup.py). Each help line is
# the one the module's add_parser registers; the same test checks that they agree.
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("fetch_cmd", "copy an object or prefix to a local directory at the link's limit"),
    "load": (
        "load_cmd",
        "load a safetensors checkpoint into torch tensors while the bytes arrive",
    ),
    "guard": ("guard_cmd", "proxy an inference server and drain it before a preemption"),
    "route": (
        "route_cmd",
        "route requests to ready replicas; continue streams a preemption cuts",
    ),
    "plan": ("plan_cmd", "cost and availability of spot fleet policies, replayed on real traces"),
    "k8s": ("k8s_cmd", "Kubernetes manifests for GKE, EKS, AKS"),
    "image": ("image_cmd", "what slows a serving image's pull; startup profiles for lazy pulling"),
    "demo": ("demo", "end-to-end demo on a local emulated cloud"),
    "emulate": (
        "emulate_cmd",
        "run local emulated clouds (storage behind a link emulator; metadata servers)",
    ),
    "serve-peers": (
        "peers_cmd",
        "serve the objects a directory holds to other nodes' fetches (read-only)",
    ),
    "manifest": (
        "manifest_cmd",
        "write the model's chunk manifest (SHA-256 per piece) next to it, for peers",
    ),
    "doctor": (
        "doctor_cmd",
        "what limits this node for a cold start: checks with fixes, short measurements",
    ),
    "timeline": (
        "timeline_cmd",
        "where each second of a start went: events + Kubernetes objects + server logs",
    ),
}


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the top-level
    parser's only options, ``-h`` and ``--version``, take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(only: str | None = "*") -> argparse.ArgumentParser:
    """The whole parser (``only="*"``, the default), or one where only subcommand ``only`` is
    complete and every other is a stand-in with its help line: enough for ``--help``, for
    "invalid choice" and for running ``only``, without importing the other subcommands."""
    parser = argparse.ArgumentParser(
        prog="spotstart",
        description="Serve your own LLMs on spot GPUs: weights at the link's limit.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"spotstart {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_line) in COMMANDS.items():
        if only in ("*", name):
            importlib.import_module(f"spotstart.cli.{module}").add_parser(sub)
        else:
            sub.add_parser(name, help=help_line)
    return parser


def _print_error(message: str) -> None:
    """``spotstart: error: ...`` on stderr, in red on a terminal (rich is imported only then)."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, highlight=False).print(
            f"[red]spotstart: error:[/red] {escape(message)}", soft_wrap=True
        )
    else:
        print(f"spotstart: error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(only=_chosen(words))
    try:
        args = parser.parse_args(words)
        return int(args.run(args))
    except SpotstartError as exc:
        _print_error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print("spotstart: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_CODES["interrupted"]


if __name__ == "__main__":
    sys.exit(main())
