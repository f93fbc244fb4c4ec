"""Migration policies. Each is a pure function
`(ClusterSnapshot, PlanContext) -> list[MigrationPlan]` that respects every
rule of `plan.admissible` on its own; `planner.plan_migrations` runs the
enabled ones in `config.MIGRATION_POLICIES` order."""

from __future__ import annotations

from collections.abc import Callable

from llumigrate.scheduler.plan import MigrationPlan, PlanContext
from llumigrate.scheduler.policies.balance import balance
from llumigrate.scheduler.policies.defrag import defrag
from llumigrate.scheduler.policies.drain import drain
from llumigrate.scheduler.policies.priority import make_headroom
from llumigrate.scheduler.snapshot import ClusterSnapshot

Policy = Callable[[ClusterSnapshot, PlanContext], list[MigrationPlan]]

POLICIES: dict[str, Policy] = {"drain": drain, "priority": make_headroom, "defrag": defrag,
                               "balance": balance}

__all__ = ["POLICIES", "Policy", "balance", "defrag", "drain", "make_headroom"]
