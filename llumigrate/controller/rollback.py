"""How a failed migration is undone (the steps of `Migration.on_failure`'s
actions): before the stop, cancel on the source; after it, continue the
request on the source from its own held blocks, or hand it to failover when
nothing exact is left to resume from. Mixed into `Coordinator`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from llumigrate.controller.instance import Instance
from llumigrate.controller.request import RequestHandle
from llumigrate.controller.hops import add_hop
from llumigrate.engine.params import LoadSpec, SealedRequest
from llumigrate.errors import MigrationAborted
from llumigrate.migration.protocol import Action, Migration

logger = logging.getLogger(__name__)


class RollbackSteps:
    req: RequestHandle
    src: Instance
    dst: Instance
    m: Migration
    old_rid: str
    new_rid: str
    sealed: SealedRequest | None
    on_hop: Callable[..., None]
    on_source_lost: Callable[[RequestHandle], Awaitable[bool]] | None

    def _load(self, src_key: str, num_tokens: int, *, final: bool) -> LoadSpec:
        raise NotImplementedError

    async def _rollback(self, action: Action) -> None:
        if action is Action.CANCEL:
            await self._untrack_source()
            return
        if action is not Action.RESUME_SOURCE:
            return
        # The source request is stopped and its blocks are held there. Undo any
        # destination hop and continue it on the source from its own blocks.
        req = self.req
        if req.abort_requested:  # the client is gone: free everything instead
            for inst, verb, rid in ((self.dst, "abort", self.new_rid),
                                    (self.src, "release", self.old_rid)):
                try:
                    await inst.call(verb, rpc_timeout=5, rid=rid)
                except Exception:
                    pass
            req.finish("abort")
            self.m.on_resumed()
            return
        if req.hop > 0 and req.engine_rid == self.new_rid:
            try:
                await self.dst.call("abort", rpc_timeout=5, rid=self.new_rid)
            except Exception:
                pass
        try:
            await self._resume_on_source()
        except Exception as e:
            if await self._replay_elsewhere(e):
                self.m.on_resumed()
                return
            logger.error("could not resume %s on its source: %s", req.request_id, e)
            req.finish("error", error=f"migration rollback failed: {e}")
            try:
                await self.src.call("release", rpc_timeout=5, rid=self.old_rid)
            except Exception:
                pass
        self.m.on_resumed()

    async def _untrack_source(self) -> None:
        """Untrack the request on the source, and free the hold its engine
        made if the request was aborted (a client abort) meanwhile."""
        for verb in ("untrack", "release"):
            try:
                await self.src.call(verb, rpc_timeout=5, rid=self.old_rid)
            except Exception as e:  # the source may be the thing that failed
                logger.info("%s of %s on the source failed: %s", verb, self.old_rid, e)

    async def _replay_elsewhere(self, error: Exception) -> bool:
        """The stopped request cannot resume from its held blocks: its source
        died, the stop never sealed it (nothing exact to resume from), or the
        resumed hop failed (its hold was gone: the destination's final pull had
        freed it). Hand it to failover (token replay on another instance, or
        on the source itself when no other is up); True if it took it."""
        if self.on_source_lost is None:
            return False
        if self.src.up:  # make sure nothing of the stopped or resumed hop lives on or stays held
            resumed = self.req.engine_rid if self.req.instance_id == self.src.instance_id else None
            for verb, rid in (("abort", self.old_rid), ("release", self.old_rid), ("abort", resumed)):
                if rid is None:
                    continue
                try:
                    await self.src.call(verb, rpc_timeout=5, rid=rid)
                except Exception:
                    pass
        if not await self.on_source_lost(self.req):
            return False
        logger.warning("%s could not resume on %s (%s); failed over by replay", self.req.request_id,
                       self.src.instance_id, error)
        return True

    async def _resume_on_source(self) -> None:
        req = self.req
        sealed = self.sealed
        if sealed is None:  # the stop never sealed: there is nothing exact to resume from
            raise MigrationAborted("source request was stopped but never sealed", "stopping")
        # Continue from the sealed list. The client may be ahead of it (the
        # hop was a failover replay that had not caught up with what was
        # streamed): the resumed hop reproduces those tokens, which are checked
        # and not sent again, never dropped from the request's record.
        outputs = sealed.tokens[len(req.prompt_token_ids):]
        # NOTE: the stop delivered every sealed token before it returned
        # (`agent/source.py`); the client may be ahead of the seal still.
        assert sealed.tokens[:len(req.all_token_ids)] == req.all_token_ids[:len(sealed.tokens)]
        skip = list(req.output_token_ids[len(outputs):])
        n_before = len(req.output_token_ids)
        self.on_hop(req, self.src, req.hop + 1)  # a fresh hop id, never reused
        # Like a commit: a hop that fails before its first token (say, its
        # KV load found the hold gone) is reported here, not to the client.
        req.committing = True
        try:
            await add_hop(self.src, req, req.engine_rid, outputs=outputs, skip=skip, rpc_timeout=30,
                          load=self._load(self.old_rid, sealed.num_kv_tokens, final=True),
                          generator_state=sealed.generator_state)
            await self._release_after_resume(n_before)
        finally:
            req.committing = False
        if req.hop_error is not None and len(req.output_token_ids) == n_before:
            raise MigrationAborted(f"the resumed request failed on the source: {req.hop_error}",
                                   "rolling_back")

    async def _release_after_resume(self, n_before: int) -> None:
        """Free the hold once the resumed hop stands on its own. Its final pull
        releases the hold, but no pull runs when the source's prefix cache
        already has every position (the held blocks are cached there): then
        only this release frees them (seen under the stress test: a hold left
        until its lease). NOTE: not before the hop's first token: until then a
        final pull may still be reading the held blocks."""
        try:
            await self.req.wait_tokens(n_before + 1, timeout=self.m.timeout_for())
        except asyncio.TimeoutError:
            logger.warning("resumed %s has no token yet; its hold's lease will free it", self.old_rid)
            return
        try:
            await self.src.call("release", rpc_timeout=5, rid=self.old_rid)
        except Exception as e:
            logger.info("release of %s after resume: %s", self.old_rid, e)
