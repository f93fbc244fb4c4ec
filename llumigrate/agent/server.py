"""The instance agent: one process per vLLM instance.

Owns an `EngineRuntime` (one vLLM engine core, llumigrate's connector and
worker extension) and serves controllers over `rpc`. Requests arrive as vLLM
`EngineCoreRequest`s (`add`), made by the serve process's vLLM frontend, and
their `EngineCoreOutputs` go back unchanged as `out` events, one frame per
engine step and connection, with the step's scheduler stats. Migration
verbs: `track` (prepare the source), `precopy` (a carrier request on the
destination that loads full blocks into its prefix cache), `stop` (the
request's sealed state), `release`; `utility` calls an engine-core utility
(LoRA adapters, prefix-cache reset, ...).
"""

from __future__ import annotations

import asyncio
import logging
import time
from llumigrate.agent.outputs import Diverged, Frames, position, unreplayed
from llumigrate.agent.request import AgentRequest as _Req
from llumigrate.agent.rpc import Connection, RpcServer
from llumigrate.agent.source import SourceVerbs
from llumigrate.engine.commands import CommandClient
from llumigrate.engine.notify import NotifyListener
from llumigrate.engine.params import PARAMS_KEY, RequestTag
from llumigrate.engine.runtime import EngineRuntime
from llumigrate.engine.vllm_api import (EngineCoreOutputs, decode_any, decode_request, encode,
                                        finish_reason_name, finished_output)
from llumigrate.errors import MigrationAborted, RequestNotFound

logger = logging.getLogger(__name__)

# How often the agent checks that its engine is alive.
ENGINE_WATCH_S = 0.2
# Load reports: pushed to every controller this often while the engine steps,
# and at least every HEARTBEAT_S when it is idle.
REPORT_S = 0.1
HEARTBEAT_S = 1.0


class Agent(SourceVerbs):
    def __init__(self, instance_id: str, runtime: EngineRuntime,
                 notify: NotifyListener | None = None, commands: CommandClient | None = None) -> None:
        self.instance_id = instance_id
        self.rt = runtime
        self.notify = notify
        self.commands = commands
        self.kv: dict = {}
        self.reqs: dict[str, _Req] = {}
        self.owners: dict[str, Connection] = {}   # frontend processes of the serve, by id
        self.started = time.time()
        self.shutdown_event = asyncio.Event()  # set by the `shutdown` RPC
        self.engine_dead = False  # the engine process died: this agent goes down
        self.server = RpcServer({name[4:]: getattr(self, name) for name in dir(self)
                                 if name.startswith("rpc_")})
        self.server.on_disconnect = self._forget_owner

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.kv = await self.rt.rpc("llumigrate_attach")
        addr = await self.server.start(host, port)
        loop = asyncio.get_running_loop()
        self._pump = loop.create_task(self._pump_outputs())
        self._reporter = loop.create_task(self._report_load())
        self._watchdog = loop.create_task(self._watch_engine())
        return addr

    async def _watch_engine(self) -> None:
        """An agent without a live engine must not look alive: when the engine
        dies, shut down, so controllers see this instance lost and fail its
        requests over (instead of each request ending in an engine error)."""
        while not self.shutdown_event.is_set():
            if self._check_engine():
                return
            await asyncio.sleep(ENGINE_WATCH_S)

    def _check_engine(self) -> bool:
        """True (and shutting down) when the engine is dead."""
        if not self.engine_dead and not self.rt.errored:
            return False
        if not self.engine_dead:
            logger.error("engine of %s died; shutting the agent down", self.instance_id)
            self.engine_dead = True
            self.shutdown_event.set()
        return True

    async def _report_load(self) -> None:
        """Push `load` events (the scheduler's load reports) to every connected
        controller: on each change, at most every REPORT_S, and a heartbeat."""
        last, last_at = None, 0.0
        while not self.shutdown_event.is_set():
            await asyncio.sleep(REPORT_S)
            load = self.rt.snapshot().__dict__
            now = time.monotonic()
            if load == last and now - last_at < HEARTBEAT_S:
                continue
            last, last_at = load, now
            for conn in list(self.server.connections):
                await conn.push("load", instance_id=self.instance_id, load=load)

    # -- outputs -------------------------------------------------------------
    async def _pump_outputs(self) -> None:
        """Route each batch of the engine's outputs to the controllers that
        own its requests; a request being stopped has its end withheld (the
        seal tells a stop from a real end: `source.py`)."""
        try:
            while True:
                outs = await self.rt.outputs()
                await self._route(outs)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # EngineDeadError: the watchdog takes the agent down
            if not self.shutdown_event.is_set():
                logger.error("engine outputs of %s ended: %s", self.instance_id, e)
                self.engine_dead = True
                self.shutdown_event.set()

    async def _route(self, outs: EngineCoreOutputs) -> None:
        frames = Frames()
        for o in outs.outputs:
            req = self.reqs.get(o.request_id)
            if req is None or req.finished:
                continue
            req.num_tokens += len(o.new_token_ids)
            if o.kv_transfer_params and PARAMS_KEY in o.kv_transfer_params:
                req.kv = o.kv_transfer_params[PARAMS_KEY]
            try:
                o = unreplayed(req, o)
            except Diverged as e:
                self._diverged(req, frames, e)
                continue
            if o is None:
                continue
            pos = position(req, o)
            if o.finish_reason is not None:
                req.finish(finish_reason_name(o.finish_reason))
                if req.stopping:  # the stop's end, or a real one: the seal tells (source.py)
                    req.held_back.append((o, pos))
                    continue
                if req.conn is not None:
                    self.reqs.pop(req.rid, None)
            frames.add(req, o, pos)
        await frames.send(self._controllers(), outs.scheduler_stats, outs.timestamp)

    def _diverged(self, req: _Req, frames: Frames, e: Diverged) -> None:
        """A replay that does not reproduce what its client has: end it as an error."""
        logger.error("failover replay diverged from the tokens already streamed: %s", e)
        asyncio.get_running_loop().create_task(self.rt.abort([req.rid]))
        req.finish("error")
        self.reqs.pop(req.rid, None)
        frames.add(req, finished_output(req.rid, [], "error"), req.num_restored + req.num_tokens)

    def _controllers(self) -> list[Connection]:
        owners = set(self.owners.values())
        return [c for c in self.server.connections if c not in owners]

    async def push_outputs(self, req: _Req, outputs: list[tuple]) -> None:
        """Send `outputs` ((EngineCoreOutput, position) pairs) of `req` where
        its outputs go, now."""
        frames = Frames()
        for o, pos in outputs:
            frames.add(req, o, pos)
        await frames.send()

    def _forget_owner(self, conn: Connection) -> None:
        for owner in [o for o, c in self.owners.items() if c is conn]:
            del self.owners[owner]

    # -- introspection ---------------------------------------------------------
    async def rpc_info(self, conn: Connection) -> dict:
        load = self.rt.snapshot()
        return {"instance_id": self.instance_id, **self.kv, "max_model_len": self.rt.max_model_len,
                "num_gpu_blocks": load.num_blocks + 1, "engine_facts": self.rt.engine_facts,
                "load": load.__dict__,
                "requests": sorted(r for r, q in self.reqs.items() if not q.finished and q.conn is not None)}

    async def rpc_status(self, conn: Connection) -> dict:
        return {"worker": await self.rt.rpc("llumigrate_status"), "load": self.rt.snapshot().__dict__}

    # -- requests ----------------------------------------------------------
    async def rpc_own(self, conn: Connection, owner: str) -> bool:
        """`conn` is frontend process `owner` of the serve: requests added
        for it send it their outputs."""
        self.owners[owner] = conn
        return True

    async def rpc_add(self, conn: Connection, request: bytes, owner: str | None = None,
                      stream: str | None = None, skip: list[int] | tuple = ()) -> dict:
        """Run `request` (a vLLM EngineCoreRequest, encoded) on this engine.
        Its outputs go to `conn`, or to frontend `owner` (if connected here:
        then under the name `stream`, and `conn` gets their tokens). The
        first tokens it produces are checked against `skip` and not sent
        (a replay of tokens its client has)."""
        core = decode_request(request)
        rid = core.request_id
        if rid in self.reqs and not self.reqs[rid].finished:
            raise ValueError(f"request {rid!r} already exists on {self.instance_id}")
        tag = RequestTag.from_params((core.sampling_params.extra_args or {}).get("kv_transfer_params")
                                     if core.sampling_params is not None else None)
        owner_conn = self.owners.get(owner) if owner else None
        self.reqs[rid] = _Req(rid, conn, owner=owner_conn, stream=stream,
                              num_restored=len(tag.output_tokens) if tag else 0, skip=[int(t) for t in skip])
        try:
            await self.rt.add(core)
        except BaseException:
            self.reqs.pop(rid, None)
            raise
        return {"rid": rid, "instance_id": self.instance_id, "owner": owner_conn is not None}

    async def rpc_abort(self, conn: Connection, rid: str) -> bool:
        req = self.reqs.get(rid)
        if req is None or req.finished:
            return False
        await self.rt.abort([rid])
        req.finish("abort")
        if not req.stopping:  # a stop in flight forgets it when it ends
            self.reqs.pop(rid, None)
        return True

    async def rpc_utility(self, conn: Connection, name: str, args: bytes) -> bytes:
        """Engine-core utility `name` (`add_lora`, `list_loras`,
        `reset_prefix_cache`, ...); arguments and result in vLLM's own encoding."""
        return encode(await self.rt.utility(name, *decode_any(args)))

    async def rpc_inject_fault(self, conn: Connection, kind: str, seconds: float = 0.0) -> bool:
        """Stress testing only: this engine's next KV pull fails mid-transfer
        ("drop", or "stall" for `seconds` first); "clear" disarms. Returns True
        when a fault armed earlier had not fired."""
        return bool(await self.rt.rpc("llumigrate_fault", kind, float(seconds)))

    # -- migration: destination side -------------------------------------------------
    async def rpc_precopy(self, conn: Connection, request: bytes, timeout: float = 30.0) -> dict:
        """Run carrier `request` (an EngineCoreRequest whose prompt is the
        moved request's tokens so far and whose tag loads its full blocks)
        to load them into this engine's prefix cache. Returns {hit, loaded}."""
        core = decode_request(request)
        key = core.request_id
        req = _Req(key, None)
        self.reqs[key] = req
        try:
            await self.rt.add(core)
            await asyncio.wait_for(asyncio.shield(req.done.wait()), timeout)
        except asyncio.TimeoutError:
            await self.rt.abort([key])
            raise MigrationAborted("pre-copy stage timed out", "precopy") from None
        finally:
            self.reqs.pop(key, None)
        kv = req.kv or {}
        if req.reason in ("abort", "error") or kv.get("failed"):
            raise MigrationAborted(f"pre-copy load failed ({req.reason})", "precopy")
        return {"hit": kv.get("hit", 0), "loaded": kv.get("loaded", 0)}

    async def rpc_cancel(self, conn: Connection, key: str) -> bool:
        return await self.rpc_abort(conn, key)

    # -- lifecycle -----------------------------------------------------------
    async def rpc_shutdown(self, conn: Connection) -> bool:
        asyncio.get_running_loop().call_later(0.05, self.shutdown_event.set)
        return True

    def _live(self, rid: str) -> _Req:
        req = self.reqs.get(rid)
        if req is None or req.finished:
            raise RequestNotFound(f"no running request {rid!r} on {self.instance_id}")
        return req
