"""What the control commands (`commands/`) share: connection flags, running
one client action, printing tables or JSON, and turning errors into exit codes.

Exit codes: 0 done; 1 the operation ran but did not succeed (a migration
aborted); 2 an error (the server's status code and message on stderr, no
traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from llumigrate.control.client import DEFAULT_TIMEOUT_S, ControlClient
from llumigrate.control.convert import to_dict
from llumigrate.control.server import DEFAULT_ADDRESS
from llumigrate.errors import ConfigError

ENV_TOKEN = "LLUMIGRATE_TOKEN"
EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

Action = Callable[[ControlClient, argparse.Namespace], Awaitable[int]]
Columns = Sequence[tuple[str, str]]  # (field, header)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"control API (default {DEFAULT_ADDRESS})")
    parser.add_argument("--token", default=None, help=f"bearer token (default: ${ENV_TOKEN})")
    parser.add_argument("--tls-ca", default=None, metavar="PEM", help="use TLS, trusting this CA")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_command(args: argparse.Namespace, action: Action) -> int:
    """Runs `action(client, args)` on a fresh event loop; returns its exit code,
    or EXIT_ERROR after printing the error in one line."""
    try:
        return asyncio.run(_with_client(args, action))
    except grpc.aio.AioRpcError as e:
        return _fail(f"{e.code().name}: {e.details()}")
    except (ConfigError, OSError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _with_client(args: argparse.Namespace, action: Action) -> int:
    token = args.token or os.environ.get(ENV_TOKEN) or None
    async with ControlClient(args.address, token, args.tls_ca, args.timeout) as client:
        return await action(client, args)


def _fail(message: str) -> int:
    print(f"llumigrate: {message}", file=sys.stderr)
    return EXIT_ERROR


def instance_command(verb: str) -> tuple[Callable[[argparse.ArgumentParser], None],
                                         Callable[[argparse.Namespace], int]]:
    """`add_arguments` and `run` of a command taking one INSTANCE and calling
    `client.<verb>(instance)` (drain, undrain)."""
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("instance", help="instance id")
        add_connection_arguments(parser)

    async def act(client: ControlClient, args: argparse.Namespace) -> int:
        inst = await getattr(client, verb)(args.instance)
        if args.json:
            print_json(to_dict(inst))
        else:
            print(f"{inst.id}: {'draining' if inst.draining else 'accepting requests'}")
        return EXIT_OK

    def run(args: argparse.Namespace) -> int:
        return run_command(args, act)

    return add_arguments, run


def print_json(data: Any) -> None:
    print(json.dumps(data, sort_keys=False))


def print_rows(args: argparse.Namespace, rows: list[dict[str, Any]], columns: Columns) -> None:
    """`rows` as a JSON list with --json, else as a table of `columns`."""
    if args.json:
        print_json(rows)
        return
    table = [[header for _, header in columns]]
    table += [[_cell(row.get(name)) for name, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None or value == "" else str(value)
