"""`Collector`: the facts the invariants are checked over, gathered after the
load phase (quiescence, free blocks, reference outputs) and after shutdown
(shared-memory segments, processes left)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from llumigrate import procfs
from llumigrate.controller import shmreap
from llumigrate.stress.invariants import NORMAL_ENDS, InstanceFacts, RequestFacts, Violation, check_instance
from llumigrate.transfer import shm

if TYPE_CHECKING:
    from llumigrate.stress.runner import StressRunner

logger = logging.getLogger(__name__)

RESPAWN_WAIT_S = 300.0
REFERENCE_TIMEOUT_S = 600.0
ORPHAN_GRACE_S = 10.0


class Collector:
    def __init__(self, runner: StressRunner) -> None:
        self.r = runner
        self.cluster = runner.cluster
        self.references_by_id: dict[str, list[int]] = {}
        self.engine_shm_before = shmreap.engine_files()

    def _live(self) -> list:
        return sorted((i for i in self.cluster.instances.values() if i.up), key=lambda i: i.instance_id)

    # -- after the load ------------------------------------------------------------
    async def settle(self) -> list[InstanceFacts]:
        """Wait for replacements and quiescence; each surviving instance's facts."""
        await self.r.faults.wait_respawns(RESPAWN_WAIT_S)
        self.r.injector.enabled = False
        if self.r.cfg.plant_defect == "leak-block":
            await self._plant_leak()
        await self._quiesce()
        baseline = self.r.listener.baseline
        deadline = time.monotonic() + 10 * self.r.cfg.settle_s
        await asyncio.sleep(self.r.cfg.settle_s)
        while time.monotonic() < deadline and any(
                i.load.get("free_blocks") != baseline.get(i.instance_id) for i in self._live()):
            await asyncio.sleep(0.2)
        facts = []
        for inst in self._live():
            try:
                status = await inst.call("status", rpc_timeout=30)
                free, held = int(status["load"]["free_blocks"]), list(status["worker"]["held"])
            except Exception as e:
                logger.error("status of %s: %s", inst.instance_id, e)
                free, held = None, []
            facts.append(InstanceFacts(inst.instance_id, baseline.get(inst.instance_id, -1), free, held))
        return facts

    async def _quiesce(self) -> None:
        deadline = time.monotonic() + self.r.cfg.quiesce_timeout_s
        while time.monotonic() < deadline:
            busy = [i.instance_id for i in self._live()
                    if i.load.get("num_running", 0) or i.load.get("num_waiting", 0)]
            if not busy and all(h.finished for h in self.cluster.requests.values()):
                return
            await asyncio.sleep(0.2)
        logger.warning("cluster not quiescent after %.0fs", self.r.cfg.quiesce_timeout_s)

    async def _plant_leak(self, name: str = "planted-leak") -> tuple:
        """Self-test defect: hold a stopped request's blocks and never release
        them. Returns (instance, engine request id) of the hold."""
        inst = self._live()[0]
        h = await self.cluster.submit(list(range(40, 140)), {"max_tokens": 2000, "temperature": 0.0,
                                                             "ignore_eos": True},
                                      instance=inst.instance_id, request_id=name)
        await h.wait_tokens(2, 120)
        await inst.call("track", rid=h.engine_rid)
        await self.cluster.abort(h.request_id)
        await h.wait(60)
        return inst, h.engine_rid

    async def self_test_leak(self) -> list[Violation]:
        """Plant a leaked block on a real engine and check the instances again:
        the violations the checker reports (must not be empty). The hold is
        released afterwards, so the run's own facts are not affected."""
        inst, rid = await self._plant_leak("self-test-leak")
        await asyncio.sleep(self.r.cfg.settle_s)
        status = await inst.call("status", rpc_timeout=30)
        found = check_instance(InstanceFacts(inst.instance_id, self.r.listener.baseline[inst.instance_id],
                                             int(status["load"]["free_blocks"]),
                                             list(status["worker"]["held"])))
        await inst.call("release", rpc_timeout=30, rid=rid)
        await self._quiesce()
        return found

    async def references(self) -> None:
        """Every deterministic request once more, no migration, each on one instance."""
        live = self._live()
        specs = [s for s in self.r.workload.specs if s.deterministic]
        if not live or not specs:
            return
        handles = []
        for k, s in enumerate(specs):
            handles.append((s, await self.cluster.submit(
                list(s.prompt), dict(s.sampling), instance=live[k % len(live)].instance_id,
                priority=s.priority, request_id=f"ref-{s.index}")))
        await asyncio.wait([asyncio.ensure_future(h.wait()) for _, h in handles],
                           timeout=REFERENCE_TIMEOUT_S)
        for s, h in handles:
            if h.finished and h.finish_reason in NORMAL_ENDS:
                self.references_by_id[s.request_id] = list(h.output_token_ids)
            else:
                logger.error("reference of %s ended %s: %s", s.request_id, h.finish_reason, h.error)

    # -- facts ----------------------------------------------------------------------
    def request_facts(self) -> list[RequestFacts]:
        out = []
        for rid, facts in self.r.facts.items():
            h = self.r.handles.get(rid)
            if h is not None:
                facts.output = list(h.output_token_ids)
                facts.finish_reason, facts.error = h.finish_reason, h.error
                facts.migrations, facts.failovers = h.num_migrations, h.num_failovers
            facts.finish_count = self.r.listener.finishes[rid]
            facts.client_aborted = rid in self.r.faults.client_aborted
            facts.reference = self.references_by_id.get(rid)
            out.append(facts)
        if self.r.cfg.plant_defect == "dup-token":
            plant_duplicate(out)
        return out

    def host_leftovers(self) -> tuple[list[str], list[int]]:
        """(shared memory left: our segments and the engines', our processes
        still alive), after close. Processes get `ORPHAN_GRACE_S` to finish
        exiting (a killed process is visible for a moment while the kernel
        tears it down)."""
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while True:
            orphans = sorted(set(procfs.group_members(self.r.pgids)) | set(procfs.alive(self.r.pids)))
            if not orphans or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        leaked = [s for s in shm.list_segments() if shm.segment_pid(s) in self.r.pids]
        # The engines' own (vLLM's queues), killed ones' included: none may stay.
        leaked += sorted(os.path.basename(p) for p in shmreap.left_behind(self.engine_shm_before))
        return leaked, orphans


def plant_duplicate(facts: list[RequestFacts]) -> str | None:
    """Self-test defect: repeat one token in one recorded stream. Returns its request id."""
    for f in facts:
        tokens = f.streamed if f.streaming else f.output
        if len(tokens) >= 2:
            tokens.insert(1, tokens[0])
            return f.request_id
    return None
