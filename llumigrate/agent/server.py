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
from dataclasses import dataclass, field
from typing import Any

from llumigrate.agent.rpc import Connection, RpcServer
from llumigrate.engine.params import LoadSpec, RequestTag
from llumigrate.engine.runtime import EngineRuntime, sampling_params
from llumigrate.errors import MigrationAborted, RequestNotFound

logger = logging.getLogger(__name__)

POLL_S = 0.002


@dataclass
class _Req:
    rid: str
    conn: Connection | None
    task: asyncio.Task | None = None
    stopping: bool = False
    finished: bool = False
    num_tokens: int = 0
    held_back: list[dict] = field(default_factory=list)  # events withheld while stopping
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: dict | None = None


class Agent:
    def __init__(self, instance_id: str, runtime: EngineRuntime) -> None:
        self.instance_id = instance_id
        self.rt = runtime
        self.kv: dict = {}
        self.reqs: dict[str, _Req] = {}
        self.started = time.time()
        self.shutdown_event = asyncio.Event()  # set by the `shutdown` RPC
        self.server = RpcServer({name[4:]: getattr(self, name) for name in dir(self)
                                 if name.startswith("rpc_")})

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.kv = await self.rt.rpc("llumigrate_attach")
        return await self.server.start(host, port)

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
                             "reason": d.finish_reason, "stop_reason": _plain(d.stop_reason)}
                    if req.stopping:
                        req.held_back.append(event)
                    else:
                        await req.conn.push("out", **event)
        except asyncio.CancelledError:
            reason = "abort"
        except Exception as e:  # engine error: report it as this request's end
            logger.exception("request %s failed", req.rid)
            reason = "error"
            if req.conn is not None and not req.stopping:
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

    # -- migration: source side ---------------------------------------------------
    async def rpc_track(self, conn: Connection, rid: str, timeout: float = 5.0) -> bool:
        """Prepare `rid` to be stopped: returns once the engine will hold its
        blocks on abort."""
        self._live(rid)
        deadline = time.monotonic() + timeout
        while not await self.rt.rpc("llumigrate_track", rid):
            if time.monotonic() > deadline:
                raise MigrationAborted("engine did not acknowledge tracking", "reserving")
            await asyncio.sleep(POLL_S)
        return True

    async def rpc_untrack(self, conn: Connection, rid: str) -> None:
        await self.rt.rpc("llumigrate_untrack", rid)

    async def rpc_stop(self, conn: Connection, rid: str, timeout: float = 5.0) -> dict:
        """Stop `rid` and return its sealed state, or {"finished": reason} if it
        finished before the stop took effect."""
        req = self._live(rid)
        req.stopping = True
        await self.rt.abort(rid)
        await asyncio.wait_for(req.done.wait(), timeout)
        reason = req.result["reason"] if req.result else None
        if reason not in (None, "abort"):
            # It finished for real before the abort landed: deliver what was
            # withheld, and tell the controller there is nothing to migrate.
            req.stopping = False
            if req.conn is not None:
                for event in req.held_back:
                    await req.conn.push("out", **event)
            return {"finished": reason}
        deadline = time.monotonic() + timeout
        while (sealed := await self.rt.rpc("llumigrate_sealed", rid)) is None:
            if time.monotonic() > deadline:
                raise MigrationAborted("source did not seal the request", "stopping")
            await asyncio.sleep(POLL_S)
        return {"sealed": sealed}

    async def rpc_release(self, conn: Connection, rid: str) -> bool:
        return bool(await self.rt.rpc("llumigrate_release", rid))

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


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, str)) else str(value)
