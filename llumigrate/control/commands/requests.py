"""List requests in flight: where each runs, its length, its migrations."""

from __future__ import annotations

import argparse

from llumigrate.control.cli import EXIT_OK, add_connection_arguments, print_rows, run_command
from llumigrate.control.client import ControlClient
from llumigrate.control.convert import to_dict

COLUMNS = (("id", "ID"), ("instance_id", "INSTANCE"), ("state", "STATE"), ("priority", "PRIORITY"),
           ("num_prompt_tokens", "PROMPT"), ("num_output_tokens", "OUTPUT"),
           ("num_migrations", "MIGRATIONS"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instance", default=None, help="only requests on this instance")
    parser.add_argument("--all", action="store_true", help="include finished requests")
    add_connection_arguments(parser)


async def _show(client: ControlClient, args: argparse.Namespace) -> int:
    found = await client.list_requests(args.instance, include_finished=args.all)
    print_rows(args, [to_dict(m) for m in found], COLUMNS)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    return run_command(args, _show)
