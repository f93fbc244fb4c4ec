"""`FrontendHub`: the serve process's side of its other frontend processes
(`--api-server-count N`: N processes run vLLM's server on one listening
socket; this one, with the cluster and the global scheduler, is the first).

Each other process runs vLLM's `AsyncLLM` over `remote_client.RemoteClusterClient`,
which sends its requests, aborts and engine utilities here (authenticated
RPC on loopback) and connects to every agent itself: an agent sends the
outputs of a request straight to the frontend process that owns it, on every
hop, wherever a migration moved it (`agent/outputs.py`). This process sees
only their tokens; the ends it makes itself (a request failed, aborted or
not replayed) and the outputs of a hop whose agent the owner has not
reached yet come through here.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from llumigrate.agent.rpc import Connection, RpcServer
from llumigrate.controller.cluster import Cluster
from llumigrate.engine.vllm_api import (EngineCoreOutput, EngineCoreOutputs, decode_any, decode_request,
                                        encode, utility_args)
from llumigrate.errors import ConfigError
from llumigrate.serve.engine_client import ClusterEngineClient

logger = logging.getLogger(__name__)

# The engine utilities a frontend process may call (ClusterEngineClient's `<name>_async`).
UTILITIES = ("get_supported_tasks", "add_lora", "remove_lora", "list_loras", "pin_lora",
             "reset_prefix_cache", "reset_mm_cache", "reset_encoder_cache", "sleep", "wake_up",
             "is_sleeping", "profile", "pause_scheduler", "resume_scheduler", "is_scheduler_paused")


class FrontendHub:
    def __init__(self, client: ClusterEngineClient, cluster: Cluster) -> None:
        self.client, self.cluster = client, cluster
        self.token = secrets.token_hex(16)   # the frontend processes' own secret
        self.frontends: dict[str, Connection] = {}
        self.server = RpcServer({name[4:]: getattr(self, name) for name in dir(self)
                                 if name.startswith("rpc_")}, token=self.token)
        self.server.on_disconnect = self._forget
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        self.address = await self.server.start("127.0.0.1", 0)
        return self.address

    async def close(self) -> None:
        await self.server.close()

    def _forget(self, conn: Connection) -> None:
        for owner in [o for o, c in self.frontends.items() if c is conn]:
            del self.frontends[owner]

    async def wait_for(self, owners: list[str], timeout: float, alive: Any = None) -> None:
        """Until every frontend process of `owners` said hello (ConfigError
        when `alive()` says one died first, or on timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(o in self.frontends for o in owners):
            if alive is not None and not alive():
                raise ConfigError("a frontend process of llumigrate serve exited while starting")
            if loop.time() > deadline:
                raise ConfigError(f"frontend processes {owners} did not start in {timeout:.0f} s")
            await asyncio.sleep(0.1)

    # -- verbs ------------------------------------------------------------------
    async def rpc_hello(self, conn: Connection, owner: str) -> dict:
        self.frontends[owner] = conn
        return {"agents": await self.rpc_agents(conn), "token": self.cluster.token}

    async def rpc_agents(self, conn: Connection) -> list[dict]:
        """The instances up now, for the frontend processes to connect to."""
        return [{"instance_id": iid, "host": i.host, "port": i.port,
                 "index": self.client.engine_index.get(iid), "info": i.info}
                for iid, i in self.cluster.instances.items() if i.up]

    async def rpc_add(self, conn: Connection, request: bytes, owner: str) -> bool:
        await self.client.dispatch(decode_request(request), self._emitter(owner), owner)
        return True

    async def rpc_abort(self, conn: Connection, ids: list[str]) -> bool:
        await self.client.abort_requests_async(list(ids))
        return True

    async def rpc_utility(self, conn: Connection, name: str, args: bytes) -> bytes:
        if name not in UTILITIES:
            raise ValueError(f"unknown engine utility {name!r}; allowed: {', '.join(UTILITIES)}")
        return encode(await getattr(self.client, f"{name}_async")(*utility_args(name, decode_any(args))))

    def _emitter(self, owner: str):
        def emit(instance_id: str, output: EngineCoreOutput, pos: int) -> None:
            conn = self.frontends.get(owner)
            if conn is None:
                logger.warning("frontend %s is gone; dropped an output of %s", owner, output.request_id)
                return
            frame = EngineCoreOutputs(engine_index=self.client.engine_index.get(instance_id, 0), outputs=[output])
            asyncio.get_running_loop().create_task(conn.push_batched("out", data=encode(frame), pos=[pos]))
        return emit
