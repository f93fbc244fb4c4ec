"""`ClusterFaults`: what each fault does to a live `Cluster` (the injector's
`FaultActions`), and the replacement of killed instances."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from llumigrate.controller.cluster import Cluster, cpu_threads
from llumigrate.controller.instance import Instance
from llumigrate.controller.request import RequestHandle
from llumigrate import procfs
from llumigrate.stress.config import StressConfig

logger = logging.getLogger(__name__)

HOG_PROMPT = 3000            # tokens per hog request (below max_model_len)
HOG_START_S = 30.0           # how long a hog may take to be admitted


class ClusterFaults:
    """Faults against `cluster`. `on_spawned(inst)` is told of every
    replacement instance; a kill is allowed while more than
    `cfg.survivors` instances are up."""

    def __init__(self, cluster: Cluster, cfg: StressConfig,
                 on_spawned: Callable[[Instance], None]) -> None:
        self.cluster, self.cfg, self.on_spawned = cluster, cfg, on_spawned
        self.client_aborted: set[str] = set()
        self.armed: dict[str, str] = {}              # request id -> instance with an armed transfer fault
        self.hogs: dict[str, list[RequestHandle]] = {}
        self.kills = 0
        self.respawns: list[asyncio.Task] = []
        self._names = itertools.count(1)
        self._fills = itertools.count()  # salts hog ids (the cluster forgets old requests)
        self._spawn_lock = asyncio.Lock()

    def live(self) -> list[Instance]:
        return [i for i in self.cluster.instances.values() if i.up]

    def can_kill(self) -> bool:
        return len(self.live()) > self.cfg.survivors

    async def kill(self, instance_id: str, engine_only: bool) -> None:
        inst = self.cluster.instances[instance_id]
        if inst.process is None or not inst.up:
            return
        self.kills += 1
        if engine_only:  # the agent must notice its engine died and go down itself
            hit = procfs.kill_descendants(inst.process.pid)
            logger.warning("killed the engine of %s (pids %s)", instance_id, hit)
        else:
            inst.kill()
            logger.warning("killed agent %s (pid %d) and its engine", instance_id, inst.process.pid)
        if self.cfg.respawn:
            self.respawns.append(asyncio.ensure_future(self._respawn()))

    async def _respawn(self) -> None:
        # NOTE: one engine start at a time: parallel starts compete for cores
        # and for the memory profile.
        async with self._spawn_lock:
            if self.cluster._closing:
                return
            name = f"r{next(self._names)}"
            try:
                inst = await self.cluster.spawn(name, env=cpu_threads(self.cfg.num_instances))
            except Exception as e:
                logger.error("respawn %s failed: %s", name, e)
                return
            self.on_spawned(inst)

    async def arm_transfer(self, request_id: str, instance_id: str, kind: str) -> None:
        """`instance_id`'s next KV pull (this migration's) fails: "drop" or "stall"."""
        seconds = self.cfg.stall_s if kind == "stall" else 0.0
        inst = self.cluster.get_instance(instance_id)
        await inst.call("inject_fault", rpc_timeout=10, kind=kind, seconds=seconds)
        self.armed[request_id] = instance_id

    async def abort_request(self, request_id: str) -> None:
        self.client_aborted.add(request_id)
        await self.cluster.abort(request_id)

    async def exhaust(self, request_id: str, instance_id: str) -> None:
        """Fill `instance_id` with long requests until it cannot take `request_id`."""
        inst = self.cluster.get_instance(instance_id)
        h = self.cluster.get_request(request_id)
        bs = inst.block_size
        need = -(-(len(h.all_token_ids) + bs) // bs)
        free = int((await inst.call("info", rpc_timeout=10))["load"]["free_blocks"])
        to_fill = (free - max(0, need - 2)) * bs
        hogs = self.hogs.setdefault(request_id, [])
        salt = next(self._fills)
        while to_fill > 0:
            n = min(HOG_PROMPT, to_fill)
            prompt = [3 + (k * 31 + salt * 17 + len(hogs)) % 1800 for k in range(n)]
            hogs.append(await self.cluster.submit(
                prompt, {"max_tokens": 4000 - n, "temperature": 0.0, "ignore_eos": True},
                instance=instance_id, request_id=f"hog-{request_id}-{salt}-{len(hogs)}"))
            to_fill -= n + bs
        for hog in hogs:
            try:
                await hog.wait_tokens(1, HOG_START_S)
            except asyncio.TimeoutError:
                logger.info("hog %s not admitted in %.0fs", hog.request_id, HOG_START_S)

    async def migration_done(self, request_id: str) -> bool:
        """Clean up after `request_id`'s migration: abort its hogs, disarm a
        transfer fault. Returns False when an armed transfer fault never fired."""
        for hog in self.hogs.pop(request_id, []):
            try:
                await self.cluster.abort(hog.request_id)
                await hog.wait(30)
            except Exception as e:
                logger.info("hog %s: %s", hog.request_id, e)
        instance_id = self.armed.pop(request_id, None)
        if instance_id is None:
            return True
        try:
            inst = self.cluster.get_instance(instance_id)
            return not await inst.call("inject_fault", rpc_timeout=10, kind="clear")
        except Exception:  # the destination died: the fault did its part or cannot matter
            return True

    async def wait_respawns(self, timeout: float) -> None:
        pending = [t for t in self.respawns if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
