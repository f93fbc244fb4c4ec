"""`GlobalScheduler`: dispatch and migration rounds over a live `Cluster`.

Dispatch: `choose()` asks the configured dispatcher over a fresh snapshot
(the new request counts as waiting demand at once, so a burst between two
load reports spreads out). Migration: every `interval_s`, `plan_migrations`
over a snapshot; each plan runs as its own task through `Cluster.migrate`;
outcomes feed the migration history (cooldown, no ping-pong) and the cost
model (which requests are cheapest to move). All policy logic is in the pure
`llumigrate.scheduler` package; this is the loop around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping

from llumigrate.controller.cluster import Cluster
from llumigrate.errors import ConfigError, LlumigrateError
from llumigrate.scheduler import (
    DEFAULT_INTERVAL_S,
    MigrationCostModel,
    MigrationHistory,
    MigrationPlan,
    SchedulerConfig,
    make_dispatcher,
    plan_migrations,
)
from llumigrate.serve.observer import ServeObserver
from llumigrate.serve.snapshots import cluster_snapshot

logger = logging.getLogger(__name__)

# SchedulerConfig fields `set_policy(thresholds=...)` may change.
TUNABLE = tuple(f.name for f in dataclasses.fields(SchedulerConfig)
                if f.name not in ("dispatch_policy", "migration_policies"))


class GlobalScheduler:
    def __init__(self, cluster: Cluster, config: SchedulerConfig, observer: ServeObserver, *,
                 interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if not interval_s > 0:
            raise ConfigError(f"scheduler interval must be > 0, got {interval_s}")
        self.cluster, self.observer, self.interval_s = cluster, observer, interval_s
        self.config = config
        self.dispatcher = make_dispatcher(config)
        self.history = MigrationHistory()
        self.cost = MigrationCostModel()
        self.rounds = 0
        self._inflight: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    # -- dispatch ----------------------------------------------------------
    def choose(self, priority: int = 0) -> str:
        """The instance a new request of `priority` goes to (NoInstanceAvailable if none)."""
        return self.dispatcher.choose(cluster_snapshot(self.cluster, self.now()), priority)

    # -- policy ------------------------------------------------------------
    def set_policy(self, dispatch: str | None = None, migration: list[str] | None = None,
                   thresholds: Mapping[str, float] | None = None) -> SchedulerConfig:
        """Replace the config all at once (ConfigError and no change if invalid)."""
        changes: dict = dict(thresholds or {})
        unknown = sorted(set(changes) - set(TUNABLE))
        if unknown:
            raise ConfigError(f"unknown thresholds {unknown}; allowed: {', '.join(TUNABLE)}")
        for name, value in changes.items():
            if isinstance(getattr(self.config, name), int) and float(value) != int(value):
                raise ConfigError(f"{name} must be an integer, got {value}")
            changes[name] = type(getattr(self.config, name) or 0.0)(value)
        if dispatch is not None:
            changes["dispatch_policy"] = dispatch
        if migration is not None:
            changes["migration_policies"] = frozenset(migration)
        config = dataclasses.replace(self.config, **changes)
        if config.dispatch_policy != self.config.dispatch_policy or config.seed != self.config.seed:
            self.dispatcher = make_dispatcher(config)
        self.config = config
        return config

    # -- migration rounds ------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for t in list(self._inflight.values()):
            t.cancel()
        await asyncio.gather(*([self._task] if self._task else []), *self._inflight.values(),
                             return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.interval_s)
            try:
                self.observer.on_loop_lag(loop.time() - t - self.interval_s)
                self.step()
            except Exception:  # a bad round must not stop the scheduler
                logger.exception("scheduler round failed")

    def step(self, only: tuple[str, ...] | None = None) -> list[MigrationPlan]:
        """One migration round: plan over a fresh snapshot, start each plan.
        `only`: run just these policies this round (e.g. drain for an instance
        that is leaving), whatever the configured set."""
        self.rounds += 1
        now = self.now()
        self.history = self.history.prune(now, max(self.config.no_return_s, self.config.cooldown_s))
        snap = cluster_snapshot(self.cluster, now)
        cfg = self.config if only is None else dataclasses.replace(self.config, migration_policies=only)
        plans = [p for p in plan_migrations(snap, cfg, self.history, self.cost)
                 if p.request_id not in self._inflight]
        for plan in plans:
            self.observer.reasons[plan.request_id] = plan.reason
            task = asyncio.get_running_loop().create_task(self._migrate(plan))
            self._inflight[plan.request_id] = task
            task.add_done_callback(lambda _t, rid=plan.request_id: self._inflight.pop(rid, None))
        return plans

    async def _migrate(self, plan: MigrationPlan) -> None:
        # A queued or preempted request holds no KV: no pre-copy to try, the
        # destination computes its context (as its own instance would have).
        # Should it resume on the source meanwhile, this stays exact: it
        # costs a re-prefill there instead of a copy.
        config = dataclasses.replace(self.cluster.migration_config, recompute=True) if plan.waiting else None
        try:
            result = await self.cluster.migrate(plan.request_id, plan.destination, config)
        except LlumigrateError as e:  # refused: the request stays where it is
            self.observer.reasons.pop(plan.request_id, None)
            logger.info("planned %s migration of %s refused: %s", plan.reason, plan.request_id, e)
            return
        self.history = self.history.record(plan.request_id, plan.source, plan.destination, self.now())
        if result.committed and result.context_tokens and not plan.waiting:
            self.cost = self.cost.observe(result.context_tokens, result.total_s)
