"""Migrate a request to another instance; exit 1 when the migration aborted."""

from __future__ import annotations

import argparse

from llumigrate.control.v1 import control_pb2 as pb
from llumigrate.control.cli import EXIT_FAILED, EXIT_OK, add_connection_arguments, print_json, run_command
from llumigrate.control.client import MIGRATE_TIMEOUT_S, ControlClient
from llumigrate.control.convert import to_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("request", help="request id")
    parser.add_argument("--to", default=None, metavar="INSTANCE",
                        help="destination (default: the migration policy picks)")
    add_connection_arguments(parser)
    parser.set_defaults(timeout=MIGRATE_TIMEOUT_S)


async def _migrate(client: ControlClient, args: argparse.Namespace) -> int:
    r = await client.migrate(args.request, args.to, timeout_s=args.timeout)
    if args.json:
        print_json(to_dict(r))
    else:
        print(summary(r))
    return EXIT_OK if r.committed else EXIT_FAILED


def summary(r: pb.MigrateResponse) -> str:
    """One line: where it went, and how long the request stood still."""
    head = f"{r.request_id}: {r.source} -> {r.destination}"
    if not r.committed:
        return f"{head} aborted in {r.abort_stage or '?'}: {r.reason} (after {r.total_ms:.1f} ms)"
    downtime = f"{r.downtime_ms:.1f} ms" if r.HasField("downtime_ms") else "-"
    return (f"{head} done: {r.stages} pre-copy stage(s), blocks {list(r.blocks_per_stage)}, "
            f"downtime {downtime}, total {r.total_ms:.1f} ms")


def run(args: argparse.Namespace) -> int:
    return run_command(args, _migrate)
