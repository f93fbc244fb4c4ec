"""`StressRunner`: one stress run against a real cluster.

1. Start `num_instances` agents (each its own process group).
2. Load: keep `concurrency` clients going (streaming or not) over the seeded
   mix while the `Migrator` migrates and the `FaultInjector` breaks
   migrations; killed instances are replaced (`respawn`).
3. Collect: wait for replacements, quiescence, then compare every surviving
   instance's free blocks with its baseline; run every deterministic request
   again without migration for its reference output.
4. Close the cluster; look for shared-memory segments and processes left.
5. `check_all` over what was recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from llumigrate.controller.cluster import Cluster
from llumigrate.controller.coordinator import MigrationResult
from llumigrate.controller.instance import Instance
from llumigrate.controller.listener import ClusterListener
from llumigrate.controller.request import RequestHandle
from llumigrate.errors import InstanceLost
from llumigrate.migration.protocol import MigrationConfig
from llumigrate import procfs
from llumigrate.stress.actions import ClusterFaults
from llumigrate.stress.collect import Collector
from llumigrate.stress.config import StressConfig
from llumigrate.stress.faults import FaultInjector, FaultRecord, FaultSchedule
from llumigrate.stress.invariants import InstanceFacts, RequestFacts, Violation, check_all
from llumigrate.stress.migrator import Migrator
from llumigrate.stress.progress import Progress
from llumigrate.stress.workload import RequestSpec, Workload

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 600.0
SUBMIT_RETRY_S = 60.0


class StressListener(ClusterListener):
    """Counts what the cluster reports: finishes, instances lost, failovers."""

    def __init__(self) -> None:
        self.finishes: Counter[str] = Counter()
        self.downs: list[tuple[str, str]] = []
        self.failovers: list[tuple[str, str, str]] = []
        self.baseline: dict[str, int] = {}

    def on_instance_up(self, instance_id: str, info: dict) -> None:
        load = info.get("load") or {}
        self.baseline[instance_id] = int(load.get("free_blocks") or load.get("num_blocks") or 0)

    def on_instance_down(self, instance_id: str, reason: str) -> None:
        self.downs.append((instance_id, reason))

    def on_failover(self, handle: RequestHandle, source: str, destination: str) -> None:
        self.failovers.append((handle.request_id, source, destination))

    def on_finished(self, handle: RequestHandle) -> None:
        self.finishes[handle.request_id] += 1


@dataclass
class StressResult:
    config: StressConfig
    requests: list[RequestFacts]
    instances: list[InstanceFacts]
    violations: list[Violation]
    migrations: list[MigrationResult]
    refused: dict[str, int]
    started: dict[str, int]
    faults: list[FaultRecord]
    instances_down: list[tuple[str, str]]
    failovers: int
    respawned: list[str]
    duration_s: float
    leaked_segments: list[str] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)
    # What the checker reported for a block leaked on purpose (cfg.self_test).
    self_test: list[Violation] = field(default_factory=list)


class StressRunner:
    def __init__(self, cfg: StressConfig, model: str) -> None:
        self.cfg = cfg
        self.listener = StressListener()
        mig = MigrationConfig(stage_timeout_s=cfg.stage_timeout_s, commit_timeout_s=cfg.stage_timeout_s,
                              stop_timeout_s=cfg.stop_timeout_s, reserve_timeout_s=cfg.stop_timeout_s)
        self.cluster = Cluster(model, cfg.num_instances, list(cfg.engine_args), migration=mig,
                               failover=cfg.failover, listener=self.listener)
        self.faults = ClusterFaults(self.cluster, cfg, self._on_spawned)
        self.injector = FaultInjector(FaultSchedule(cfg.seed, cfg.faults, cfg.fault_rate), self.faults)
        self.cluster.fault = self.injector
        self.migrator = Migrator(self.cluster, cfg, self.injector, self.faults)
        self.workload = Workload(cfg.seed)
        self.facts: dict[str, RequestFacts] = {}
        self.handles: dict[str, RequestHandle] = {}
        self.hung: list[str] = []
        self.pgids: set[int] = set()
        self.pids: set[int] = set()
        self.respawned: list[str] = []
        self.progress = Progress(self) if cfg.progress else None
        self.self_test: list[Violation] = []

    async def run(self) -> StressResult:
        t0 = time.monotonic()
        collector = Collector(self)
        try:
            await self.cluster.start()
            for inst in self.cluster.instances.values():
                self._remember(inst)
            if self.progress:
                self.progress.start()
            await self._load()
            instances = await collector.settle()
            if self.cfg.self_test:
                self.self_test = await collector.self_test_leak()
            await collector.references()
        finally:
            if self.progress:
                self.progress.stop()
            for inst in self.cluster.instances.values():
                self._remember(inst)
            await self.cluster.close()
        leaked, orphans = collector.host_leftovers()
        requests = collector.request_facts()
        missing = [k for k in self.cfg.faults if k not in {r.kind for r in self.injector.fired()}] \
            if self.cfg.require_all_faults else []
        violations = check_all(requests, instances, failover=self.cfg.failover,
                               leaked_segments=leaked, orphans=orphans, missing_faults=missing,
                               hung=self.hung)
        return StressResult(self.cfg, requests, instances, violations, self.migrator.results,
                            dict(self.migrator.refused), dict(self.migrator.started),
                            self.injector.records, list(self.listener.downs),
                            len(self.listener.failovers), self.respawned, time.monotonic() - t0,
                            leaked, orphans, self.self_test)

    # -- load phase ------------------------------------------------------------
    async def _load(self) -> None:
        stop = asyncio.Event()
        migrating = asyncio.ensure_future(self.migrator.run(stop))
        sem = asyncio.Semaphore(self.cfg.concurrency)
        clients: list[asyncio.Task] = []
        t0 = time.monotonic()
        while self._want_more(time.monotonic() - t0):
            await sem.acquire()
            task = asyncio.ensure_future(self._client(self.workload.next()))
            task.add_done_callback(lambda _: sem.release())
            clients.append(task)
        await asyncio.gather(*clients)
        stop.set()
        await migrating

    def _want_more(self, elapsed: float) -> bool:
        cfg, n = self.cfg, len(self.workload.specs)
        if elapsed >= cfg.max_duration_s:
            return False
        done = (cfg.num_requests and n >= cfg.num_requests) or (cfg.duration_s and elapsed >= cfg.duration_s)
        if done and cfg.require_all_faults:
            fired = {r.kind for r in self.injector.fired()}
            return any(k not in fired for k in cfg.faults)
        return not done

    async def _client(self, spec: RequestSpec) -> None:
        facts = RequestFacts(spec.request_id, spec.kind, spec.max_tokens, spec.streaming, [])
        self.facts[spec.request_id] = facts
        h = await self._submit(spec)
        if h is None:
            self.hung.append(spec.request_id)
            return
        self.handles[spec.request_id] = h
        try:
            await asyncio.wait_for(self._consume(h, facts), REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.hung.append(spec.request_id)

    async def _consume(self, h: RequestHandle, facts: RequestFacts) -> None:
        if not facts.streaming:
            await h.wait()
            return
        async for delta in h.stream():
            facts.streamed.extend(delta.token_ids)
            facts.final_deltas += delta.finished

    async def _submit(self, spec: RequestSpec) -> RequestHandle | None:
        deadline = time.monotonic() + SUBMIT_RETRY_S
        while time.monotonic() < deadline:
            try:
                return await self.cluster.submit(list(spec.prompt), dict(spec.sampling),
                                                 priority=spec.priority, request_id=spec.request_id)
            except InstanceLost as e:  # the chosen instance died under us: try another
                logger.info("submit of %s: %s", spec.request_id, e)
                await asyncio.sleep(0.5)
        return None

    # -- processes ---------------------------------------------------------------
    def _on_spawned(self, inst: Instance) -> None:
        self.respawned.append(inst.instance_id)
        self._remember(inst)

    def _remember(self, inst: Instance) -> None:
        if inst.process is not None:
            self.pgids.add(inst.process.pid)
            self.pids.update(procfs.group_members({inst.process.pid}))
