"""The instance agent: one process per vLLM instance.

Owns an `EngineRuntime` (AsyncLLM + llumigrate connector) and serves the
controller over `rpc`. Requests stream their tokens back as `out` events.
Migration verbs: `track` (prepare the source), `precopy` (a carrier request
on the destination that loads full blocks into its prefix cache), `stop`
(abort on the source and return the sealed token list), `resume` (continue
a sealed request here, loading the blocks not yet present), `release`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from llumigrate.agent.request import AgentRequest as _Req
from llumigrate.agent.rpc import Connection, RpcServer
from llumigrate.agent.source import SourceVerbs
from llumigrate.engine.commands import CommandClient
from llumigrate.engine.notify import NotifyListener
from llumigrate.engine.params import LoadSpec, RequestTag, plain_stop_reason
from llumigrate.engine.runtime import EngineRuntime, sampling_params
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
        self.started = time.time()
        self.shutdown_event = asyncio.Event()  # set by the `shutdown` RPC
        self.engine_dead = False  # the engine process died: this agent goes down
        self.server = RpcServer({name[4:]: getattr(self, name) for name in dir(self)
                                 if name.startswith("rpc_")})

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.kv = await self.rt.rpc("llumigrate_attach")
        addr = await self.server.start(host, port)
        loop = asyncio.get_running_loop()
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
        if not self.engine_dead and not _engine_errored(self.rt):
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

    # -- introspection ---------------------------------------------------------
    async def rpc_info(self, conn: Connection) -> dict:
        load = self.rt.snapshot()
        return {"instance_id": self.instance_id, **self.kv, "max_model_len": self.rt.max_model_len,
                "load": load.__dict__, "requests": sorted(r for r, q in self.reqs.items()
                                                            if not q.finished and q.conn is not None)}

    async def rpc_status(self, conn: Connection) -> dict:
        return {"worker": await self.rt.rpc("llumigrate_status"), "load": self.rt.snapshot().__dict__}

    # -- requests ----------------------------------------------------------
    async def rpc_generate(self, conn: Connection, rid: str, prompt_token_ids: list[int],
                           sampling: dict, priority: int = 0, load: dict | None = None,
                           generator_state: bytes | None = None) -> dict:
        if rid in self.reqs and not self.reqs[rid].finished:
            raise ValueError(f"request {rid!r} already exists on {self.instance_id}")
        tag = RequestTag(rid, LoadSpec.from_wire(load) if load else None, generator_state)
        sp = sampling_params(sampling, tag)
        req = _Req(rid, conn)
        self.reqs[rid] = req
        req.task = asyncio.get_running_loop().create_task(
            self._stream(req, prompt_token_ids, sp, priority))
        return {"rid": rid, "instance_id": self.instance_id}

    async def _stream(self, req: _Req, prompt: list[int], sp: Any, priority: int) -> None:
        reason: str | None = None
        kv = None
        try:
            async for d in self.rt.generate(req.rid, prompt, sp, priority):
                req.num_tokens += len(d.token_ids)
                kv = d.kv_params or kv
                if d.finished:
                    reason = d.finish_reason
                if req.conn is not None and (d.token_ids or d.finished):
                    event = {"rid": req.rid, "tokens": d.token_ids, "finished": d.finished,
                             "reason": d.finish_reason, "stop_reason": plain_stop_reason(d.stop_reason)}
                    if d.logprobs is not None:
                        event["logprobs"] = d.logprobs
                    if req.stopping and d.finished:  # a stop's end or a real one: the seal tells
                        req.held_back.append(event)
                    else:
                        await req.conn.push_batched("out", **event)
        except asyncio.CancelledError:
            reason = "abort"
        except Exception as e:  # engine error: report it as this request's end
            reason = "error"
            if self._check_engine():  # the agent goes down; controllers fail it over
                logger.warning("request %s lost with the engine", req.rid)
            elif req.conn is not None and not req.stopping:
                logger.exception("request %s failed", req.rid)
                await req.conn.push("out", rid=req.rid, tokens=[], finished=True, reason="error",
                                    error=str(e))
        finally:
            req.finished = True
            req.result = {"reason": reason, "kv": kv, "num_tokens": req.num_tokens}
            req.done.set()

    async def rpc_abort(self, conn: Connection, rid: str) -> bool:
        req = self.reqs.get(rid)
        if req is None or req.finished:
            return False
        await self.rt.abort(rid)
        return True

    async def rpc_inject_fault(self, conn: Connection, kind: str, seconds: float = 0.0) -> bool:
        """Stress testing only: this engine's next KV pull fails mid-transfer
        ("drop", or "stall" for `seconds` first); "clear" disarms. Returns True
        when a fault armed earlier had not fired."""
        return bool(await self.rt.rpc("llumigrate_fault", kind, float(seconds)))

    # -- migration: destination side -------------------------------------------------
    async def rpc_precopy(self, conn: Connection, key: str, tokens: list[int], load: dict,
                          timeout: float = 30.0) -> dict:
        """Run a carrier request that loads `load.num_tokens` positions of
        `tokens` into this engine's prefix cache. Returns {hit, loaded, failed}."""
        spec = LoadSpec.from_wire(load)
        if len(tokens) <= spec.num_tokens:
            raise ValueError("a carrier needs at least one token beyond the loaded positions")
        tag = RequestTag(key, spec)
        sp = sampling_params({"max_tokens": 1, "temperature": 0.0}, tag, stream=False)
        req = _Req(key, None)
        self.reqs[key] = req
        req.task = asyncio.get_running_loop().create_task(self._stream(req, tokens, sp, 0))
        try:
            await asyncio.wait_for(asyncio.shield(req.done.wait()), timeout)
        except asyncio.TimeoutError:
            await self.rt.abort(key)
            raise MigrationAborted("pre-copy stage timed out", "precopy") from None
        finally:
            self.reqs.pop(key, None)
        kv = (req.result or {}).get("kv") or {}
        if req.result and req.result["reason"] in ("abort", "error") or kv.get("failed"):
            raise MigrationAborted(f"pre-copy load failed ({req.result and req.result['reason']})",
                                   "precopy")
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


def _engine_errored(rt: EngineRuntime) -> bool:
    """True once the engine's processes died (AsyncLLM marks itself errored)."""
    return bool(getattr(getattr(rt, "llm", None), "errored", False))
