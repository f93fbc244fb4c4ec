"""The source side of a migration, as agent RPC verbs: `track` (the engine
will hold the request's blocks if it is aborted), `stop` (abort it and return
its sealed state), `release` (free the held blocks), and how the agent learns
the engine's answers: pushed over the notify socket, with polling as the
fallback. Mixed into `Agent`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from llumigrate.agent.request import AgentRequest
from llumigrate.agent.rpc import Connection
from llumigrate.engine.commands import CommandClient
from llumigrate.engine.notify import NotifyListener
from llumigrate.engine.params import SealedRequest
from llumigrate.engine.vllm_api import EngineCoreOutput, finished_output, strip_end
from llumigrate.errors import MigrationAborted

logger = logging.getLogger(__name__)

# Fallback poll period of engine state the engine also pushes (engine/notify.py).
POLL_S = 0.02
# How long a request capped to stop at its next step may take to end before
# it is aborted instead (a step is 10-100 ms; vLLM may have preempted it).
STOP_AT_STEP_S = 2.0
# How long a stopped request's stream may take to deliver the engine's last
# step (normally it is there before the sealed record): past it, the tokens
# are recovered from the record, without logprobs.
CATCH_UP_S = 1.0


class SourceVerbs:
    rt: Any
    reqs: dict[str, AgentRequest]
    notify: NotifyListener | None
    commands: CommandClient | None

    def _live(self, rid: str) -> AgentRequest:
        raise NotImplementedError

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
        finished before the stop took effect.

        A running request is stopped at a step boundary: the scheduler caps it
        to finish once its next token is sampled (the `stop` command), so its
        tokens keep streaming to the client until then and none is thrown
        away. One that is not running, or that the cap has not ended within
        STOP_AT_STEP_S, is aborted in the engine core. Either way the engine
        holds its blocks and pushes the sealed record; once the stream has
        caught up with it, the stream is ended and its last tokens go to the
        client before this reply."""
        req = self._live(rid)
        req.stopping = True  # from now the stream's end is withheld until the seal says what it was
        try:
            return await self._stop(req, timeout)
        finally:
            req.stopping = False
            self.reqs.pop(rid, None)

    async def _stop(self, req: AgentRequest, timeout: float) -> dict:
        rid = req.rid
        capped = await self._stop_at_step(rid)
        if not capped:
            await self._abort_in_engine(req)
        sealed = asyncio.ensure_future(self._sealed(rid, timeout + (STOP_AT_STEP_S if capped else 0)))
        if not await self._wait_first(sealed, req, STOP_AT_STEP_S if capped else timeout) and capped:
            # Capped but not ended (say, vLLM preempted it meanwhile): abort it.
            await self._abort_in_engine(req)
            await self._wait_first(sealed, req, timeout)
        reason = req.reason
        # NOTE: a capped request ends as "length" before its seal arrives: only
        # the seal tells that from a real end.
        if not sealed.done() and reason not in (None, "abort") and not (capped and reason == "length"):
            # It finished for real before the stop landed: deliver what was
            # withheld, and tell the controller there is nothing to migrate.
            sealed.cancel()
            await self._deliver_withheld(req)
            return {"finished": reason}
        try:
            res = await sealed
        except BaseException:
            await self._end_stream(req, None, timeout)
            raise
        await self._end_stream(req, res, timeout)
        if "finished" in res:  # it finished for real in the step the stop reached
            await self._deliver_withheld(req, res)
            return {"finished": res["finished"]}
        await self._deliver_tokens(req, res["sealed"])
        return {**res, "stopped_by": "step" if capped and req.engine_aborts == 0 else "abort"}

    async def _stop_at_step(self, rid: str) -> bool:
        """Ask the scheduler to end `rid` after its next token; False if it
        could not (not running, or no command channel)."""
        if self.commands is None:
            return False
        reply = await self.commands.call({"kind": "stop", "key": rid})
        return bool(reply and reply.get("capped"))

    async def _abort_in_engine(self, req: AgentRequest) -> None:
        """Abort in the engine core: its scheduler holds the blocks of a
        tracked request and seals it; no output comes for it after."""
        req.engine_aborts += 1
        await self.rt.abort([req.rid])

    @staticmethod
    async def _wait_first(sealed: asyncio.Future, req: AgentRequest, timeout: float) -> bool:
        """Wait for the seal or the stream's end; False if neither came."""
        done = asyncio.ensure_future(req.done.wait())
        try:
            finished, _ = await asyncio.wait({sealed, done}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
        return bool(finished)

    async def _end_stream(self, req: AgentRequest, res: dict | None, timeout: float) -> None:
        """Let the outputs catch up with the engine's record `res` (bounded:
        tokens they miss are recovered from the record, without logprobs),
        then end the request here (the engine already ended it)."""
        if res is not None and not req.finished:
            record = res.get("sealed") or res
            want = len(record["tokens"]) - int(record["num_prompt_tokens"]) - req.num_restored
            deadline = asyncio.get_running_loop().time() + min(timeout, CATCH_UP_S)
            while req.num_tokens < want and not req.finished and \
                    asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.002)
        if res is None and not req.finished:  # no seal: make sure the engine ends it
            await self.rt.abort([req.rid])
        req.finish("abort")

    async def _deliver_tokens(self, req: AgentRequest, sealed: dict | None = None) -> None:
        """A stopped request's withheld tokens (not its end) go to the client,
        then any of the `sealed` record's the outputs did not carry (without
        logprobs; normally none): the client has every sealed token before
        the stop's reply."""
        req.stopping = False
        outs = [(strip_end(o), pos) for o, pos in req.held_back if o.new_token_ids]
        if sealed is not None:
            tail = sealed["tokens"][int(sealed["num_prompt_tokens"]) + req.num_restored + req.num_tokens:]
            if tail:
                logger.warning("%s: %d token(s) of the stopped request recovered from its record",
                               req.rid, len(tail))
                outs.append((EngineCoreOutput(request_id=req.rid, new_token_ids=list(tail)),
                             req.num_restored + req.num_tokens))
                req.num_tokens += len(tail)
        await self.push_outputs(req, outs)

    async def _deliver_withheld(self, req: AgentRequest, final: dict | None = None) -> None:
        """Send the client the outputs withheld while stopping. With `final`
        (the engine's record of a request that finished as it was stopped),
        the withheld tokens, then the ones the outputs missed, and the finish."""
        if final is not None:
            await self._deliver_tokens(req)
            tail = final["tokens"][final["num_prompt_tokens"] + req.num_restored + req.num_tokens:]
            await self.push_outputs(req, [(finished_output(req.rid, tail, final["finished"],
                                                           final.get("stop_reason")),
                                           req.num_restored + req.num_tokens)])
            return
        req.stopping = False
        await self.push_outputs(req, req.held_back)

    async def push_outputs(self, req: AgentRequest, outputs: list) -> None:
        raise NotImplementedError

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
