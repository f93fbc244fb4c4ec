"""`Migrator`: keeps migrations going while the load runs: random moves
(chains A->B->C and back included: requests that already moved are picked
first half the time) and, every `policy_every`-th round, the moves the
global scheduler's policies plan over the live cluster's snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter

from llumigrate.controller.cluster import Cluster
from llumigrate.controller.coordinator import MigrationResult
from llumigrate.errors import InstanceLost, InstanceNotFound, MigrationRefused, RequestNotFound
from llumigrate.scheduler import MigrationHistory, SchedulerConfig, plan_migrations
from llumigrate.serve.snapshots import cluster_snapshot
from llumigrate.stress.actions import ClusterFaults
from llumigrate.stress.config import StressConfig
from llumigrate.stress.faults import FaultInjector

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 2
# The scheduler's policies, eager: with a few requests on a few hundred blocks
# every instance is "free" by the default thresholds and nothing is planned;
# here an instance with two or more running requests sheds load to one with
# at most one (freeness is free blocks per running request).
POLICY = SchedulerConfig(migrate_out_threshold=150.0, migrate_in_threshold=250.0,
                         cooldown_s=2.0, no_return_s=5.0)


class Migrator:
    def __init__(self, cluster: Cluster, cfg: StressConfig, injector: FaultInjector,
                 faults: ClusterFaults) -> None:
        self.cluster, self.cfg, self.injector, self.faults = cluster, cfg, injector, faults
        self.rng = random.Random(f"migrate-{cfg.seed}")
        self.results: list[MigrationResult] = []
        self.refused: Counter[str] = Counter()
        self.started: Counter[str] = Counter()       # by trigger: random | policy:<reason>
        self.history = MigrationHistory()
        self._tasks: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Migrate until `stop` is set, then wait for the migrations in flight."""
        rounds = 0
        while not stop.is_set():
            rounds += 1
            policy = self.cfg.policy_every and rounds % self.cfg.policy_every == 0
            for rid, dst, why in self._policy_plans() if policy else self._random_plan():
                if len(self._tasks) >= MAX_IN_FLIGHT:
                    break
                self._start(rid, dst, why)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.migrate_interval_s)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, rid: str, dst: str, why: str) -> None:
        self.started[why] += 1
        task = asyncio.ensure_future(self._migrate(rid, dst))
        task.set_name(rid)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _candidates(self) -> list:
        live = {i.instance_id for i in self.cluster.instances.values() if i.up}
        busy = {t.get_name() for t in self._tasks}
        return [h for h in self.cluster.requests.values()
                if h.request_id.startswith("stress-") and not h.finished and not h.migrating
                and h.instance_id in live and h.request_id not in busy]

    def _random_plan(self) -> list[tuple[str, str, str]]:
        cands = self._candidates()
        if not cands:
            return []
        moved = [h for h in cands if h.num_migrations > 0]
        h = self.rng.choice(moved if moved and self.rng.random() < 0.5 else cands)
        dsts = sorted(i.instance_id for i in self.cluster.instances.values()
                      if i.up and not i.draining and i.instance_id != h.instance_id)
        return [(h.request_id, self.rng.choice(dsts), "random")] if dsts else []

    def _policy_plans(self) -> list[tuple[str, str, str]]:
        now = asyncio.get_running_loop().time()
        ok = {h.request_id for h in self._candidates()}
        plans = plan_migrations(cluster_snapshot(self.cluster, now), POLICY, self.history.prune(now, 60))
        return [(p.request_id, p.destination, f"policy:{p.reason}") for p in plans
                if p.request_id in ok]

    async def _migrate(self, rid: str, dst: str) -> None:
        result = None
        try:
            result = await self.cluster.migrate(rid, dst)
            self.results.append(result)
            if result.committed:
                self.history = self.history.record(rid, result.source, dst,
                                                   asyncio.get_running_loop().time())
        except (MigrationRefused, InstanceLost, InstanceNotFound, RequestNotFound) as e:
            self.refused[type(e).__name__] += 1
        except Exception:
            logger.exception("migration of %s to %s raised", rid, dst)
            self.refused["crashed"] += 1
        finally:
            fired = await self.faults.migration_done(rid)
            outcome = f"{result.state}: {result.reason}" if result else "refused"
            await self.injector.finished(rid, outcome, fired)
