"""The `spotstart` command: subcommands and the mapping of errors to exit codes."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.markup import escape

from spotstart import __version__
from spotstart.cli import (
    demo,
    doctor_cmd,
    emulate_cmd,
    fetch_cmd,
    guard_cmd,
    image_cmd,
    k8s_cmd,
    load_cmd,
    manifest_cmd,
    peers_cmd,
    plan_cmd,
    timeline_cmd,
)
from spotstart.errors import EXIT_CODES, SpotstartError

EPILOG = "exit codes: " + ", ".join(f"{v} {k}" for k, v in EXIT_CODES.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotstart",
        description="Serve your own LLMs on spot GPUs: weights at the link's limit.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"spotstart {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_cmd.add_parser(sub)
    load_cmd.add_parser(sub)
    guard_cmd.add_parser(sub)
    plan_cmd.add_parser(sub)
    k8s_cmd.add_parser(sub)
    image_cmd.add_parser(sub)
    demo.add_parser(sub)
    emulate_cmd.add_parser(sub)
    peers_cmd.add_parser(sub)
    manifest_cmd.add_parser(sub)
    doctor_cmd.add_parser(sub)
    timeline_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    err = Console(stderr=True, highlight=False)
    try:
        args = parser.parse_args(argv)
        return int(args.run(args))
    except SpotstartError as exc:
        err.print(f"[red]spotstart: error:[/red] {escape(str(exc))}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("spotstart: interrupted; rerun the same command to resume")
        return EXIT_CODES["interrupted"]


if __name__ == "__main__":
    sys.exit(main())
