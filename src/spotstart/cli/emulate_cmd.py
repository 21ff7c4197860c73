"""`spotstart emulate storage ...`: the local clouds (see spotstart.emulate)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "emulate",
        help="run local emulated clouds (storage behind a link emulator; metadata servers)",
        description="Run emulated clouds on 127.0.0.1 for tests, demos and benchmarks. "
        "`spotstart emulate storage --help` / `spotstart emulate metadata --help` list flags.",
        add_help=True,
    )
    p.add_argument("what", choices=["storage", "metadata"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="flags of the emulator")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.what == "metadata":
        from spotstart.emulate import metadata

        return metadata.main(list(args.rest))
    from spotstart.emulate import storage

    return storage.main(list(args.rest))
