"""`Cluster`: the Python API over a set of instance agents.

    async with Cluster(model, num_instances=2, engine_args=[...]) as c:
        h = await c.submit(prompt_token_ids, {"max_tokens": 64, "temperature": 0})
        r = await c.migrate(h.request_id, "i1")
        await h.wait()

It starts (or connects to) agents, routes each hop's token events into the
request's `RequestHandle`, and runs migrations through the `Coordinator`.
`SyncCluster` wraps it for scripts that are not async.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from llumigrate.controller.coordinator import Coordinator, MigrationResult
from llumigrate.controller.instance import Instance, spawn_agent
from llumigrate.controller.request import RequestHandle
from llumigrate.errors import ConfigError, InstanceLost, MigrationRefused, RequestNotFound
from llumigrate.migration.protocol import MigrationConfig

logger = logging.getLogger(__name__)


def cpu_binding(index: int) -> dict[str, str]:
    """Pin a CPU engine's compute threads to its own core (vLLM's default
    binds every engine on a host to the same core). The operator's own
    VLLM_CPU_OMP_THREADS_BIND wins."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cores[index % len(cores)])}


class Cluster:
    def __init__(self, model: str, num_instances: int = 2, engine_args: list[str] | None = None,
                 *, run_dir: str | Path | None = None, migration: MigrationConfig | None = None,
                 kv_transport: str = "auto", token: str | None = None) -> None:
        if num_instances < 1:
            raise ConfigError(f"num_instances must be >= 1, got {num_instances}")
        self.model = model
        self.num_instances = num_instances
        self.engine_args = list(engine_args or [])
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="llumigrate-"))
        self.migration_config = migration or MigrationConfig()
        self.kv_transport = kv_transport
        self.token = token
        self.instances: dict[str, Instance] = {}
        self.requests: dict[str, RequestHandle] = {}
        self._routes: dict[str, RequestHandle] = {}   # engine rid -> handle
        self._ids = itertools.count()
        self.migrations: list[MigrationResult] = []
        self._closing = False

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> Cluster:
        ids = [f"i{n}" for n in range(self.num_instances)]
        # NOTE: engines start one after another: on a small machine parallel
        # starts compete for the same cores and memory profiling.
        for n, iid in enumerate(ids):
            inst = await spawn_agent(iid, self.model, self.engine_args, self.run_dir,
                                     token=self.token, kv_transport=self.kv_transport,
                                     env=cpu_binding(n))
            await self.add_instance(inst)
        return self

    async def add_instance(self, inst: Instance) -> None:
        await inst.connect(self._on_event, lambda: self._on_lost(inst), token=self.token)
        self.instances[inst.instance_id] = inst

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*(i.close() for i in self.instances.values()), return_exceptions=True)

    async def __aenter__(self) -> Cluster:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- requests ----------------------------------------------------------------
    async def submit(self, prompt_token_ids: list[int], sampling: dict | None = None, *,
                     instance: str | None = None, priority: int = 0,
                     request_id: str | None = None) -> RequestHandle:
        inst = self._instance(instance) if instance else self._pick()
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        if rid in self.requests:
            raise ConfigError(f"request id {rid!r} already in use")
        h = RequestHandle(rid, list(prompt_token_ids), dict(sampling or {}), priority,
                          inst.instance_id)
        self.requests[rid] = h
        self._routes[h.engine_rid] = h
        try:
            await inst.call("generate", rid=h.engine_rid, prompt_token_ids=h.prompt_token_ids,
                            sampling=h.sampling, priority=priority)
        except Exception:
            self.requests.pop(rid, None)
            self._routes.pop(h.engine_rid, None)
            raise
        return h

    async def abort(self, request_id: str) -> None:
        h = self._request(request_id)
        h.abort_requested = True  # a migration in flight checks this before it commits
        if not h.finished:
            await self.instances[h.instance_id].call("abort", rid=h.engine_rid)

    async def migrate(self, request_id: str, destination: str | None = None,
                      config: MigrationConfig | None = None) -> MigrationResult:
        h = self._request(request_id)
        h.check_migratable()
        src = self._instance(h.instance_id)
        dst = self._instance(destination) if destination else self._pick(exclude=src.instance_id)
        if dst is src:
            raise MigrationRefused("destination is the request's current instance")
        h.migrating = True
        try:
            result = await Coordinator(h, src, dst, config or self.migration_config,
                                       self._set_hop).run()
        finally:
            h.migrating = False
        if result.committed:
            h.num_migrations += 1
        self.migrations.append(result)
        return result

    # -- state -----------------------------------------------------------------
    async def instance_info(self) -> list[dict]:
        return [await i.refresh() if i.up else {"instance_id": i.instance_id, "up": False}
                for i in self.instances.values()]

    async def worker_status(self, instance: str) -> dict:
        return await self._instance(instance).call("status")

    # -- internals ---------------------------------------------------------------
    def _set_hop(self, h: RequestHandle, inst: Instance, hop: int) -> None:
        h.hop, h.instance_id = hop, inst.instance_id
        self._routes[h.engine_rid] = h

    def _on_event(self, msg: dict) -> None:
        if msg.get("event") != "out":
            return
        h = self._routes.get(msg.get("rid"))
        if h is None or h.engine_rid != msg["rid"]:
            return  # a stale hop (stopped for migration) or a carrier
        h.append(msg.get("tokens") or [])
        if msg.get("finished"):
            self._routes.pop(msg["rid"], None)
            h.finish(msg.get("reason"), msg.get("stop_reason"), msg.get("error"))

    def _on_lost(self, inst: Instance) -> None:
        inst.up = False
        if self._closing:
            return
        logger.error("instance %s lost", inst.instance_id)
        for h in list(self.requests.values()):
            if h.instance_id == inst.instance_id and not h.finished and not h.migrating:
                h.finish("error", error=f"instance {inst.instance_id} lost")

    def _instance(self, iid: str) -> Instance:
        inst = self.instances.get(iid)
        if inst is None:
            raise InstanceLost(f"no instance {iid!r}; have {sorted(self.instances)}")
        if not inst.up:
            raise InstanceLost(f"instance {iid!r} is down")
        return inst

    def _request(self, request_id: str) -> RequestHandle:
        h = self.requests.get(request_id)
        if h is None:
            raise RequestNotFound(f"no request {request_id!r}")
        return h

    def _pick(self, exclude: str | None = None) -> Instance:
        live = [i for i in self.instances.values() if i.up and i.instance_id != exclude]
        if not live:
            raise InstanceLost("no live instance to use")
        # Fewest of our unfinished requests; ties go to the lowest id.
        busy = {i.instance_id: 0 for i in live}
        for h in self.requests.values():
            if not h.finished and h.instance_id in busy:
                busy[h.instance_id] += 1
        return min(live, key=lambda i: (busy[i.instance_id], i.instance_id))
