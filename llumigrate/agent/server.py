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
from llumigrate.engine.notify import NotifyListener
from llumigrate.engine.params import LoadSpec, RequestTag, SealedRequest, plain_stop_reason
from llumigrate.engine.runtime import EngineRuntime, sampling_params
from llumigrate.errors import MigrationAborted, RequestNotFound

logger = logging.getLogger(__name__)

# Fallback poll period of engine state the engine also pushes (engine/notify.py).
POLL_S = 0.02
# How often the agent checks that its engine is alive.
ENGINE_WATCH_S = 0.2
# Load reports: pushed to every controller this often while the engine steps,
# and at least every HEARTBEAT_S when it is idle.
REPORT_S = 0.1
HEARTBEAT_S = 1.0


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
    def __init__(self, instance_id: str, runtime: EngineRuntime,
                 notify: NotifyListener | None = None) -> None:
        self.instance_id = instance_id
        self.rt = runtime
        self.notify = notify
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
                    if req.stopping:
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

    # -- migration: source side ---------------------------------------------------
    async def rpc_track(self, conn: Connection, rid: str, timeout: float = 5.0) -> bool:
        """Prepare `rid` to be stopped: returns once the engine will hold its
        blocks on abort."""
        self._live(rid)
        if await self.rt.rpc("llumigrate_track", rid):
            return True

        async def polled() -> dict:
            while not await self.rt.rpc("llumigrate_track", rid):
                await asyncio.sleep(POLL_S)
            return {}
        pushed = None
        if self.notify is not None:
            notify = self.notify

            async def pushed() -> dict:
                return await notify.wait("tracked", rid, timeout)
        try:
            await self._first_of(polled, pushed, timeout, "engine did not acknowledge tracking",
                                 "reserving")
        finally:
            if self.notify is not None:
                self.notify.discard("tracked", rid)
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
            await self._deliver_withheld(req)
            return {"finished": reason}
        res = await self._sealed(rid, timeout)
        if "finished" in res:  # it finished for real in the step the abort reached
            await self._deliver_withheld(req, res)
            return {"finished": res["finished"]}
        return res

    async def _deliver_withheld(self, req: _Req, final: dict | None = None) -> None:
        """Send the client the events withheld while stopping. With `final`
        (the engine's record of a request that finished as it was stopped),
        also the tokens the abort kept from the output stream, and the finish."""
        req.stopping = False
        if req.conn is None:
            return
        for event in req.held_back:
            await req.conn.push("out", **(event if final is None else {**event, "finished": False}))
        if final is not None:
            tail = final["tokens"][final["num_prompt_tokens"] + req.num_tokens:]
            await req.conn.push("out", rid=req.rid, tokens=tail, finished=True,
                                reason=final["finished"], stop_reason=final.get("stop_reason"))

    async def _sealed(self, rid: str, timeout: float) -> dict:
        """{"sealed": record} of stopped `rid`, from the engine's pushes (the
        scheduler's `held`, plus the worker's `held_gen` for seeded requests)
        or from polling the worker if a push does not come; or {"finished":
        reason, "tokens", ...} when the engine finished it for real instead."""
        async def polled() -> dict:
            while (sealed := await self.rt.rpc("llumigrate_sealed", rid)) is None:
                await asyncio.sleep(POLL_S)
            return {"sealed": sealed}

        async def pushed() -> dict:
            assert self.notify is not None
            held = await self.notify.wait("held", rid, timeout)
            if held.get("finished"):
                return {"finished": str(held["finished"]), "stop_reason": held.get("stop_reason"),
                        "tokens": [int(t) for t in held["tokens"]],
                        "num_prompt_tokens": int(held["num_prompt_tokens"])}
            gen = None
            if held.get("seeded"):
                gen = (await self.notify.wait("held_gen", rid, timeout)).get("gen")
            sealed = SealedRequest(rid, [int(t) for t in held["tokens"]], int(held["num_prompt_tokens"]),
                                   int(held["num_computed_tokens"]), int(held["num_blocks"]), gen)
            return {"sealed": sealed.to_wire()}

        try:
            return await self._first_of(polled, pushed if self.notify is not None else None, timeout,
                                        "source did not seal the request", "stopping")
        finally:
            if self.notify is not None:
                self.notify.discard("held", rid)
                self.notify.discard("held_gen", rid)

    async def _first_of(self, polled, pushed, timeout: float, error: str, stage: str) -> dict:
        """Whichever answers first: the engine's push (`pushed`) or the `polled`
        fallback, which starts a little later so that pushes normally win."""
        async def late_poll() -> dict:
            if pushed is not None:
                await asyncio.sleep(0.1)
            return await polled()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = {asyncio.ensure_future(late_poll())}
        if pushed is not None:
            pending.add(asyncio.ensure_future(pushed()))
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()),
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                for t in done:
                    if t.exception() is None:
                        return t.result()
            raise MigrationAborted(error, stage)
        finally:
            for t in pending:
                t.cancel()

    async def rpc_release(self, conn: Connection, rid: str) -> bool:
        return bool(await self.rt.rpc("llumigrate_release", rid))

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
