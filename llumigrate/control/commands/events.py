"""Print events as they happen: dispatches, migrations, instances up, down,
drained, joining and leaving the cluster."""

from __future__ import annotations

import argparse
import time

from llumigrate.control.v1 import control_pb2 as pb
from llumigrate.control.cli import EXIT_OK, add_connection_arguments, print_json, run_command
from llumigrate.control.client import ControlClient
from llumigrate.control.convert import to_dict
from llumigrate.control.events import KINDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=0, metavar="N",
                        help="stop after N events (default: run until interrupted)")
    parser.add_argument("--kind", action="append", default=[], choices=KINDS,
                        help="only this kind (repeatable; default: all)")
    add_connection_arguments(parser)


async def _watch(client: ControlClient, args: argparse.Namespace) -> int:
    seen = 0
    async for event in client.watch_events(args.kind):
        if args.json:
            print_json(to_dict(event))  # one object per line
        else:
            print(line(event))
        seen += 1
        if seen == args.count:
            break
    return EXIT_OK


def line(e: pb.Event) -> str:
    """`HH:MM:SS.mmm #seq kind request instance[->destination] k=v ...`."""
    clock = time.strftime("%H:%M:%S", time.localtime(e.timestamp)) + f".{int(e.timestamp * 1e3) % 1000:03d}"
    where = f"{e.instance_id}->{e.destination_id}" if e.destination_id else e.instance_id
    parts = [clock, f"#{e.seq}", e.kind, e.request_id or "-", where or "-"]
    parts += [f"{k}={v}" for k, v in sorted(e.detail.items())]
    if e.dropped:
        parts.append(f"[{e.dropped} earlier event(s) dropped]")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    return run_command(args, _watch)
