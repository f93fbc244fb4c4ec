"""Drives one migration through `migration.protocol.Migration` against two
agents. All waiting has deadlines; every failure goes through
`Migration.on_failure`, whose rollback leaves the request running on the
source (or finished there) and frees what was reserved."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from llumigrate.controller.instance import Instance
from llumigrate.controller.request import RequestHandle, hop_id
from llumigrate.controller.rollback import RollbackSteps
from llumigrate.controller.hops import add_hop, carrier_request
from llumigrate.engine.params import LoadSpec, SealedRequest
from llumigrate.errors import InstanceLost, LlumigrateError, MigrationAborted, MigrationRefused, RequestNotFound
from llumigrate.migration.faults import FaultContext, FaultHook, FaultPoint
from llumigrate.migration.protocol import Action, Migration, MigrationConfig, State

logger = logging.getLogger(__name__)


@dataclass
class MigrationResult:
    request_id: str
    source: str
    destination: str
    state: str
    reason: str = ""
    abort_stage: str = ""
    stages: int = 0
    blocks_per_stage: list[int] = field(default_factory=list)
    blocks_hit_at_commit: int = 0
    blocks_loaded_at_commit: int = 0
    context_tokens: int = 0
    # How the source stopped it: "step" (capped to end at a step boundary, no
    # sampled token lost) or "abort" (it was not running; or did not end in time).
    stopped_by: str = ""
    # Client-visible pause: the last token from the source (including tokens
    # recovered at the stop, which reach the client then) to the first token
    # from the destination.
    downtime_s: float | None = None
    # The longest gap between two deliveries from the last token before the
    # stop to the destination's first token (>= downtime_s; one engine step of
    # it is the source's ordinary step time).
    stall_s: float | None = None
    total_s: float = 0.0
    started_at: float = 0.0      # monotonic clock
    stopped_at: float | None = None
    phase_s: dict[str, float] = field(default_factory=dict)   # seconds spent per state
    # Seconds from the last source token to each downtime milestone (see Coordinator).
    downtime_marks: dict[str, float] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)

    @property
    def committed(self) -> bool:
        return self.state == State.DONE.value


class Coordinator(RollbackSteps):
    """`on_hop(req, instance, hop)` routes a new hop's events; `on_stage(name)`
    is told as each step starts; `fault` (tests and the stress harness only)
    is awaited before each step; `on_source_lost(req)` takes over a request
    whose source died after it was stopped (failover), instead of failing it."""

    def __init__(self, req: RequestHandle, src: Instance, dst: Instance,
                 config: MigrationConfig, on_hop: Callable[..., None], *,
                 on_stage: Callable[[str], None] | None = None, fault: FaultHook | None = None,
                 on_source_lost: Callable[[RequestHandle], Awaitable[bool]] | None = None) -> None:
        self.req, self.src, self.dst, self.config = req, src, dst, config
        self.m = Migration(config)
        self.on_hop = on_hop
        self.on_stage = on_stage
        self.fault = fault
        self.on_source_lost = on_source_lost
        self.result = MigrationResult(req.request_id, src.instance_id, dst.instance_id, "")
        self.sealed: SealedRequest | None = None
        self.old_rid = req.engine_rid
        self.new_rid = hop_id(req.request_id, req.hop + 1)
        self._marks: dict[str, float] = {}
        self._last_src_token_at: float | None = None
        self._before_stop_at: float | None = None

    async def run(self) -> MigrationResult:
        t0 = self.result.started_at = time.monotonic()
        try:
            await self._timed("reserve", self._reserve())
            await self._timed("precopy", self._precopy())
            if not self.m.state.terminal:
                await self._timed("stop", self._stop())
            if self.m.state is State.COMMITTING:
                await self._timed("commit", self._commit())
                await self._timed("release", self._release())
        except (MigrationRefused, InstanceLost, asyncio.TimeoutError, OSError) as e:
            await self._fail(e)
        except LlumigrateError as e:
            # The source no longer knows a request that just finished (track,
            # or a pre-copy pull, is refused); its final output may still be
            # on the way here. That is no failure of the migration.
            if self.m.state in (State.RESERVING, State.PRECOPY) and await self._finished_soon():
                await self._rollback(self.m.on_source_finished())
            else:
                await self._fail(e)
        r = self.result
        r.state, r.reason, r.abort_stage = self.m.state.value, self.m.abort_reason, self.m.abort_stage
        r.stages, r.total_s = self.m.stages_done, time.monotonic() - t0
        r.history = [s.value for s in self.m.history] + [self.m.state.value]
        return r

    async def _fail(self, e: BaseException) -> None:
        reason = str(e) or type(e).__name__
        logger.warning("migration of %s %s->%s failed in %s: %s", self.req.request_id,
                       self.src.instance_id, self.dst.instance_id, self.m.state.value, reason)
        await self._rollback(self.m.on_failure(reason))

    def _mark(self, name: str) -> None:
        self._marks[name] = time.monotonic()

    async def _inject(self, point: FaultPoint, stage: int = 0) -> None:
        if self.fault is not None:
            await self.fault(point, FaultContext(self.req.request_id, self.src.instance_id,
                                                 self.dst.instance_id, stage))

    async def _timed(self, name: str, coro) -> None:
        if self.on_stage is not None:
            self.on_stage(name)
        t = time.monotonic()
        try:
            await coro
        finally:
            self.result.phase_s[name] = time.monotonic() - t

    # -- steps -----------------------------------------------------------------
    async def _reserve(self) -> None:
        await self._inject(FaultPoint.BEFORE_RESERVE)
        info = await self.dst.call("info", rpc_timeout=self.m.timeout_for())
        bs = self.dst.block_size
        need = -(-(len(self.req.all_token_ids) + bs) // bs)
        free = int(info["load"]["free_blocks"])
        if free < need:
            raise MigrationRefused(
                f"{self.dst.instance_id} has {free} free blocks; request needs {need}")
        if len(self.req.all_token_ids) + 1 > int(info["max_model_len"]):
            raise MigrationRefused(f"request longer than {self.dst.instance_id}'s max_model_len")
        await self.src.call("track", rpc_timeout=self.m.timeout_for(), rid=self.old_rid)
        self.m.on_reserved()

    async def _precopy(self) -> None:
        bs = self.src.block_size
        while self.m.state is State.PRECOPY:
            if self.req.finished:
                await self._rollback(self.m.on_source_finished())
                return
            tokens = self.req.all_token_ids
            # NOTE: positions [0, len - 1) hold KV only once the prompt is fully
            # prefilled, i.e. once a token was sampled. Before that, pre-copying
            # could cache blocks that are not computed yet: go straight to the
            # stop, whose sealed state has the scheduler's exact computed count.
            full_blocks = (len(tokens) - 1) // bs if self.req.output_token_ids else 0
            action = self.m.next_action(full_blocks)
            if action is Action.STOP or self.config.recompute:
                self.m.on_stop_begin()
                return
            n = full_blocks * bs
            key = f"{self.new_rid}/pre{self.m.stages_done}"
            await self._inject(FaultPoint.PRECOPY, self.m.stages_done)
            timeout = self.m.timeout_for() + self.config.paced_copy_s(full_blocks * self.src.block_bytes)
            res = await self.dst.call(
                "precopy", rpc_timeout=timeout + 5, timeout=timeout,
                request=carrier_request(self.req, key, tokens[: n + 1], self._load(self.old_rid, n, final=False)))
            self.result.blocks_per_stage.append(int(res["loaded"]) // bs)
            logger.debug("%s pre-copy stage %d: %d blocks loaded, %d hit, %d output tokens",
                         self.req.request_id, self.m.stages_done, int(res["loaded"]) // bs,
                         int(res["hit"]) // bs, len(self.req.output_token_ids))
            self.m.on_stage_done(full_blocks)

    async def _finished_soon(self, grace_s: float = 0.5) -> bool:
        try:
            await self.req.wait(grace_s)
        except asyncio.TimeoutError:
            pass
        return self.req.finished

    async def _stop(self) -> None:
        req = self.req
        self.result.stopped_at = time.monotonic()
        self._mark("stop_sent")
        self._before_stop_at = req.last_token_at
        await self._inject(FaultPoint.STOP)
        try:
            res = await self.src.call("stop", rpc_timeout=self.m.timeout_for() + 2, rid=self.old_rid,
                                      timeout=self.m.timeout_for())
        except RequestNotFound:
            # The source no longer has it: it finished there after the last
            # check, or the client aborted it (its final output may still be
            # on the way). Nothing was stopped, so nothing is resumed; an
            # aborted tracked request is held by its engine: free that.
            if await self._finished_soon():
                await self._untrack_source()
                self.m.on_finished_before_stop()
                return
            raise
        if "finished" in res:  # it finished on the source before the stop landed
            self.m.on_finished_before_stop()
            return
        self.sealed = s = SealedRequest.from_wire(res["sealed"])
        self._mark("sealed")
        # NOTE: the source delivered every sealed token before its reply
        # (`agent/source.py`: the ones its outputs missed, from the record).
        # The client may be ahead of the seal (a seeded failover replay that
        # had not caught up): the next hop reproduces those tokens (`skip`).
        assert s.tokens[:len(req.all_token_ids)] == req.all_token_ids[:len(s.tokens)], \
            "sealed tokens differ from the delivered stream"
        self.result.stopped_by = str(res.get("stopped_by", ""))
        self._last_src_token_at = req.last_token_at
        self.result.context_tokens = len(s.tokens)
        self.m.on_stopped()

    async def _commit(self) -> None:
        s, req = self.sealed, self.req
        assert s is not None
        outputs = s.tokens[len(req.prompt_token_ids):]
        if req.max_tokens is not None and len(outputs) >= req.max_tokens:
            raise MigrationAborted("no tokens left to generate", "committing")
        if req.abort_requested:
            raise MigrationAborted("client aborted the request", "committing")
        n_before = len(req.output_token_ids)
        self.on_hop(req, self.dst, req.hop + 1)  # route the new hop's events from here on
        req.committing = True
        try:
            await self._inject(FaultPoint.COMMIT)
            self._mark("commit_sent")
            load = None if self.config.recompute else self._load(self.old_rid, s.num_kv_tokens, final=True)
            await add_hop(self.dst, req, self.new_rid, outputs=outputs, load=load,
                          generator_state=s.generator_state, rpc_timeout=self.m.timeout_for(),
                          skip=req.output_token_ids[len(outputs):])
            self._mark("commit_acked")
            if self.config.recompute:  # nothing will pull the held blocks
                await self.src.call("release", rpc_timeout=5, rid=self.old_rid)
            if req.abort_requested:  # aborted while the hop was being created
                await self.dst.call("abort", rpc_timeout=5, rid=self.new_rid)
            await self._first_token(n_before)
        finally:
            req.committing = False
        if req.hop_error is not None and len(req.output_token_ids) == n_before:
            raise MigrationAborted(f"destination failed the request: {req.hop_error}", "committing")
        if req.finished and req.finish_reason in ("error", "abort") and \
                len(req.output_token_ids) == n_before:
            raise MigrationAborted(f"destination failed the request ({req.finish_reason})",
                                   "committing")
        if req.last_token_at is not None and self._last_src_token_at is not None:
            self.result.downtime_s = req.last_token_at - self._last_src_token_at
            lo = self._before_stop_at if self._before_stop_at is not None else self._last_src_token_at
            times = [t for t in req.token_times if t >= lo]
            self.result.stall_s = max((b - a for a, b in zip(times, times[1:])), default=None)
            self._marks["first_token"] = req.last_token_at
            self.result.downtime_marks = {k: round(t - self._last_src_token_at, 6)
                                          for k, t in self._marks.items()}
        self.m.on_committed()

    async def _first_token(self, n_before: int) -> None:
        """Wait for the destination's first token (or the hop's end); fail
        early when the destination is lost meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.m.timeout_for()
        while True:
            try:
                await self.req.wait_tokens(n_before + 1, timeout=min(0.5, max(0.0, deadline - loop.time())))
                return
            except asyncio.TimeoutError:
                if not self.dst.up:
                    raise InstanceLost(f"destination {self.dst.instance_id} lost during commit") from None
                if loop.time() >= deadline:
                    raise

    async def _release(self) -> None:
        await self._inject(FaultPoint.RELEASE)
        try:
            await self.src.call("release", rpc_timeout=self.m.timeout_for(), rid=self.old_rid)
        except (LlumigrateError, asyncio.TimeoutError) as e:
            logger.warning("release of %s on %s failed (lease frees it): %s", self.old_rid,
                           self.src.instance_id, e)
        self.m.on_released()

    def _load(self, src_key: str, num_tokens: int, *, final: bool) -> LoadSpec:
        host, port = self.src.kv_address
        return LoadSpec(host, port, src_key, num_tokens, final,
                        0.0 if final else self.config.precopy_rate_mib_s)
