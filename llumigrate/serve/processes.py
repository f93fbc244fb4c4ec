"""The serve's other frontend processes (`--api-server-count N`): started
on the shared HTTP socket once the first frontend serves, each joined to
the hub (`hub.py`); stopped before it."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
from typing import Any

from llumigrate.controller.cluster import Cluster
from llumigrate.serve import frontend_proc
from llumigrate.serve.engine_client import ClusterEngineClient
from llumigrate.serve.hub import FrontendHub

# A frontend process imports vLLM and builds its tokenizer: tens of seconds here.
START_TIMEOUT_S = 300.0


class FrontendProcesses:
    def __init__(self, count: int) -> None:
        self.count = count
        self.hub: FrontendHub | None = None
        self.procs: list[Any] = []

    async def start(self, sock: socket.socket, args: argparse.Namespace, client: ClusterEngineClient,
                    cluster: Cluster, log_level: str) -> None:
        if self.count <= 0:
            return
        self.hub = FrontendHub(client, cluster)
        address = await self.hub.start()
        ctx = multiprocessing.get_context("spawn")
        owners = [f"f{k}" for k in range(1, self.count + 1)]
        for owner in owners:
            proc = ctx.Process(target=frontend_proc.run, name=f"llumigrate-frontend-{owner}", daemon=True,
                               args=(sock, args, address, self.hub.token, owner, log_level))
            proc.start()
            self.procs.append(proc)
        await self.hub.wait_for(owners, START_TIMEOUT_S, alive=lambda: all(p.is_alive() for p in self.procs))

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        self.procs = []
        if self.hub is not None:
            await self.hub.close()
            self.hub = None
