"""Show the scheduling policies, or change them with --set KEY=VALUE:
`dispatch=NAME`, `migration=NAME,NAME` (empty: none), any other key is a
numeric threshold."""

from __future__ import annotations

import argparse

from llumigrate.control.v1 import control_pb2 as pb
from llumigrate.control.cli import EXIT_OK, add_connection_arguments, print_json, run_command
from llumigrate.control.client import ControlClient
from llumigrate.control.convert import to_dict
from llumigrate.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="changes",
                        help="dispatch=NAME, migration=A,B or THRESHOLD=NUMBER (repeatable)")
    add_connection_arguments(parser)


def parse_changes(changes: list[str]) -> dict:
    """--set values -> `ControlClient.set_policy` keyword arguments."""
    dispatch, migration, thresholds = None, None, {}
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set needs KEY=VALUE, got {change!r}")
        if key == "dispatch":
            dispatch = value
        elif key == "migration":
            migration = [name for name in value.split(",") if name]
        else:
            try:
                thresholds[key] = float(value)
            except ValueError:
                raise ConfigError(f"threshold {key} needs a number, got {value!r}") from None
    return {"dispatch": dispatch, "migration": migration, "thresholds": thresholds}


async def _policy(client: ControlClient, args: argparse.Namespace) -> int:
    changes = parse_changes(args.changes)
    p = await (client.set_policy(**changes) if args.changes else client.get_policy())
    if args.json:
        print_json(to_dict(p))
    else:
        print(describe(p))
    return EXIT_OK


def describe(p: pb.Policy) -> str:
    lines = [f"dispatch:   {p.dispatch}   (available: {', '.join(p.available_dispatch) or '-'})",
             f"migration:  {', '.join(p.migration) or 'none'}   "
             f"(available: {', '.join(p.available_migration) or '-'})"]
    lines += [f"threshold:  {k} = {v:g}" for k, v in sorted(p.thresholds.items())]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    return run_command(args, _policy)
