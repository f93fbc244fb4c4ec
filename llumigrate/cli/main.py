"""`llumigrate` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module exposing `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, str] = {
    "make-tiny-model": "llumigrate.cli.make_tiny_model",
    "demo": "llumigrate.cli.demo",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llumigrate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(modname)
        modules[name] = mod
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
