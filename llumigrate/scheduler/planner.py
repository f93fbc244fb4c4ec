"""`plan_migrations`: one round of migration decisions.

Runs the enabled policies in `MIGRATION_POLICIES` order (drain, priority,
defrag, balance); each sees the snapshot with the earlier plans applied, so
together they respect the per-instance concurrency limits (in-flight
migrations in the snapshot count) and plan each request at most once. Every
plan is checked again against `plan.admissible` before it is kept.
"""

from __future__ import annotations

from llumigrate.scheduler.config import MIGRATION_POLICIES, SchedulerConfig
from llumigrate.scheduler.cost import MigrationCostModel
from llumigrate.scheduler.history import MigrationHistory
from llumigrate.scheduler.plan import MigrationPlan, PlanContext, admissible, apply_plan
from llumigrate.scheduler.policies import POLICIES
from llumigrate.scheduler.snapshot import ClusterSnapshot


def plan_migrations(snapshot: ClusterSnapshot, cfg: SchedulerConfig,
                    history: MigrationHistory | None = None,
                    cost: MigrationCostModel | None = None) -> list[MigrationPlan]:
    """The migrations to start now, in the order to start them."""
    ctx = PlanContext(cfg, history or MigrationHistory(), cost or MigrationCostModel())
    kept: list[MigrationPlan] = []
    for name in MIGRATION_POLICIES:
        if not cfg.enabled(name):
            continue
        for plan in POLICIES[name](snapshot, ctx):
            if admissible(snapshot, plan, ctx):
                snapshot = apply_plan(snapshot, plan)
                kept.append(plan)
    return kept
