"""The global scheduler's pure policy core: no I/O, no asyncio, no vLLM.

Everything here is a function of immutable snapshots (`snapshot.py`) and a
frozen `SchedulerConfig`: where a new request goes (`dispatch.py`) and which
in-flight requests to migrate where (`planner.plan_migrations`, running the
policies of `policies/`). The shell that collects load reports and calls
`Cluster.migrate` lives in the controller.
"""

from __future__ import annotations

from llumigrate.scheduler.config import (DEFAULT_INTERVAL_S, DISPATCH_POLICIES, MIGRATION_POLICIES,
                                        SchedulerConfig)
from llumigrate.scheduler.cost import MigrationCostModel
from llumigrate.scheduler.dispatch import Dispatcher, make_dispatcher
from llumigrate.scheduler.history import MigrationHistory, MigrationRecord
from llumigrate.scheduler.load import freeness
from llumigrate.scheduler.plan import MigrationPlan, PlanContext, apply_plan
from llumigrate.scheduler.planner import plan_migrations
from llumigrate.scheduler.snapshot import ClusterSnapshot, InstanceSnapshot, RequestSnapshot

__all__ = [
    "DEFAULT_INTERVAL_S", "DISPATCH_POLICIES", "MIGRATION_POLICIES", "ClusterSnapshot", "Dispatcher",
    "InstanceSnapshot",
    "MigrationCostModel", "MigrationHistory", "MigrationPlan", "MigrationRecord", "PlanContext",
    "RequestSnapshot", "SchedulerConfig", "apply_plan", "freeness", "make_dispatcher",
    "plan_migrations",
]
