"""Check that the control API serves; exit 0 when its status is "serving"."""

from __future__ import annotations

import argparse

from llumigrate.control.cli import EXIT_FAILED, EXIT_OK, add_connection_arguments, print_json, run_command
from llumigrate.control.client import ControlClient
from llumigrate.control.convert import to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)


async def _check(client: ControlClient, args: argparse.Namespace) -> int:
    h = await client.health()
    if args.json:
        print_json(to_dict(h))
    else:
        print(f"{h.status}: {h.num_instances_up}/{h.num_instances} instances up (llumigrate {h.version})")
    return EXIT_OK if h.status == "serving" else EXIT_FAILED


def run(args: argparse.Namespace) -> int:
    return run_command(args, _check)
