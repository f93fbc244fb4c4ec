"""List instances, or show one: load, draining, migrations in flight."""

from __future__ import annotations

import argparse

from llumigrate.control.cli import EXIT_OK, add_connection_arguments, print_rows, run_command
from llumigrate.control.client import ControlClient
from llumigrate.control.convert import to_dict

COLUMNS = (("id", "ID"), ("address", "ADDRESS"), ("up", "UP"), ("draining", "DRAINING"),
           ("free_blocks", "FREE"), ("num_blocks", "BLOCKS"), ("num_running", "RUNNING"),
           ("num_waiting", "WAITING"), ("kv_cache_usage", "KV_USAGE"), ("freeness", "FREENESS"),
           ("num_migrations_in", "MIG_IN"), ("num_migrations_out", "MIG_OUT"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("instance", nargs="?", help="show only this instance")
    add_connection_arguments(parser)


async def _show(client: ControlClient, args: argparse.Namespace) -> int:
    if args.instance:
        found = [await client.get_instance(args.instance)]
    else:
        found = await client.list_instances()
    print_rows(args, [to_dict(m) for m in found], COLUMNS)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    return run_command(args, _show)
