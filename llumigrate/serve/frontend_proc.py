"""A frontend process of `llumigrate serve --api-server-count N` (one of the
N - 1 besides the serve process): vLLM's server on the shared listening
socket, over `RemoteClusterClient`. Started by `Service` (multiprocessing,
spawn); stops on SIGTERM or when the serve process goes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket


def run(sock: socket.socket, args: argparse.Namespace, hub: tuple[str, int], hub_token: str,
        owner: str, log_level: str) -> None:
    """The process's entry point."""
    logging.basicConfig(level=log_level.upper(),
                        format=f"%(asctime)s %(levelname)s [frontend {owner}] %(name)s: %(message)s")
    asyncio.run(_serve(sock, args, hub, hub_token, owner))


async def _serve(sock: socket.socket, args: argparse.Namespace, hub: tuple[str, int], hub_token: str,
                 owner: str) -> None:
    from llumigrate.gcheap import freeze_startup_heap
    from llumigrate.serve.frontend import VllmServer
    from llumigrate.serve.remote_client import RemoteClusterClient

    client = RemoteClusterClient(hub, hub_token, owner)
    infos = await client.connect()
    server = VllmServer(args, client)
    await server.start(sock, infos, client.remove_lora_async)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == parent and not client.hub.lost:
            await asyncio.sleep(0.5)
        stop.set()
    loop.create_task(watch_parent())
    freeze_startup_heap()
    await stop.wait()
    await server.stop()
    client.shutdown()
