"""`llumigrate` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module exposing `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, str] = {
    "serve": "llumigrate.cli.serve",
    "instance": "llumigrate.cli.instance",
    "demo": "llumigrate.cli.demo",
    "make-tiny-model": "llumigrate.cli.make_tiny_model",
    "stress": "llumigrate.cli.stress",
    # gRPC control API clients
    "instances": "llumigrate.control.commands.instances",
    "requests": "llumigrate.control.commands.requests",
    "migrate": "llumigrate.control.commands.migrate",
    "drain": "llumigrate.control.commands.drain",
    "undrain": "llumigrate.control.commands.undrain",
    "events": "llumigrate.control.commands.events",
    "policy": "llumigrate.control.commands.policy",
    "health": "llumigrate.control.commands.health",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        mod = importlib.import_module(COMMANDS[argv[0]])
        if hasattr(mod, "parse"):  # takes arguments it does not know (e.g. vLLM's)
            return int(mod.run(mod.parse(argv[1:])) or 0)
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
