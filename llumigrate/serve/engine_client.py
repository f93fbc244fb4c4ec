"""`ClusterEngineClient`: vLLM's engine-core client interface over the
cluster, at the seam where vLLM's own data-parallel load balancer sits.

vLLM's `AsyncLLM` in the serve process (input processing; detokenization,
stop strings, logprobs and `n > 1` fan-out; stat logging) hands it each
`EngineCoreRequest`; it sends the request to the instance the global
scheduler chooses and merges every instance's `EngineCoreOutputs` into the
one stream `AsyncLLM` reads. A migration changes where a request runs, never
its id or its stream: the frontend never sees one happen.

Engine utilities fan out: a LoRA adapter loaded here is loaded on every
instance (and on one that joins later: `Cluster.loras`); prefix-cache resets,
sleep and wake-up, profiling and worker RPCs reach every instance.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from llumigrate.controller.cluster import Cluster
from llumigrate.engine.vllm_api import EngineCoreClient, EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from llumigrate.errors import RequestNotFound
from llumigrate.serve.scheduler import GlobalScheduler

logger = logging.getLogger(__name__)

# A child of an `n > 1` request: vLLM's ParentRequest names it "<index>_<parent id>".
_CHILD = re.compile(r"^\d+_(.+)$")
MAX_PARENTS = 1024


class _Resources:
    """What `AsyncLLM.errored` reads. The cluster is never dead as a whole:
    lost instances are replaced and their requests replayed."""

    engine_dead = False


class ClusterEngineClient(EngineCoreClient):
    def __init__(self, cluster: Cluster, scheduler: GlobalScheduler, engine_indexes: dict[str, int]) -> None:
        self.cluster, self.scheduler = cluster, scheduler
        # vLLM's stat loggers label each engine by index: instance "iK" is
        # engine K while K is one of those the frontend started with.
        self.engine_index = dict(engine_indexes)
        self.engine_ranks_managed = sorted(set(self.engine_index.values())) or [0]
        self.resources = _Resources()
        self._queue: asyncio.Queue[EngineCoreOutputs] = asyncio.Queue()
        self._pending: dict[str, EngineCoreOutputs] = {}   # this loop turn's batches, by instance
        self._siblings: dict[str, str] = {}   # parent id of n > 1 children -> their instance

    # -- the data path --------------------------------------------------------------
    async def add_request_async(self, request: EngineCoreRequest) -> None:
        await self.dispatch(request, self._emit)

    async def dispatch(self, request: EngineCoreRequest, emit: Callable[[str, EngineCoreOutput, int], None],
                       owner: str | None = None) -> None:
        """Send `request` where the global scheduler chooses; its outputs go
        to `emit`, or from the agents to frontend process `owner` (`hub.py`)."""
        instance = self._sibling_instance(request) or self.scheduler.choose(int(request.priority))
        self._note_sibling(request, instance)
        await self.cluster.submit_core(request, instance=instance, emit=emit, owner=owner)

    def _sibling_instance(self, request: EngineCoreRequest) -> str | None:
        """The children of one `n > 1` request go where the first went (one
        prefill of their shared prompt, as in vLLM); each migrates on its own."""
        m = _CHILD.match(request.request_id)
        iid = self._siblings.get(m.group(1)) if m else None
        inst = self.cluster.instances.get(iid) if iid is not None else None
        return iid if inst is not None and inst.up and not inst.draining else None

    def _note_sibling(self, request: EngineCoreRequest, instance: str) -> None:
        m = _CHILD.match(request.request_id)
        if m is None or m.group(1) in self._siblings:
            return
        # NOTE: vLLM adds a parent's children one after another at once; the
        # latest parents are enough to remember.
        if len(self._siblings) >= MAX_PARENTS:
            self._siblings.pop(next(iter(self._siblings)))
        self._siblings[m.group(1)] = instance

    def _emit(self, instance_id: str, output: EngineCoreOutput, pos: int = 0) -> None:
        # NOTE: in this process one connection per agent keeps each hop's
        # outputs in order, and a hop starts only after the one before ended.
        self._batch(instance_id).outputs.append(output)

    def on_stats(self, instance_id: str, stats: Any) -> None:
        """An instance's scheduler stats, for vLLM's stat loggers (only for
        the engines they know): with that step's outputs, in one batch."""
        if instance_id in self.engine_index:
            self._batch(instance_id).scheduler_stats = stats

    def _batch(self, instance_id: str) -> EngineCoreOutputs:
        """This event-loop turn's batch of `instance_id`'s outputs for
        `AsyncLLM` (one per engine step, as from a vLLM engine core)."""
        batch = self._pending.get(instance_id)
        if batch is None:
            if not self._pending:
                asyncio.get_running_loop().call_soon(self._flush)
            batch = self._pending[instance_id] = EngineCoreOutputs(
                engine_index=self.engine_index.get(instance_id, 0), outputs=[])
        return batch

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for batch in pending.values():
            self._queue.put_nowait(batch)

    async def get_output_async(self) -> EngineCoreOutputs:
        return await self._queue.get()

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            try:
                await self.cluster.abort(rid)
            except RequestNotFound:
                pass
            except Exception:  # the instance is gone: failover or its loss ends it
                logger.exception("abort of %s failed", rid)

    # -- engine utilities -------------------------------------------------------------
    async def get_supported_tasks_async(self) -> tuple:
        return tuple(await self.cluster.utility_one("get_supported_tasks"))

    async def add_lora_async(self, lora_request: Any) -> bool:
        return await self.cluster.add_lora(lora_request)

    async def remove_lora_async(self, lora_id: int) -> bool:
        return await self.cluster.remove_lora(lora_id)

    async def list_loras_async(self) -> set[int]:
        return set(await self.cluster.utility_one("list_loras"))

    async def pin_lora_async(self, lora_id: int) -> bool:
        return all(await self.cluster.utility_all("pin_lora", lora_id))

    async def reset_prefix_cache_async(self, *args: Any, **kwargs: Any) -> bool:
        return all(await self.cluster.utility_all("reset_prefix_cache", *args, *kwargs.values()))

    async def reset_mm_cache_async(self) -> None:
        await self.cluster.utility_all("reset_mm_cache")

    async def reset_encoder_cache_async(self) -> None:
        await self.cluster.utility_all("reset_encoder_cache")

    async def sleep_async(self, level: int = 1, mode: str = "abort") -> None:
        await self.cluster.utility_all("sleep", level, mode)

    async def wake_up_async(self, tags: list[str] | None = None) -> bool:
        return all(await self.cluster.utility_all("wake_up", tags))

    async def is_sleeping_async(self) -> bool:
        return any(await self.cluster.utility_all("is_sleeping"))

    async def profile_async(self, *args: Any, **kwargs: Any) -> None:
        await self.cluster.utility_all("profile", *args, *kwargs.values())

    async def pause_scheduler_async(self, *args: Any, **kwargs: Any) -> None:
        await self.cluster.utility_all("pause_scheduler", *args, *kwargs.values())

    async def resume_scheduler_async(self) -> None:
        await self.cluster.utility_all("resume_scheduler")

    async def is_scheduler_paused_async(self) -> bool:
        return all(await self.cluster.utility_all("is_scheduler_paused"))

    async def collective_rpc_async(self, method: str, timeout: float | None = None,
                                   args: tuple = (), kwargs: dict | None = None) -> list:
        results = await self.cluster.utility_all("collective_rpc", method, timeout, args, kwargs)
        return [r for per_instance in results for r in per_instance]

    def dp_engines_running(self) -> bool:
        return False

    def get_kv_event_sources(self) -> dict:
        return {}

    def shutdown(self, timeout: float | None = None) -> None:
        """The service closes the cluster; nothing is owned here."""
