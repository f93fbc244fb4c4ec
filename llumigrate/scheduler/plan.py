"""Migration plans and the rules every plan obeys.

A `MigrationPlan` is a decision, not an action: the shell turns each into
`Cluster.migrate(plan.request_id, plan.destination)`. `apply_plan` gives the
snapshot as it will be once the plan completes (request moved, its blocks
freed on the source and taken on the destination, one more migration in
flight on each end), so policies planning several moves, and policies run
after them, see their effect. `admissible` is the one gate every plan passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from llumigrate.scheduler.config import SchedulerConfig
from llumigrate.scheduler.cost import MigrationCostModel
from llumigrate.scheduler.history import MigrationHistory
from llumigrate.scheduler.load import accepts_work, fits
from llumigrate.scheduler.snapshot import ClusterSnapshot, InstanceSnapshot, RequestSnapshot

Reason = Literal["balance", "defrag", "priority", "drain"]


@dataclass(frozen=True)
class MigrationPlan:
    request_id: str
    source: str
    destination: str
    reason: Reason
    priority: int = 0        # the request's vLLM priority (lower is more important)
    num_tokens: int = 0
    est_cost_s: float = 0.0
    waiting: bool = False    # a queued (or preempted) request re-dispatched: no KV to move


@dataclass(frozen=True)
class PlanContext:
    """Everything a migration policy reads besides the snapshot."""

    cfg: SchedulerConfig = field(default_factory=SchedulerConfig)
    history: MigrationHistory = field(default_factory=MigrationHistory)
    cost: MigrationCostModel = field(default_factory=MigrationCostModel)

    def plan(self, req: RequestSnapshot, destination: str, reason: Reason) -> MigrationPlan:
        waiting = req.status == "waiting"
        return MigrationPlan(req.request_id, req.instance_id, destination, reason, req.priority,
                             req.num_tokens, 0.0 if waiting else self.cost.cost(req), waiting)


def apply_plan(snapshot: ClusterSnapshot, plan: MigrationPlan) -> ClusterSnapshot:
    """The snapshot once `plan` has completed; the moved request is marked
    migrating, so no later plan of the same round moves it again."""
    src, dst = snapshot[plan.source], snapshot[plan.destination]
    req = next(r for r in src.requests if r.request_id == plan.request_id)
    if req.status == "waiting":  # a re-dispatch copies nothing: no migration slot
        return snapshot.with_instances(src.without_waiting(req), dst.with_waiting(replace(req, migrating=True)))
    src, dst = src.without_request(req), dst.with_running(replace(req, migrating=True))
    src = replace(src, migrations_out=src.migrations_out + 1)
    dst = replace(dst, migrations_in=dst.migrations_in + 1)
    return snapshot.with_instances(src, dst)


def can_send(inst: InstanceSnapshot, cfg: SchedulerConfig) -> bool:
    """Whether `inst` may start another copy out (`max_migrations_out`)."""
    return inst.up and inst.migrations_out < cfg.max_migrations_out


def can_receive(inst: InstanceSnapshot, cfg: SchedulerConfig, now: float) -> bool:
    """Whether `inst` may take another copy in (`max_migrations_in`)."""
    return accepts_work(inst, cfg, now) and inst.migrations_in < cfg.max_migrations_in


def needs_slot(req: RequestSnapshot) -> bool:
    """Whether moving `req` copies KV and so counts against the concurrency
    limits. A queued request holds no KV: re-dispatching it is an abort on
    one engine and a submit on another, however many run at once."""
    return req.status == "running"


def movable(req: RequestSnapshot, ctx: PlanContext, now: float, reason: Reason) -> bool:
    """Whether a policy may move `req` at all: running, migratable, not already
    migrating, not about to finish (`min_remaining`), and (except to drain)
    not cooling down. A queued request (not started yet, or preempted: either
    way it holds no blocks) is moved only by defrag: it goes where it can
    start now, and there is nothing to copy."""
    if not req.migratable or req.migrating:
        return False
    if req.status == "waiting":
        return reason == "defrag" and not ctx.history.cooling(req.request_id, now, ctx.cfg.cooldown_s)
    if req.status != "running":
        return False
    remaining = req.remaining_tokens
    if remaining is not None and remaining < min_remaining(req, ctx):
        return False
    return reason == "drain" or not ctx.history.cooling(req.request_id, now, ctx.cfg.cooldown_s)


def min_remaining(req: RequestSnapshot, ctx: PlanContext) -> float:
    """Tokens running `req` must have left to be worth moving:
    `min_remaining_tokens`, or, if more, `end_margin` times the tokens it
    will generate while it migrates (its measured decode rate times the cost
    model's estimate). With fewer it likely finishes on its source before
    the stop: the migration aborts, its copy and its reserved blocks wasted."""
    during = (req.decode_tokens_per_s or 0.0) * ctx.cost.cost(req)
    return max(float(ctx.cfg.min_remaining_tokens), ctx.cfg.end_margin * during)


def may_go(req: RequestSnapshot, dst: InstanceSnapshot, ctx: PlanContext, now: float,
           reason: Reason) -> bool:
    """Whether `dst` may receive `req`: another instance that accepts
    migrations, has the blocks, and (except to drain) is not where `req`
    just came from."""
    if dst.instance_id == req.instance_id or not fits(req, dst):
        return False
    if not (can_receive(dst, ctx.cfg, now) if needs_slot(req) else accepts_work(dst, ctx.cfg, now)):
        return False
    back = ctx.history.returning(req.request_id, dst.instance_id, now, ctx.cfg.no_return_s)
    return reason == "drain" or not back


def admissible(snapshot: ClusterSnapshot, plan: MigrationPlan, ctx: PlanContext) -> bool:
    """The gate of every plan against the snapshot with the earlier plans applied."""
    if plan.source not in snapshot or plan.destination not in snapshot:
        return False
    src = snapshot[plan.source]
    req = next((r for r in src.requests if r.request_id == plan.request_id), None)
    return (req is not None and src.up and (can_send(src, ctx.cfg) or not needs_slot(req))
            and movable(req, ctx, snapshot.now, plan.reason)
            and may_go(req, snapshot[plan.destination], ctx, snapshot.now, plan.reason))
