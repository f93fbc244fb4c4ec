"""`RemoteClusterClient`: vLLM's engine-core client interface in a frontend
process of `llumigrate serve --api-server-count N` (not the first).

Requests, aborts and engine utilities go to the serve process's hub
(`hub.py`), where the global scheduler places them. Outputs come straight
from the agents: this process connects to every instance agent and says it
owns the requests added for it (`own`), so a request's outputs reach it on
every hop, wherever a migration moves it. The agents it has not reached yet
send through the hub instead. A request's outputs come from several
connections (its hops' agents, the hub), each with its position in the
request's output tokens: they are put in order here (`StreamOrder`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import Any

from llumigrate.agent.rpc import RpcClient
from llumigrate.engine.vllm_api import EngineCoreClient, EngineCoreOutputs, EngineCoreRequest, decode_any, \
    decode_outputs, encode

logger = logging.getLogger(__name__)

# How often the agents are listed (new and restarted instances are reached).
AGENTS_S = 1.0


class _Resources:
    engine_dead = False


class RemoteClusterClient(EngineCoreClient):
    def __init__(self, hub: tuple[str, int], hub_token: str, owner: str) -> None:
        self.hub_address, self.hub_token, self.owner = hub, hub_token, owner
        self.hub = RpcClient(on_event=self._on_event)
        self.agents: dict[str, RpcClient] = {}
        self.engine_index: dict[str, int] = {}
        self.cluster_token: str | None = None
        self.resources = _Resources()
        self.engine_ranks_managed: list[int] = [0]
        self._queue: asyncio.Queue[EngineCoreOutputs] = asyncio.Queue()
        self.order = StreamOrder()
        self._watch: asyncio.Task | None = None

    async def connect(self) -> list[dict]:
        """Join the hub and the agents up now; their `info` answers."""
        await self.hub.connect(*self.hub_address, token=self.hub_token)
        hello = await self.hub.call("hello", owner=self.owner)
        self.cluster_token = hello.get("token")
        agents = list(hello["agents"])
        self.engine_index = {a["instance_id"]: a["index"] for a in agents if a["index"] is not None}
        self.engine_ranks_managed = sorted(set(self.engine_index.values())) or [0]
        await self._reach(agents)
        self._watch = asyncio.get_running_loop().create_task(self._watch_agents())
        return [a["info"] for a in agents]

    async def _watch_agents(self) -> None:
        while True:
            await asyncio.sleep(AGENTS_S)
            try:
                await self._reach(await self.hub.call("agents"))
            except Exception as e:  # the hub going away ends this process (its server stops)
                logger.warning("listing the agents failed: %s", e)

    async def _reach(self, agents: list[dict]) -> None:
        for a in agents:
            iid = a["instance_id"]
            known = self.agents.get(iid)
            if known is not None and not known.lost:
                continue
            client = RpcClient(on_event=lambda msg, iid=iid: self._on_event(msg, iid))
            try:
                await client.connect(a["host"], int(a["port"]), token=self.cluster_token)
                await client.call("own", owner=self.owner)
            except Exception as e:
                logger.warning("could not reach instance %s: %s", iid, e)
                await client.close()
                continue
            self.agents[iid] = client

    def _on_event(self, msg: dict, instance_id: str | None = None) -> None:
        if msg.get("event") != "out" or not isinstance(msg.get("data"), bytes):
            return
        outs = decode_outputs(msg["data"])
        positions = msg.get("pos") or [None] * len(outs.outputs)
        ready = [o for o, pos in zip(outs.outputs, positions) for o in self.order.arrived(o, pos)]
        if ready:
            idx = self.engine_index.get(instance_id, 0) if instance_id is not None else outs.engine_index
            self._queue.put_nowait(EngineCoreOutputs(engine_index=idx, outputs=ready))

    # -- vLLM's engine-core client interface ----------------------------------------
    async def get_output_async(self) -> EngineCoreOutputs:
        return await self._queue.get()

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        self.order.start(request.request_id)
        await self.hub.call("add", request=encode(request), owner=self.owner)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.order.forget(rid)
        await self.hub.call("abort", ids=list(request_ids))

    async def _utility(self, name: str, *args: Any) -> Any:
        return decode_any(await self.hub.call("utility", name=name, args=encode(args)))

    async def get_supported_tasks_async(self) -> tuple:
        return tuple(await self._utility("get_supported_tasks"))

    async def add_lora_async(self, lora_request: Any) -> bool:
        return await self._utility("add_lora", lora_request)

    async def remove_lora_async(self, lora_id: int) -> bool:
        return await self._utility("remove_lora", lora_id)

    async def list_loras_async(self) -> set[int]:
        return set(await self._utility("list_loras"))

    async def pin_lora_async(self, lora_id: int) -> bool:
        return await self._utility("pin_lora", lora_id)

    async def reset_prefix_cache_async(self, *args: Any, **kwargs: Any) -> bool:
        return await self._utility("reset_prefix_cache", *args, *kwargs.values())

    async def reset_mm_cache_async(self) -> None:
        await self._utility("reset_mm_cache")

    async def reset_encoder_cache_async(self) -> None:
        await self._utility("reset_encoder_cache")

    async def sleep_async(self, level: int = 1, mode: str = "abort") -> None:
        await self._utility("sleep", level, mode)

    async def wake_up_async(self, tags: list[str] | None = None) -> bool:
        return await self._utility("wake_up", tags)

    async def is_sleeping_async(self) -> bool:
        return await self._utility("is_sleeping")

    async def profile_async(self, *args: Any, **kwargs: Any) -> None:
        await self._utility("profile", *args, *kwargs.values())

    def dp_engines_running(self) -> bool:
        return False

    def get_kv_event_sources(self) -> dict:
        return {}

    def shutdown(self, timeout: float | None = None) -> None:
        if self._watch is not None:
            self._watch.cancel()


class StreamOrder:
    """Puts each request's outputs in the order of their positions in its
    output tokens: a moved request's first outputs from its new agent may
    arrive before the last ones from its old agent (another connection)."""

    def __init__(self) -> None:
        self.next: dict[str, int] = {}                       # request id -> next position
        self.early: dict[str, list[tuple[int, int, Any]]] = {}  # outputs ahead of it

    def start(self, request_id: str) -> None:
        self.next[request_id] = 0

    def arrived(self, output: Any, pos: int | None) -> list:
        """The outputs now in order (`output`, and any held back behind it)."""
        rid = output.request_id
        if pos is None or rid not in self.next:
            return [output]
        expected = self.next[rid]
        if pos > expected:
            heapq.heappush(self.early.setdefault(rid, []), (pos, id(output), output))
            return []
        if pos < expected:
            logger.error("%s: an output at %d arrived behind %d; dropped", rid, pos, expected)
            return []
        ready = [output]
        self._advance(rid, output)
        early = self.early.get(rid)
        while early and early[0][0] == self.next.get(rid):
            _, _, o = heapq.heappop(early)
            ready.append(o)
            self._advance(rid, o)
        return ready

    def forget(self, request_id: str) -> None:
        self.next.pop(request_id, None)
        self.early.pop(request_id, None)

    def _advance(self, rid: str, output: Any) -> None:
        if output.finish_reason is not None:
            self.forget(rid)
        else:
            self.next[rid] += len(output.new_token_ids)
