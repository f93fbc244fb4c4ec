"""`llumigrate` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile

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


def shared_metrics_dir(argv: list[str]) -> None:
    """`serve --api-server-count N > 1`: metrics live in files that every
    frontend process's `/metrics` reads (prometheus_client's multiprocess
    mode, as `vllm serve` sets up), which must be chosen before
    prometheus_client is first imported: here, before anything else is."""
    count = 1
    for k, a in enumerate(argv):
        if a in ("--api-server-count", "-asc") and k + 1 < len(argv) and argv[k + 1].isdigit():
            count = int(argv[k + 1])
        elif a.startswith("--api-server-count=") and a.split("=", 1)[1].isdigit():
            count = int(a.split("=", 1)[1])
    if count > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llumigrate-metrics-")


def main(argv: list[str] | None = None) -> int:
    from llumigrate.engine.version import UnsupportedVllm
    try:
        return _main(argv)
    except UnsupportedVllm as e:  # said before any vLLM module is imported
        print(f"llumigrate: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "serve":
        shared_metrics_dir(argv[1:])
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
